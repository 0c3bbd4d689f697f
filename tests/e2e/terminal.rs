//! The web terminal's gateway (`/-/web/<cluster>/…`) from outside, as an attacker and as a
//! user without a browser would meet it (docs/security.md G1, G2, G5, G7): a page on another
//! origin cannot ride the portal cookie, only the four requests the terminal needs pass, the
//! cluster's rules apply exactly as to kubectl, and browser sessions are bounded (frame size,
//! idle time, the portal session's end). The browser journey itself is in browser.rs.

use std::time::Duration;

use crate::support::tenant::now;
use crate::support::*;
use kube_relay::config::CookieKey;
use kube_relay::portal::web::session::Session;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A sealed portal session for `user` of the dev environment, ending in `lasts`: the `Cookie`
/// header value and the session (for its CSRF token).
fn session_for(env: &Env, user: &str, lasts: Duration) -> (String, Session) {
    let text = std::fs::read_to_string(env.dev.dir.join("cookie-key")).unwrap();
    // The relay's documented derivation: SHA-256 of the key file's trimmed contents.
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.trim().as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    let token = env
        .dev
        .issuer
        .mint(serde_json::json!({"sub": user, "aud": "kube-relay"}));
    portal_session_cookie(&CookieKey(key), token, now() + lasts.as_secs())
}

fn origin(env: &Env) -> String {
    format!("https://localhost:{}", env.dev.relay_addr.port())
}

/// One request on a fresh connection; the whole answer (status line first).
async fn send(env: &Env, target: &str, headers: &[(&str, String)]) -> String {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tls_exchange(
        env.dev.relay_addr,
        &env.relay_ca(),
        "localhost",
        req.as_bytes(),
        Duration::from_secs(10),
    )
    .await
}

/// The headers a WebSocket handshake from the portal's page carries.
fn ws_headers(origin: Option<String>, cookie: &str) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("Cookie", cookie.to_owned()),
        ("Upgrade", "websocket".to_owned()),
        ("Sec-WebSocket-Version", "13".to_owned()),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==".to_owned()),
        ("Sec-WebSocket-Protocol", "v5.channel.k8s.io".to_owned()),
    ];
    if let Some(o) = origin {
        h.push(("Origin", o));
    }
    // `Connection: close` from `send` would end an upgrade; the handshake names Upgrade.
    h
}

fn exec_target(csrf: &str) -> String {
    format!("/-/web/alpha/api/v1/namespaces/default/pods/web-0/exec?command=sh&stdin=true&stdout=true&tty=true&csrf={csrf}")
}

/// docs/security.md G1: the cookie alone opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_cannot_use_the_portal_session() {
    let env = dev_env().await;
    let (cookie, s) = session_for(&env, "alice", Duration::from_secs(600));
    let list = "/-/web/alpha/api/v1/namespaces";
    let good = vec![
        ("Cookie", cookie.clone()),
        ("X-CSRF-Token", s.csrf.clone()),
        ("Sec-Fetch-Site", "same-origin".to_owned()),
    ];
    let ok = send(&env, list, &good).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"kind\":\"NamespaceList\""), "{ok}");
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a foreign Origin",
            vec![
                ("Cookie", cookie.clone()),
                ("X-CSRF-Token", s.csrf.clone()),
                ("Origin", "https://evil.example".to_owned()),
            ],
            "HTTP/1.1 403",
        ),
        (
            "a cross-site fetch",
            vec![
                ("Cookie", cookie.clone()),
                ("X-CSRF-Token", s.csrf.clone()),
                ("Sec-Fetch-Site", "cross-site".to_owned()),
            ],
            "HTTP/1.1 403",
        ),
        (
            "no CSRF token",
            vec![("Cookie", cookie.clone())],
            "HTTP/1.1 403",
        ),
        (
            "a wrong CSRF token",
            vec![("Cookie", cookie.clone()), ("X-CSRF-Token", "x".repeat(43))],
            "HTTP/1.1 403",
        ),
        (
            "no session",
            vec![("X-CSRF-Token", s.csrf.clone())],
            "HTTP/1.1 401",
        ),
    ];
    for (what, headers, want) in cases {
        let got = send(&env, list, &headers).await;
        assert!(got.starts_with(want), "{what}: {got}");
        assert!(!got.contains("NamespaceList"), "{what}: {got}");
    }
    // The WebSocket handshake: the same, and Origin is required.
    for (what, origin_header, csrf, want) in [
        (
            "a foreign Origin",
            Some("https://evil.example".to_owned()),
            s.csrf.as_str(),
            "HTTP/1.1 403",
        ),
        ("no Origin", None, s.csrf.as_str(), "HTTP/1.1 403"),
        ("no CSRF token", Some(origin(&env)), "", "HTTP/1.1 403"),
    ] {
        let got = send(
            &env,
            &exec_target(csrf),
            &ws_headers(origin_header, &cookie),
        )
        .await;
        assert!(got.starts_with(want), "{what}: {got}");
    }
    env.dev.stop().await;
}

/// docs/security.md G7: the terminal and player pages run the relay's own scripts only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_and_player_pages_allow_only_the_relay_s_scripts() {
    let env = dev_env().await;
    let (cookie, _) = session_for(&env, "alice", Duration::from_secs(600));
    for page in [
        "/-/terminal".to_owned(),
        "/-/recordings/play/alpha_20261207T023000Z_x.cast".to_owned(),
    ] {
        let got = send(&env, &page, &[("Cookie", cookie.clone())]).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{page}: {got}");
        let csp = got
            .lines()
            .find_map(|l| l.strip_prefix("content-security-policy: "))
            .unwrap_or_else(|| panic!("{page}: no CSP: {got}"));
        let script = csp
            .split(';')
            .map(str::trim)
            .find(|d| d.starts_with("script-src"))
            .unwrap_or_else(|| panic!("{page}: no script-src in {csp}"));
        assert!(script.starts_with("script-src 'self'"), "{page}: {csp}");
        assert!(
            !script.contains("unsafe-inline") && !script.contains("http"),
            "{page}: {csp}"
        );
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{page}: {csp}"
        );
        let body = got.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(!body.contains("<script>"), "{page}: an inline script");
    }
    env.dev.stop().await;
}

/// docs/security.md G2 and G5: only what the terminal needs passes, and the cluster's rules
/// decide exactly as for kubectl (carol may read alpha; exec needs step-up context c1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_passes_only_the_terminal_s_requests_under_the_cluster_s_rules() {
    let env = dev_env().await;
    let (cookie, s) = session_for(&env, "alice", Duration::from_secs(600));
    let h = vec![("Cookie", cookie.clone()), ("X-CSRF-Token", s.csrf.clone())];
    for path in [
        "/-/web/alpha/api/v1/secrets",
        "/-/web/alpha/api/v1/namespaces/default/secrets",
        "/-/web/alpha/api/v1/namespaces/default/pods/web-0/exec?command=sh",
        "/-/web/alpha/api/v1/namespaces/../pods",
        "/-/web/alpha/apis/apps/v1/deployments",
    ] {
        let got = send(&env, path, &h).await;
        // `..` is refused by routing already (400), the rest by the gateway (404).
        assert!(
            got.starts_with("HTTP/1.1 404") || got.starts_with("HTTP/1.1 400"),
            "{path}: {got}"
        );
    }
    // One value per parameter: the relay must read what the API server reads.
    let twice = send(
        &env,
        "/-/web/alpha/api/v1/namespaces/default/pods/web-0/log?container=a&container=b",
        &h,
    )
    .await;
    assert!(twice.starts_with("HTTP/1.1 400"), "{twice}");
    let pods = send(&env, "/-/web/alpha/api/v1/namespaces/default/pods", &h).await;
    assert!(
        pods.starts_with("HTTP/1.1 200") && pods.contains("web-0"),
        "{pods}"
    );
    let logs = send(
        &env,
        "/-/web/alpha/api/v1/namespaces/default/pods/web-0/log?tailLines=2&csrf=dropped",
        &h,
    )
    .await;
    assert!(logs.starts_with("HTTP/1.1 200"), "{logs}");

    let (cookie, s) = session_for(&env, "carol", Duration::from_secs(600));
    let h = vec![("Cookie", cookie.clone()), ("X-CSRF-Token", s.csrf.clone())];
    let read = send(&env, "/-/web/alpha/api/v1/namespaces", &h).await;
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    let exec = send(
        &env,
        &exec_target(&s.csrf),
        &ws_headers(Some(origin(&env)), &cookie),
    )
    .await;
    assert!(exec.starts_with("HTTP/1.1 401"), "{exec}");
    assert!(
        exec.contains("insufficient_claims"),
        "step-up, as for kubectl: {exec}"
    );
    // bob has no rule on alpha at all.
    let (cookie, s) = session_for(&env, "bob", Duration::from_secs(600));
    let h = vec![("Cookie", cookie), ("X-CSRF-Token", s.csrf)];
    let denied = send(&env, "/-/web/alpha/api/v1/namespaces", &h).await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    env.dev.stop().await;
}

/// Opens a terminal session through the gateway; returns the stream after the 101.
async fn open_terminal(
    env: &Env,
    cookie: &str,
    csrf: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n",
        exec_target(csrf)
    );
    for (k, v) in ws_headers(Some(origin(env)), cookie) {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut s = tls_connect(
        env.dev.relay_addr,
        &env.relay_ca(),
        "localhost",
        &[b"http/1.1"],
    )
    .await;
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("the handshake's answer")
            .unwrap();
        assert!(
            n > 0,
            "closed during the handshake: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Reads until the relay closes the connection (bounded by `limit`).
async fn closed_within(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    limit: Duration,
) {
    let mut buf = vec![0u8; 65536];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the terminal stayed open");
}

fn close_reasons(env: &Env) -> Vec<String> {
    std::fs::read_to_string(env.dev.dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| {
            r["stage"] == "ResponseComplete"
                && r["annotations"]["kube-relay.io/client"] == "web-terminal"
                && r["objectRef"]["subresource"] == "exec"
        })
        .map(|r| {
            r["annotations"]["kube-relay.io/close-reason"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// docs/security.md G7: a browser's terminal is bounded: a frame over 64 KiB ends it, so do
/// `login.portal.terminal_idle` without a byte and the end of the portal session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_idleness_and_the_session_s_end_close_the_terminal() {
    let env = dev_env().await;
    let (cookie, s) = session_for(&env, "alice", Duration::from_secs(600));
    let mut t = open_terminal(&env, &cookie, &s.csrf).await;
    // A masked binary frame announcing 100 KiB of stdin.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(100u64 * 1024).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend(std::iter::repeat_n(0u8, 4096));
    t.write_all(&frame).await.unwrap();
    closed_within(&mut t, Duration::from_secs(20)).await;
    eventually(
        "the frame_too_large record",
        Duration::from_secs(20),
        || async {
            let r = close_reasons(&env);
            r.iter()
                .any(|x| x == "frame_too_large")
                .then_some(())
                .ok_or(r)
        },
    )
    .await;

    // Idle: a short limit by reload, then a session that sends nothing.
    let config = env.dev.dir.join("relay.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen(
            "    terminal: true",
            "    terminal: true\n    terminal_idle: 1s",
            1,
        ),
    )
    .unwrap();
    env.dev
        .relay_handle
        .reload()
        .await
        .expect("terminal_idle loads");
    let mut t = open_terminal(&env, &cookie, &s.csrf).await;
    closed_within(&mut t, Duration::from_secs(20)).await;
    eventually(
        "the idle_timeout record",
        Duration::from_secs(20),
        || async {
            let r = close_reasons(&env);
            r.iter().any(|x| x == "idle_timeout").then_some(()).ok_or(r)
        },
    )
    .await;
    std::fs::write(&config, &text).unwrap();
    env.dev
        .relay_handle
        .reload()
        .await
        .expect("the original loads");

    // The portal session ends in 3 s: so does its terminal, however busy.
    let (cookie, s) = session_for(&env, "alice", Duration::from_secs(3));
    let mut t = open_terminal(&env, &cookie, &s.csrf).await;
    closed_within(&mut t, Duration::from_secs(20)).await;
    eventually(
        "the token_expired record",
        Duration::from_secs(20),
        || async {
            let r = close_reasons(&env);
            r.iter()
                .any(|x| x == "token_expired")
                .then_some(())
                .ok_or(r)
        },
    )
    .await;
    env.dev.stop().await;
}
