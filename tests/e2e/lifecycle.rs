//! Reload and drain (docs/security.md scenarios 5 and 7): configuration changes under continuous
//! traffic lose no request; an invalid file is rejected whole; live streams survive unless their
//! access was revoked; SIGHUP and file changes trigger reloads; SIGTERM drains gracefully.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config_path(env: &Env) -> std::path::PathBuf {
    env.dev.dir.join("relay.yaml")
}

/// Rewrites relay.yaml with `f` applied to its text.
fn edit(env: &Env, f: impl Fn(&str) -> String) -> String {
    let p = config_path(env);
    let old = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, f(&old)).unwrap();
    old
}

async fn admin_get(admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut m = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut m)).await;
    let (code, _, body) = parse_response(&m);
    (code, body)
}

/// Opens a watch on `path` and returns the stream after the first event arrived.
async fn open_watch(
    env: &Env,
    token: &str,
    path: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut s = tls_connect(
        env.dev.relay_addr,
        &env.relay_ca(),
        "localhost",
        &[b"http/1.1"],
    )
    .await;
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = String::new();
    let mut buf = vec![0u8; 65536];
    while !got.contains("\"ADDED\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("watch events")
            .unwrap();
        assert!(n > 0, "watch closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    s
}

/// Reads until the response ends (last chunk) or the connection closes; returns what arrived and
/// whether it ended within `limit`.
async fn read_to_end(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    limit: Duration,
) -> (String, bool) {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 65536];
    let r = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if all == b"0\r\n\r\n" || all.ends_with(b"\r\n0\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    (String::from_utf8_lossy(&all).into_owned(), r.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_reloads_under_traffic_lose_nothing() {
    let env = dev_env().await;
    let token = env.dev.token("alice");
    let relay = env.dev.relay_handle.clone();
    let doc = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: before-reloads\n";
    ok_out(env.kubectl("1.33", "alpha").args(["apply", "-f", "-"]), doc);
    // A live watch that must survive every reload.
    let mut watch = open_watch(
        &env,
        &token,
        "/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true",
    )
    .await;

    // The probe: REST over one HTTP/2 connection and over fresh HTTP/1.1 connections.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let probe = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (addr, ca, token) = (env.dev.relay_addr, env.relay_ca(), token.clone());
        tokio::spawn(async move {
            use http_body_util::{BodyExt, Empty};
            let tls = tls_connect(addr, &ca, "alpha.relay.localhost", &[b"h2"]).await;
            let (mut send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tls),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let code = if i.is_multiple_of(2) {
                    let req = http::Request::get(
                        "https://alpha.relay.localhost/api/v1/namespaces/default/pods",
                    )
                    .header("authorization", format!("Bearer {token}"))
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                    match send.send_request(req).await {
                        Ok(r) => {
                            let st = r.status().as_u16();
                            let _ = r.into_body().collect().await;
                            st
                        }
                        Err(_) => 0,
                    }
                } else {
                    let mut s =
                        tls_connect(addr, &ca, "beta.relay.localhost", &[b"http/1.1"]).await;
                    let req = format!("GET /version HTTP/1.1\r\nHost: beta.relay.localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
                    let _ = s.write_all(req.as_bytes()).await;
                    let mut buf = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
                        .await;
                    parse_response(&String::from_utf8_lossy(&buf)).0
                };
                if code == 200 {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    // A live exec session (kubectl 1.33, WebSocket) that must survive every reload too.
    let mut exec = Command::new(kubectl("1.33"))
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .args(["exec", "-i", "web-0", "--", "cat"])
        .env("HOME", &env.home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut exec_in = exec.stdin.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let exec_out = exec.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(exec_out).lines() {
            let Ok(l) = l else { break };
            let _ = line_tx.send(l);
        }
    });
    {
        use std::io::Write as _;
        writeln!(exec_in, "before reloads").unwrap();
    }
    assert_eq!(
        line_rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        "before reloads"
    );

    let original = std::fs::read_to_string(config_path(&env)).unwrap();
    let variant = original.replace(
        "        verbs: [get, list, watch]\n",
        "        verbs: [get, list]\n",
    );
    assert_ne!(original, variant);
    let served = || ok.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst);
    for i in 0..100 {
        std::fs::write(
            config_path(&env),
            if i % 2 == 0 { &variant } else { &original },
        )
        .unwrap();
        relay.reload().await.expect("valid config reloads");
        // Interleave: the probe completes requests between every two reloads.
        let before = served();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while served() < before + 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "probe stalled after reload {i}"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // An invalid file is rejected whole; the running configuration keeps serving.
    std::fs::write(
        config_path(&env),
        original.replace("mode: passthrough", "mode: teleport"),
    )
    .unwrap();
    let err = relay.reload().await.unwrap_err();
    assert!(err.contains("clusters[1].upstream_auth.mode"), "{err}");
    std::fs::write(config_path(&env), &original).unwrap();

    stop.store(true, Ordering::SeqCst);
    probe.await.unwrap();
    assert!(
        ok.load(Ordering::SeqCst) >= 200,
        "probe ran: {}",
        ok.load(Ordering::SeqCst)
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed probe requests during 100 reloads"
    );

    // The exec session lived through all of it.
    {
        use std::io::Write as _;
        writeln!(exec_in, "after reloads").unwrap();
    }
    assert_eq!(
        line_rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        "after reloads"
    );
    drop(exec_in);
    let _ = exec.wait();

    // The watch lived through all of it and still delivers events.
    let doc = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: after-reloads\n";
    ok_out(env.kubectl("1.33", "alpha").args(["apply", "-f", "-"]), doc);
    let mut got = String::new();
    let mut buf = vec![0u8; 65536];
    while !got.contains("after-reloads") {
        let n = tokio::time::timeout(Duration::from_secs(10), watch.read(&mut buf))
            .await
            .expect("event after reloads")
            .unwrap();
        assert!(n > 0, "the watch was closed by a reload");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let (_, m) = admin_get(env.dev.admin_addr.unwrap(), "/metrics").await;
    let count = |result: &str| -> u64 {
        let key = format!("relay_config_reloads_total{{result=\"{result}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // The file watcher may add reloads of its own on top of the 100 explicit ones.
    assert!(count("success") >= 100, "{m}");
    assert!(count("failure") >= 1, "{m}");
    env.dev.stop().await;
}

fn ok_out(cmd: &mut Command, stdin: &str) {
    let c = std::mem::replace(cmd, Command::new("true"));
    ok(
        &run(c, Some(stdin.as_bytes()), Duration::from_secs(60)),
        "kubectl",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_access_closes_live_streams() {
    let env = dev_env().await;
    let bob = env.dev.token("bob");
    let mut watch = open_watch(
        &env,
        &bob,
        "/clusters/beta/api/v1/namespaces/default/pods?watch=true&audit=bob",
    )
    .await;
    // Take bob's rule away.
    edit(&env, |s| {
        s.replace(
            "      - users: [dev/bob]\n        verbs: [get, list, watch]\n",
            "",
        )
    });
    env.dev.relay_handle.reload().await.unwrap();
    let (got, ended) = read_to_end(&mut watch, Duration::from_secs(10)).await;
    assert!(
        ended,
        "a revoked watch stayed open; got {:?}; audit:\n{}",
        &got[got.len().saturating_sub(60)..],
        std::fs::read_to_string(env.dev.dir.join("audit.jsonl")).unwrap_or_default()
    );
    // The audit log says why.
    let audit = env.dev.dir.join("audit.jsonl");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.lines().any(|l| {
            l.contains("audit=bob")
                && l.contains("\"ResponseComplete\"")
                && l.contains("access_revoked")
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no access_revoked record:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New requests by bob are refused; alice is unaffected.
    let (c, _, _) = request(
        &env,
        "localhost",
        "GET",
        "/clusters/beta/api/v1/namespaces/default/pods",
        &[("Authorization", &format!("Bearer {bob}"))],
    )
    .await;
    assert_eq!(c, 403);
    env.dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_picked_up_without_a_signal() {
    let env = dev_env().await;
    let bob = env.dev.token("bob");
    let (c, _, _) = request(
        &env,
        "localhost",
        "GET",
        "/clusters/beta/api/v1/namespaces/default/pods",
        &[("Authorization", &format!("Bearer {bob}"))],
    )
    .await;
    assert_eq!(c, 200);
    edit(&env, |s| {
        s.replace("users: [dev/bob]", "users: [dev/nobody]")
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (c, _, _) = request(
            &env,
            "localhost",
            "GET",
            "/clusters/beta/api/v1/namespaces/default/pods",
            &[("Authorization", &format!("Bearer {bob}"))],
        )
        .await;
        if c == 403 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "file change not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.dev.stop().await;
}

/// The real binary: SIGHUP reloads; SIGTERM drains (readiness fails at once, new connections
/// still served during the delay, watches end cleanly, exit by the deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_drains_the_serve_process() {
    let env = dev_env().await;
    // A second relay process on the same clusters and issuer, from a copy of the dev config.
    let cfg = std::fs::read_to_string(config_path(&env)).unwrap();
    let listen_line = cfg
        .lines()
        .find(|l| l.starts_with("listen:"))
        .unwrap()
        .to_owned();
    let admin_line = cfg
        .lines()
        .find(|l| l.trim_start().starts_with("listen:") && l.starts_with("  "))
        .unwrap()
        .to_owned();
    let cfg = cfg
        .replace(&listen_line, "listen: 127.0.0.1:0")
        .replace(&admin_line, "  listen: 127.0.0.1:0")
        .replace(
            "  drain_delay: 200ms\n  drain_window: 1s\n  drain_timeout: 3s\n",
            // The delay must cover the readiness poll and the new connection below on a loaded
            // machine; the window (when streams close) stays short.
            "  drain_delay: 5s\n  drain_window: 1s\n  drain_timeout: 10s\n",
        )
        .replace("path: audit.jsonl", "path: serve-audit.jsonl");
    let path = env.dev.dir.join("serve.yaml");
    std::fs::write(&path, &cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-relay"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines() {
            let Ok(l) = l else { break };
            let _ = tx.send(l);
        }
    });
    // The line that names the bound addresses; other start-up lines may come first.
    let started = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("serve logs its addresses");
        if l.contains("listen=") {
            break l;
        }
    };
    let grab = |key: &str| -> std::net::SocketAddr {
        let rest = started
            .split(key)
            .nth(1)
            .unwrap_or_else(|| panic!("{key} in {started}"));
        let rest = rest.trim_start_matches("Some(");
        rest.split([' ', ')']).next().unwrap().parse().unwrap()
    };
    let addr = grab("listen=");
    let admin = grab("admin=");
    wait_ready(admin).await;

    // SIGHUP → one successful reload.
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = admin_get(admin, "/metrics").await;
        if m.contains(r#"relay_config_reloads_total{result="success"} 1"#) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let token = env.dev.token("alice");
    let ca = env.relay_ca();
    let mut watch = tls_connect(addr, &ca, "localhost", &[b"http/1.1"]).await;
    watch
        .write_all(format!("GET /clusters/alpha/api/v1/namespaces/default/pods?watch=true HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(10), watch.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // A live exec session (kubectl 1.33, WebSocket) on the draining process.
    let kc = std::fs::read_to_string(env.kubeconfig()).unwrap().replace(
        &format!("127.0.0.1:{}", env.dev.relay_addr.port()),
        &format!("127.0.0.1:{}", addr.port()),
    );
    let serve_kubeconfig = env.dev.dir.join("serve-kubeconfig");
    std::fs::write(&serve_kubeconfig, kc).unwrap();
    let mut exec = Command::new(kubectl("1.33"))
        .arg("--kubeconfig")
        .arg(&serve_kubeconfig)
        .args(["exec", "-i", "web-0", "--", "cat"])
        .env("HOME", &env.home)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _exec_stdin = exec.stdin.take();
    // Wait (bounded) until the session is established on the relay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, m) = admin_get(admin, "/metrics").await;
        if m.lines().any(|l| {
            l.starts_with("relay_longrunning_requests{")
                && l.contains("protocol=\"websocket\"")
                && l.ends_with(" 1")
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "exec never started:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    // Readiness fails at once...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if admin_get(admin, "/readyz").await.0 == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz still 200 while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...while a new connection during the delay is still served.
    let mut s = tls_connect(addr, &ca, "localhost", &[b"http/1.1"]).await;
    s.write_all(format!("GET /clusters/alpha/version HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp)).await;
    assert_eq!(parse_response(&String::from_utf8_lossy(&resp)).0, 200);
    // The watch ends with a proper last chunk, not a reset.
    let (rest, ended) = read_to_end(&mut watch, Duration::from_secs(10)).await;
    assert!(ended, "watch still open after the drain window");
    assert!(
        rest.ends_with("0\r\n\r\n"),
        "the watch was cut, not ended: {:?}",
        &rest[rest.len().saturating_sub(40)..]
    );
    // The exec session is ended by the drain (after its grace, the window), not left hanging.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if exec.try_wait().unwrap().is_some() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = exec.kill();
            panic!("kubectl exec still running after the drain window");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The process exits on its own, successfully, before the deadline.
    let (tx2, rx2) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx2.send(child.wait());
    });
    let status = rx2
        .recv_timeout(Duration::from_secs(15))
        .expect("exits by the drain deadline")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // The access line of the request served during the drain delay, as docs/operations.md
    // shows it, reached stderr before the exit (the process log's writer ends with the
    // process; the reader sees the end of the pipe right after).
    let mut logged = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(10)) {
        logged.push(l);
    }
    let access = logged
        .iter()
        .find(|l| l.contains(" path=/clusters/alpha/version "))
        .unwrap_or_else(|| panic!("no access line for /version:\n{}", logged.join("\n")));
    let (time, rest) = access.split_at(27);
    humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("{e}: {access}"));
    assert!(
        rest.starts_with("  INFO kube_relay::access: request audit_id=\"")
            && rest.contains(
                " method=GET path=/clusters/alpha/version cluster=alpha verb=get user=\""
            )
            && rest.contains(" code=200 ms="),
        "{access}"
    );
    // Read only after the exit: the record is written when the relay has closed the tunnel,
    // which kubectl may notice first; the exit itself must not lose it.
    let audit = std::fs::read_to_string(env.dev.dir.join("serve-audit.jsonl")).unwrap_or_default();
    assert!(
        audit.lines().any(|l| l.contains("\"exec\"")
            && l.contains("ResponseComplete")
            && l.contains("\"draining\"")),
        "no draining close for the exec:\n{audit}"
    );
    env.dev.stop().await;
}

/// Scenario 9: one identity flooding requests or opening many watches gets 429 above its caps,
/// keyed by identity; another identity is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_identity_limits_do_not_touch_other_identities() {
    let env = dev_env().await;
    edit(&env, |s| {
        s.replace(
            "audit:\n",
            "limits: {per_identity_requests_per_second: 1, per_identity_burst: 4, per_identity_streams: 2}\naudit:\n",
        )
    });
    env.dev.relay_handle.reload().await.unwrap();
    let alice = format!("Bearer {}", env.dev.token("alice"));
    let bob = format!("Bearer {}", env.dev.token("bob"));
    let pods = "/clusters/beta/api/v1/namespaces/default/pods";
    // All at once, so the bucket's refill during the burst stays small; the bound allows for
    // whatever refilled while they ran, however slow the machine.
    let started = tokio::time::Instant::now();
    let codes: Vec<u16> = futures_util::future::join_all((0..12).map(|_| {
        let (env, alice) = (&env, alice.as_str());
        async move {
            request(env, "localhost", "GET", pods, &[("Authorization", alice)])
                .await
                .0
        }
    }))
    .await;
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(
        codes.iter().filter(|c| **c == 200).count() <= 4 + refilled,
        "{codes:?} in {:?}",
        started.elapsed()
    );
    assert!(codes.contains(&429), "{codes:?}");
    let (c, head, body) = request(
        &env,
        "localhost",
        "GET",
        pods,
        &[("Authorization", alice.as_str())],
    )
    .await;
    if c == 429 {
        assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
        assert!(body.contains("TooManyRequests"), "{body}");
    }
    assert_eq!(
        request(
            &env,
            "localhost",
            "GET",
            pods,
            &[("Authorization", bob.as_str())]
        )
        .await
        .0,
        200,
        "bob is unaffected"
    );

    // Streams: two watches for bob, the third refused, another identity still fine.
    let watch = format!("{pods}?watch=true");
    let w1 = open_watch(&env, &env.dev.token("bob"), &watch).await;
    let _w2 = open_watch(&env, &env.dev.token("bob"), &watch).await;
    // Let bob's token bucket refill so the next refusal is the stream cap, not the rate.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c, _, body) = request(
        &env,
        "localhost",
        "GET",
        &watch,
        &[("Authorization", bob.as_str())],
    )
    .await;
    assert_eq!(c, 429, "{body}");
    assert!(body.contains("concurrent"), "{body}");
    drop(w1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut s = tls_connect(
            env.dev.relay_addr,
            &env.relay_ca(),
            "localhost",
            &[b"http/1.1"],
        )
        .await;
        s.write_all(
            format!("GET {watch} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {bob}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed watch never freed its slot"
        );
    }
    env.dev.stop().await;
}

/// A switchable TCP forwarder: on, it pipes to `target`; off, it closes every connection as
/// soon as it is accepted (and the ones it was piping). The listener stays bound throughout:
/// closing and re-binding the port could lose it to another test's ephemeral socket.
struct Switch {
    port: u16,
    on: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    async fn new(target: std::net::SocketAddr) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (on, watch) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut a, _)) = l.accept().await else {
                    return;
                };
                let mut watch = watch.clone();
                if !*watch.borrow_and_update() {
                    continue; // dropped: the peer sees the connection close at once
                }
                tokio::spawn(async move {
                    let Ok(mut b) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = watch.wait_for(|on| !on) => {}
                    }
                });
            }
        });
        Self { port, on, task }
    }

    fn off(&mut self) {
        self.on.send_replace(false);
    }

    async fn on(&mut self) {
        self.on.send_replace(true);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Issue 5 item 4 / scenario 1: a cluster that goes away answers a fast 503 naming it, shows in
/// `/readyz`, does not affect the others, and recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_cluster_fails_fast_and_recovers() {
    let env = dev_env().await;
    let mut switch = Switch::new(env.dev.beta.addr).await;
    let beta_port = env.dev.beta.addr.port();
    edit(&env, |s| {
        s.replace(
            &format!("connect: 127.0.0.1:{beta_port}"),
            &format!("connect: 127.0.0.1:{}", switch.port),
        )
        .replace(
            "  drain_delay: 200ms\n",
            "  drain_delay: 200ms\n  health_interval: 100ms\n",
        )
    });
    env.dev.relay_handle.reload().await.unwrap();
    let tok = format!("Bearer {}", env.dev.token("alice"));
    let get = |cluster: &'static str| {
        let (env, tok) = (&env, tok.clone());
        async move {
            request(
                env,
                "localhost",
                "GET",
                &format!("/clusters/{cluster}/version"),
                &[("Authorization", tok.as_str())],
            )
            .await
        }
    };
    assert_eq!(get("beta").await.0, 200);
    switch.off();
    // The probes mark it down (a failing request alone answers 503 too, so wait for the
    // health state itself).
    let admin = env.dev.admin_addr.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = admin_get(admin, "/readyz").await;
        if body.contains("[-] cluster beta: down") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "beta never reported down:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Down means fast, names the cluster, and the rest of the relay is fine.
    let t = tokio::time::Instant::now();
    let (c, _, body) = get("beta").await;
    assert_eq!(c, 503, "{body}");
    assert!(body.contains("beta"), "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "503 took {:?}",
        t.elapsed()
    );
    assert_eq!(get("alpha").await.0, 200);
    let (code, body) = admin_get(env.dev.admin_addr.unwrap(), "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("[-] cluster beta: down"), "{body}");
    assert!(body.contains("[+] cluster alpha: reachable"), "{body}");
    // Back up: traffic flows again without a restart.
    switch.on().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if get("beta").await.0 == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "beta never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.dev.stop().await;
}

async fn try_tls(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// docs/security.md F1: one source address cannot hold more than its share of connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_connection_cap() {
    let env = dev_env().await;
    edit(&env, |s| {
        s.replace(
            "audit:\n",
            "limits: {max_connections_per_source: 3}\naudit:\n",
        )
    });
    env.dev.relay_handle.reload().await.unwrap();
    let ca = env.dev.relay_ca_pem.clone();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            try_tls(env.dev.relay_addr, &ca)
                .await
                .expect("within the cap"),
        );
    }
    assert!(
        try_tls(env.dev.relay_addr, &ca).await.is_err(),
        "a 4th connection from the same address was served"
    );
    held.pop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if try_tls(env.dev.relay_addr, &ca).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed connection never freed its slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    env.dev.stop().await;
}

/// Scenario 6: a reload swaps the serving certificate for new handshakes; live connections
/// keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_the_serving_certificate() {
    let env = dev_env().await;
    let old_ca = env.dev.relay_ca_pem.clone();
    let token = env.dev.token("alice");
    let mut live = try_tls(env.dev.relay_addr, &old_ca).await.unwrap();
    let new_ca = kube_sim::pki::TestCa::new("rotated relay CA").unwrap();
    let leaf = new_ca
        .issue(&["localhost", "127.0.0.1", "*.relay.localhost"])
        .unwrap();
    std::fs::write(env.dev.dir.join("relay.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(env.dev.dir.join("relay.key"), &leaf.key_pem).unwrap();
    env.dev.relay_handle.reload().await.unwrap();
    assert!(
        try_tls(env.dev.relay_addr, new_ca.cert_pem()).await.is_ok(),
        "new handshakes get the new certificate"
    );
    assert!(
        try_tls(env.dev.relay_addr, &old_ca).await.is_err(),
        "the old certificate is no longer served"
    );
    live.write_all(format!("GET /clusters/beta/version HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), live.read_to_end(&mut buf)).await;
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "the live connection broke"
    );
    // A broken key file is rejected whole; the rotated certificate keeps serving.
    std::fs::write(env.dev.dir.join("relay.key"), "not a key").unwrap();
    assert!(env.dev.relay_handle.reload().await.is_err());
    assert!(try_tls(env.dev.relay_addr, new_ca.cert_pem()).await.is_ok());
    env.dev.stop().await;
}

/// Scenario 10: the upstream caps HTTP/2 streams per connection (kube-sim: 200); the relay opens
/// more upstream connections instead of queueing, so 230 concurrent watches all start at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_watches_than_the_upstream_stream_cap_all_start() {
    use http_body_util::Empty;
    let env = dev_env().await;
    let token = env.dev.token("alice");
    let tls = tls_connect(
        env.dev.relay_addr,
        &env.relay_ca(),
        "alpha.relay.localhost",
        &[b"h2"],
    )
    .await;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_max_send_streams(1000)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut started = tokio::task::JoinSet::new();
    for _ in 0..230 {
        let mut send = send.clone();
        let token = token.clone();
        started.spawn(async move {
            let req = http::Request::get(
                "https://alpha.relay.localhost/api/v1/namespaces/default/pods?watch=true",
            )
            .header("authorization", format!("Bearer {token}"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status();
            // Keep the watch open until the test ends: hand the body back.
            (status, resp.into_body())
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut bodies = Vec::new();
    while let Some(r) = tokio::time::timeout_at(deadline, started.join_next())
        .await
        .expect("all watches start within 30 s")
    {
        let (status, body) = r.unwrap();
        assert_eq!(status, 200);
        bodies.push(body);
    }
    assert_eq!(bodies.len(), 230);
    // Each delivers its initial events.
    let first = bodies.pop().unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), first.collect_first()).await;
    assert!(frame.is_ok());
    drop(bodies);
    env.dev.stop().await;
}

trait CollectFirst {
    async fn collect_first(self) -> Option<bytes::Bytes>;
}

impl CollectFirst for hyper::body::Incoming {
    async fn collect_first(mut self) -> Option<bytes::Bytes> {
        use http_body_util::BodyExt;
        while let Some(f) = self.frame().await {
            if let Ok(d) = f.ok()?.into_data() {
                return Some(d);
            }
        }
        None
    }
}

/// docs/security.md scenario 7, the edge: a watch opened during `drain_delay` (after the drain
/// began, while new connections are still accepted) is closed by the drain's second pass within
/// `drain_window` after the delay, with reason `draining`, and does not hold the exit until
/// `drain_timeout`. Without the second pass it would stay open for the whole 60 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_opened_during_the_drain_delay_is_closed_by_the_drain() {
    // A cluster whose watch never ends: one chunk, then silence.
    let endless = FakeUpstream::start(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    let relay = CustomRelay::start_with(
        &[("alpha", &endless)],
        "timeouts: {drain_delay: 2s, drain_window: 1s, drain_timeout: 60s}\n",
    )
    .await;
    let token = relay.token("alice");
    let began = tokio::time::Instant::now();
    relay.begin_shutdown();
    // Inside the delay: the drain's first pass is over, new connections are still served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = tls_connect(relay.addr, &relay.ca, "localhost", &[b"http/1.1"]).await;
    s.write_all(
        format!(
            "GET /clusters/alpha/api/v1/namespaces/default/pods?watch=true HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the relay ends the stream; bounded well below drain_timeout.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("hello"), "the watch was streaming: {text}");
    assert!(ended.is_ok(), "the watch outlived the drain: {text}");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "closed after the delay and within the window, not at drain_timeout: {took:?}"
    );
    let audit = eventually(
        "the watch's closing record",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(relay.audit_path()).unwrap_or_default();
            text.lines()
                .find(|l| l.contains("watch=true") && l.contains("ResponseComplete"))
                .map(str::to_owned)
                .ok_or("not yet")
        },
    )
    .await;
    assert!(audit.contains("\"draining\""), "{audit}");
}
