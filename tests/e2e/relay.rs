//! The relay's rules, each driven the way a client meets them: raw TLS requests with chosen SNI
//! and Host, checked against what the simulated cluster recorded (docs/architecture.md "Routing"
//! and "Identity and upstream credentials", docs/security.md
//! A, B, C, D, E rows that apply to the data plane).

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

const ALPHA_SNI: &str = "alpha.relay.localhost";
const BETA_SNI: &str = "beta.relay.localhost";
const PUBLIC: &str = "localhost";

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn status_of(body: &str) -> Value {
    // Bodies may be chunked; the Status JSON is the one line starting with `{`.
    let start = body
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {body:?}"));
    let end = body.rfind('}').unwrap();
    serde_json::from_str(&body[start..=end]).unwrap()
}

fn assert_status(code: u16, head: &str, body: &str, want: u16, reason: &str) {
    assert_eq!(code, want, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let s = status_of(body);
    assert_eq!(s["kind"], "Status");
    assert_eq!(s["apiVersion"], "v1");
    assert_eq!(s["status"], "Failure");
    assert_eq!(s["code"], want);
    assert_eq!(s["reason"], reason, "{s}");
    assert!(s["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_sni_routing_forward_the_suffix_byte_for_byte() {
    let env = dev_env().await;
    let tok = bearer(&env.dev.token("alice"));
    let target = "/clusters/alpha/api/v1/namespaces/default/pods?limit=500&labelSelector=app%3Dweb&x=%2F..%2F";
    let (code, head, _) = request(&env, PUBLIC, "GET", target, &[("Authorization", &tok)]).await;
    assert_eq!(code, 200, "{head}");
    let rec = env
        .dev
        .alpha
        .record
        .matching("/api/v1/namespaces/default/pods");
    assert_eq!(
        rec.last().unwrap().path_and_query,
        "/api/v1/namespaces/default/pods?limit=500&labelSelector=app%3Dweb&x=%2F..%2F"
    );
    assert!(env
        .dev
        .beta
        .record
        .matching("/api/v1/namespaces/default/pods")
        .is_empty());

    // SNI alone selects beta and the whole target goes through.
    let (code, _, _) = request(
        &env,
        BETA_SNI,
        "GET",
        "/api/v1/namespaces/default/pods?limit=1",
        &[("Authorization", &tok)],
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        env.dev
            .beta
            .record
            .matching("/api/v1/namespaces/default/pods")
            .last()
            .unwrap()
            .path_and_query,
        "/api/v1/namespaces/default/pods?limit=1"
    );

    // SNI and path agreeing: the prefix is stripped.
    let (code, _, _) = request(
        &env,
        BETA_SNI,
        "GET",
        "/clusters/beta/version",
        &[("Authorization", &tok)],
    )
    .await;
    assert_eq!(code, 200);
    assert!(env
        .dev
        .beta
        .record
        .traffic()
        .iter()
        .any(|r| r.path_and_query == "/version"));
    // Bare cluster path is the root.
    let (code, _, _) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/alpha",
        &[("Authorization", &tok)],
    )
    .await;
    assert_ne!(code, 400);
    assert!(env
        .dev
        .alpha
        .record
        .traffic()
        .iter()
        .any(|r| r.path_and_query == "/"));
    env.dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagreeing_names_are_421_and_bad_segments_400() {
    let env = dev_env().await;
    let tok = bearer(&env.dev.token("alice"));
    let auth = [("Authorization", tok.as_str())];
    // SNI alpha, path beta.
    let (c, h, b) = request(&env, ALPHA_SNI, "GET", "/clusters/beta/api", &auth).await;
    assert_status(c, &h, &b, 421, "Misdirected");
    // SNI alpha, Host beta (domain fronting).
    let raw = format!("GET /api HTTP/1.1\r\nHost: beta.relay.localhost\r\nAuthorization: {tok}\r\nConnection: close\r\n\r\n");
    let (c, h, b) = parse_response(&raw_exchange(&env, ALPHA_SNI, raw.as_bytes()).await);
    assert_status(c, &h, &b, 421, "Misdirected");
    // Public SNI, Host naming a cluster.
    let raw = format!("GET /api HTTP/1.1\r\nHost: beta.relay.localhost\r\nAuthorization: {tok}\r\nConnection: close\r\n\r\n");
    let (c, h, b) = parse_response(&raw_exchange(&env, PUBLIC, raw.as_bytes()).await);
    assert_status(c, &h, &b, 421, "Misdirected");
    for bad in [
        "/clusters/alpha%2Fbeta/api",
        "/clusters/alpha%5cbeta/api",
        "/clusters/..%2Fbeta/api",
        "/clusters/alpha/../beta/api",
        "/clusters/./alpha/api",
        "/clusters/alpha;x/api",
        "/clusters//api",
        "/clusters/Alpha/api",
        "/clusters/alpha%252Fbeta/api",
    ] {
        let (c, h, b) = request(&env, PUBLIC, "GET", bad, &auth).await;
        assert_status(c, &h, &b, 400, "BadRequest");
    }
    // Nothing named: 404; relay pages are not forwarded; unknown clusters 404.
    let (c, h, b) = request(&env, PUBLIC, "GET", "/api/v1/pods", &auth).await;
    assert_status(c, &h, &b, 404, "NotFound");
    // `/-/clusters` is the relay's own API (tests/e2e/relay_pages.rs); an unknown relay page is 404.
    let (c, _, _) = request(&env, PUBLIC, "GET", "/-/clusters", &auth).await;
    assert_eq!(c, 200);
    let (c, h, b) = request(&env, PUBLIC, "GET", "/-/api/v1/pods", &auth).await;
    assert_status(c, &h, &b, 404, "NotFound");
    let (c, h, b) = request(&env, PUBLIC, "GET", "/clusters/gamma/api", &auth).await;
    assert_status(c, &h, &b, 404, "NotFound");
    assert!(
        env.dev.alpha.record.traffic().is_empty() && env.dev.beta.record.traffic().is_empty(),
        "nothing may reach a cluster"
    );
    env.dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_coalesced_authority_for_another_cluster_is_421() {
    use http_body_util::{BodyExt, Empty};
    let env = dev_env().await;
    let tok = bearer(&env.dev.token("alice"));
    let tls = tls_connect(env.dev.relay_addr, &env.relay_ca(), ALPHA_SNI, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = |authority: &str| {
        http::Request::get(format!(
            "https://{authority}/api/v1/namespaces/default/pods"
        ))
        .header("authorization", &tok)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap()
    };
    let ok = send
        .send_request(req("alpha.relay.localhost"))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let resp = send
        .send_request(req("beta.relay.localhost"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 421);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["reason"],
        "Misdirected"
    );
    assert!(env.dev.beta.record.traffic().is_empty());
    env.dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_hygiene_in_impersonate_and_passthrough_modes() {
    let env = dev_env().await;
    let alice = env.dev.token("alice");
    let tok = bearer(&alice);
    let relay_token = std::fs::read_to_string(env.dev.dir.join("relay-token")).unwrap();
    let hostile = [
        ("Authorization", tok.as_str()),
        ("X-Remote-User", "admin"),
        ("X-Remote-Group", "system:masters"),
        ("X-Remote-Extra-Scopes", "all"),
        (
            "Connection",
            "keep-alive, X-Custom, Authorization, Audit-Id",
        ),
        ("X-Custom", "hop"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Original-URL", "/clusters/beta/api"),
        ("Audit-ID", "my-audit-id-1"),
        ("Accept", "application/json"),
    ];
    // Impersonate mode (alpha): exactly the relay's credential and identity headers.
    let (c, head, _) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/alpha/api/v1/namespaces/default/pods",
        &hostile,
    )
    .await;
    assert_eq!(c, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("audit-id: my-audit-id-1"),
        "{head}"
    );
    let r = env
        .dev
        .alpha
        .record
        .matching("/api/v1/namespaces/default/pods")
        .pop()
        .unwrap();
    assert_eq!(
        r.header_values("authorization"),
        vec![format!("Bearer {}", relay_token.trim())]
    );
    assert_eq!(r.header_values("impersonate-user"), vec!["alice"]);
    assert_eq!(r.header_values("impersonate-group"), vec!["dev:admins"]);
    for (name, _) in &r.headers {
        assert!(!name.starts_with("x-remote-"), "{name} reached the cluster");
        assert!(
            !["x-custom", "x-forwarded-host", "x-original-url"].contains(&name.as_str()),
            "{name} reached the cluster"
        );
    }
    assert_eq!(r.header("x-forwarded-for"), Some("203.0.113.7, 127.0.0.1"));
    assert_eq!(r.header("audit-id"), Some("my-audit-id-1"));
    assert_eq!(r.header("accept"), Some("application/json"));
    assert_eq!(r.user.as_ref().unwrap().username, "alice");

    // Passthrough mode (beta): the caller's own token, no impersonation, relay token never sent.
    let (c, _, _) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/beta/api/v1/namespaces/default/pods",
        &hostile,
    )
    .await;
    assert_eq!(c, 200);
    let r = env
        .dev
        .beta
        .record
        .matching("/api/v1/namespaces/default/pods")
        .pop()
        .unwrap();
    assert_eq!(r.header_values("authorization"), vec![tok.clone()]);
    assert!(r
        .headers
        .iter()
        .all(|(n, v)| !n.starts_with("impersonate-") && !v.contains(relay_token.trim())));

    // A minted Audit-ID when the client sends none, returned to the client.
    let (_, head, _) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/beta/version",
        &[("Authorization", &tok)],
    )
    .await;
    let minted = head
        .lines()
        .find_map(|l| l.strip_prefix("audit-id: "))
        .expect("audit-id returned")
        .trim()
        .to_owned();
    assert_eq!(minted.len(), 36);
    assert_eq!(
        env.dev
            .beta
            .record
            .traffic()
            .last()
            .unwrap()
            .header("audit-id"),
        Some(minted.as_str())
    );
    env.dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_impersonation_is_refused_and_underscored_names_rejected() {
    let env = dev_env().await;
    let tok = bearer(&env.dev.token("alice"));
    // Default deny (docs/architecture.md "Identity and upstream credentials"): no dev rule allows
    // `kubectl --as`, in any spelling.
    for extra in [
        vec![("Impersonate-User", "admin")],
        vec![
            ("impersonate-user", "admin"),
            ("impersonate-group", "system:masters"),
        ],
        vec![
            ("IMPERSONATE-USER", "admin"),
            ("IMPERSONATE-EXTRA-scopes", "x"),
        ],
        vec![("Impersonate-User", "admin"), ("Impersonate-Uid", "1")],
    ] {
        let mut hs = vec![("Authorization", tok.as_str())];
        hs.extend(extra);
        let (c, h, b) = request(&env, PUBLIC, "GET", "/clusters/alpha/api/v1/pods", &hs).await;
        assert_status(c, &h, &b, 403, "Forbidden");
    }
    // Group, uid or extra without a user is malformed, as kube-apiserver treats it.
    for (name, value) in [
        ("impersonate-group", "system:masters"),
        ("IMPERSONATE-EXTRA-scopes", "x"),
        ("Impersonate-Uid", "1"),
    ] {
        let (c, h, b) = request(
            &env,
            PUBLIC,
            "GET",
            "/clusters/alpha/api/v1/pods",
            &[("Authorization", &tok), (name, value)],
        )
        .await;
        assert_status(c, &h, &b, 400, "BadRequest");
    }
    let (c, h, b) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/alpha/api/v1/pods",
        &[
            ("Authorization", &tok),
            ("Impersonate_Group", "system:masters"),
        ],
    )
    .await;
    assert_status(c, &h, &b, 400, "BadRequest");
    assert!(env.dev.alpha.record.traffic().is_empty());
    env.dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_401_with_challenge() {
    use base64::Engine as _;
    let env = dev_env().await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |extra: Value| {
        let mut c = json!({"sub": "alice", "aud": "kube-relay", "iss": env.dev.issuer.issuer_url(), "iat": now, "nbf": now, "exp": now + 600});
        // A null asks the dev issuer to leave the claim out (instead of filling a default).
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let good = env.dev.token("alice");
    let parts: Vec<&str> = good.split('.').collect();
    let kid = env.dev.issuer.kid();
    let mut cases: Vec<(&str, String)> = vec![
        ("no token", String::new()),
        ("garbage", "not-a-jwt".into()),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "kid": kid})),
                b64(&claims(json!({})))
            ),
        ),
        (
            "alg None",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "None", "kid": kid})),
                b64(&claims(json!({})))
            ),
        ),
        (
            "HS256 with the public key",
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "HS256", "kid": kid})),
                b64(&claims(json!({}))),
                parts[2]
            ),
        ),
        (
            "tampered payload",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(&claims(json!({"sub": "admin"}))),
                parts[2]
            ),
        ),
        (
            "huge",
            format!("{}.{}.{}", parts[0], "A".repeat(70_000), parts[2]),
        ),
    ];
    for (what, extra) in [
        ("expired", json!({"exp": now - 120})),
        ("not yet valid", json!({"nbf": now + 600})),
        ("wrong audience", json!({"aud": "someone-else"})),
        ("no audience", json!({"aud": null})),
        ("no exp", json!({"exp": null})),
        ("foreign issuer", json!({"iss": "https://evil.example"})),
    ] {
        cases.push((what, env.dev.issuer.mint(claims(extra))));
    }
    // Header-supplied keys are never used (E3): the kid is only a lookup key.
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("attacker-kid".into());
    h.jku = Some("https://evil.example/jwks.json".into());
    h.x5u = Some("https://evil.example/cert.pem".into());
    cases.push((
        "jku/x5u header keys",
        env.dev
            .issuer
            .mint_with_header(h, claims(json!({})))
            .unwrap(),
    ));
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("../../../../etc/passwd".into());
    cases.push((
        "path traversal kid",
        env.dev
            .issuer
            .mint_with_header(h, claims(json!({})))
            .unwrap(),
    ));
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("k".repeat(4096));
    cases.push((
        "huge kid",
        env.dev
            .issuer
            .mint_with_header(h, claims(json!({})))
            .unwrap(),
    ));
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("unknown-kid".into());
    cases.push((
        "unknown kid",
        env.dev
            .issuer
            .mint_with_header(h, claims(json!({})))
            .unwrap(),
    ));
    for (what, token) in &cases {
        let hdr = bearer(token);
        let headers: Vec<(&str, &str)> = if token.is_empty() {
            vec![]
        } else {
            vec![("Authorization", hdr.as_str())]
        };
        let (c, head, body) = request(
            &env,
            PUBLIC,
            "GET",
            "/clusters/beta/api/v1/namespaces/default/pods",
            &headers,
        )
        .await;
        if *what == "huge" {
            // Refused before any parsing: by the token size rule (401) or the header limit (431).
            assert!(c == 401 || c == 431, "{what}: {c}");
            continue;
        }
        assert_eq!(c, 401, "{what} was not refused");
        assert_status(c, &head, &body, 401, "Unauthorized");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{what}: {head}"
        );
        assert_eq!(
            status_of(&body)["message"],
            "Unauthorized",
            "{what}: no detail on the wire"
        );
    }
    assert!(
        env.dev.beta.record.traffic().is_empty(),
        "no bad token may reach a cluster"
    );
    // The dev issuer is `kind: oidc` without `require_nbf`: `nbf` is checked when present
    // (above: a future one is refused) and not required, as kube-apiserver does.
    let no_nbf = env.dev.issuer.mint(claims(json!({"nbf": null})));
    let hdr = bearer(&no_nbf);
    let (c, _, body) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/beta/api/v1/namespaces/default/pods",
        &[("Authorization", hdr.as_str())],
    )
    .await;
    assert_eq!(c, 200, "an OIDC token without nbf is admitted: {body}");
    // A 40 KiB header block is refused as a Status, before the token is even looked at.
    let big = "x".repeat(40 * 1024);
    let (c, head, body) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/beta/api",
        &[("X-Padding", &big)],
    )
    .await;
    assert_status(c, &head, &body, 431, "RequestHeaderFieldsTooLarge");
    env.dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_default_deny_and_verbs() {
    let env = dev_env().await;
    let bob = bearer(&env.dev.token("bob"));
    let carol = bearer(&env.dev.token("carol"));
    // bob may read beta...
    let (c, _, _) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/beta/api/v1/namespaces/default/pods",
        &[("Authorization", bob.as_str())],
    )
    .await;
    assert_eq!(c, 200);
    // ...but not write it, not exec on it (exec is create, over GET too), and not use alpha.
    for (method, target, extra) in [
        (
            "DELETE",
            "/clusters/beta/api/v1/namespaces/default/pods/web-0",
            None,
        ),
        (
            "POST",
            "/clusters/beta/api/v1/namespaces/default/configmaps",
            None,
        ),
        (
            "GET",
            "/clusters/beta/api/v1/namespaces/default/pods/web-0/exec?command=ls&stdout=true",
            Some(("Upgrade", "websocket")),
        ),
        (
            "POST",
            "/clusters/beta/api/v1/namespaces/default/pods/web-0/exec?command=ls&stdout=true",
            Some(("Upgrade", "SPDY/3.1")),
        ),
        (
            "GET",
            "/clusters/alpha/api/v1/namespaces/default/pods",
            None,
        ),
    ] {
        let mut hs = vec![("Authorization", bob.as_str())];
        if let Some(x) = extra {
            hs.push(x);
            hs.push(("Connection", "Upgrade"));
            hs.push(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="));
            hs.push(("Sec-WebSocket-Version", "13"));
        }
        let (c, head, body) = request(&env, PUBLIC, method, target, &hs).await;
        assert_status(c, &head, &body, 403, "Forbidden");
    }
    // carol is valid but named by no rule anywhere.
    let (c, head, body) = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/beta/api/v1/namespaces/default/pods",
        &[("Authorization", carol.as_str())],
    )
    .await;
    assert_status(c, &head, &body, 403, "Forbidden");
    assert_eq!(
        env.dev.beta.record.traffic().len(),
        1,
        "only bob's read reached beta"
    );
    assert!(env.dev.alpha.record.traffic().is_empty());
    env.dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_and_spdy_on_streaming_subresources() {
    let env = dev_env().await;
    let tok = bearer(&env.dev.token("alice"));
    for (target, upgrade) in [
        (
            "/clusters/alpha/api/v1/namespaces/default/pods/web-0/exec?command=ls",
            "h2c",
        ),
        (
            "/clusters/alpha/api/v1/namespaces/default/pods/web-0/exec?command=ls",
            "foo",
        ),
        (
            "/clusters/alpha/api/v1/namespaces/default/pods",
            "websocket",
        ),
        (
            "/clusters/alpha/api/v1/namespaces/default/pods/web-0/log",
            "SPDY/3.1",
        ),
        (
            "/clusters/alpha/apis/evil.io/v1/namespaces/default/pods/web-0/exec",
            "websocket",
        ),
    ] {
        let raw = format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {tok}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let (c, h, b) = parse_response(&raw_exchange(&env, PUBLIC, raw.as_bytes()).await);
        assert_status(c, &h, &b, 400, "BadRequest");
        assert!(h.to_ascii_lowercase().contains("connection: close"), "{h}");
    }
    assert!(env.dev.alpha.record.traffic().is_empty());
    env.dev.stop().await;
}

/// CVE-2018-1002105: an upgrade answered with a non-101, then a pipelined request on the same
/// client connection. The second request must never reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_101_upgrade_answer_closes_and_pipelined_bytes_never_reach_upstream() {
    for answer in [
        &b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            [..],
        &b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"[..],
        &b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..],
    ] {
        let answer: &'static [u8] = Box::leak(answer.to_vec().into_boxed_slice());
        let up = FakeUpstream::start(answer).await;
        let relay = CustomRelay::start(&[("fake", &up)]).await;
        let tok = relay.token("alice");
        let raw = format!(
            "GET /clusters/fake/api/v1/namespaces/default/pods/web-0/exec?command=sh&stdin=true HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {tok}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n\
             GET /clusters/fake/api/v1/secrets HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {tok}\r\n\r\n"
        );
        let resp = relay.exchange("localhost", raw.as_bytes()).await;
        let status_line = resp.lines().next().unwrap_or_default().to_owned();
        assert!(!status_line.contains("101"), "{resp}");
        assert_eq!(
            resp.matches("HTTP/1.1 ").count(),
            1,
            "exactly one answer, then close: {resp}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = up.received_text();
        assert!(seen.contains("/exec?command=sh"), "{seen}");
        assert!(
            !seen.contains("/api/v1/secrets"),
            "pipelined request reached the upstream:\n{seen}"
        );
    }
}

/// Redirects are never followed; for upgrades they become an error (docs/security.md A5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let up = FakeUpstream::start(
        b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/steal\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let relay = CustomRelay::start(&[("fake", &up)]).await;
    let tok = relay.token("alice");
    let raw = format!(
        "GET /clusters/fake/api/v1/namespaces/default/pods/web-0/exec?command=sh HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {tok}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
    );
    let resp = relay.exchange("localhost", raw.as_bytes()).await;
    let (c, h, b) = parse_response(&resp);
    assert_eq!(c, 502, "{resp}");
    assert!(!h.to_ascii_lowercase().contains("location"), "{h}");
    assert_eq!(status_of(&b)["details"]["name"], "fake");
    // A REST redirect is passed back as it came, never followed.
    let up2 = FakeUpstream::start(
        b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/steal\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let relay2 = CustomRelay::start(&[("fake", &up2)]).await;
    let raw = format!("GET /clusters/fake/api HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", relay2.token("alice"));
    let resp = relay2.exchange("localhost", raw.as_bytes()).await;
    assert_eq!(parse_response(&resp).0, 302);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *up2.connections.lock().unwrap(),
        1,
        "no second connection to follow the redirect"
    );
    assert_eq!(up2.received_text().matches("GET ").count(), 1);
}

/// A 101 that does not match what was asked for is not a tunnel (docs/security.md A1, C5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_101_is_refused() {
    for answer in [
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"[..],
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bogus\r\n\r\n"[..],
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n"[..],
    ] {
        let answer: &'static [u8] = Box::leak(answer.to_vec().into_boxed_slice());
        let up = FakeUpstream::start(answer).await;
        let relay = CustomRelay::start(&[("fake", &up)]).await;
        let raw = format!(
            "GET /clusters/fake/api/v1/namespaces/default/pods/web-0/exec?command=sh HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\nSMUGGLED",
            relay.token("alice")
        );
        let resp = relay.exchange("localhost", raw.as_bytes()).await;
        assert_eq!(parse_response(&resp).0, 502, "{resp}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!up.received_text().contains("SMUGGLED"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_is_503_naming_it() {
    // A cluster whose API server address refuses connections: a port held bound but never
    // listening, so no other socket can take it while the test runs.
    let up = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = closed.local_addr().unwrap().port();
    let fake = FakeUpstream {
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        ..up
    };
    let relay = CustomRelay::start(&[("gone", &fake)]).await;
    let raw = format!("GET /clusters/gone/api HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", relay.token("alice"));
    let (c, h, b) = parse_response(&relay.exchange("localhost", raw.as_bytes()).await);
    assert_status(c, &h, &b, 503, "ServiceUnavailable");
    let s = status_of(&b);
    assert_eq!(s["details"]["name"], "gone");
    assert!(s["message"].as_str().unwrap().contains("gone"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_on_the_admin_listener() {
    let env = dev_env().await;
    let tok = bearer(&env.dev.token("alice"));
    let _ = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/alpha/api/v1/namespaces/default/pods",
        &[("Authorization", &tok)],
    )
    .await;
    let _ = request(
        &env,
        PUBLIC,
        "GET",
        "/clusters/alpha/api/v1/namespaces/default/pods",
        &[],
    )
    .await;
    let admin = env.dev.admin_addr.unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf))
            .await
            .unwrap()
            .unwrap();
        buf
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    let m = get("/metrics").await;
    assert!(
        m.contains(r#"relay_requests_total{cluster="alpha",verb="LIST",code="200"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"relay_requests_total{cluster="alpha",verb="GET",code="401"}"#)
            || m.contains(r#"code="401""#),
        "{m}"
    );
    assert!(m.contains("relay_request_duration_seconds_bucket"), "{m}");
    assert!(
        m.contains(r#"relay_authn_total{result="failure",reason="missing"} 1"#),
        "{m}"
    );
    assert!(!m.contains(&tok[7..]), "tokens never reach metrics");
    env.dev.stop().await;
}

/// A response hyper cannot parse fails that exchange with a 502 naming the cluster, and the
/// connection it came on is never used again (docs/security.md C5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_response_is_502_and_its_connection_is_dropped() {
    let up = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello").await;
    let relay = CustomRelay::start(&[("fake", &up)]).await;
    for _ in 0..2 {
        let raw = format!(
            "GET /clusters/fake/api HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            relay.token("alice")
        );
        let (c, h, b) = parse_response(&relay.exchange("localhost", raw.as_bytes()).await);
        assert_status(c, &h, &b, 502, "InternalError");
        assert_eq!(status_of(&b)["details"]["name"], "fake");
    }
    assert_eq!(
        *up.connections.lock().unwrap(),
        2,
        "a connection that sent garbage is never reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_running_gauge_follows_a_live_watch() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = dev_env().await;
    let tok = bearer(&env.dev.token("alice"));
    let (s, got) = open_watch(&env, &tok).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{got}"
    );
    let admin = env.dev.admin_addr.unwrap();
    let gauge = |want: &'static str| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut m = String::new();
            let _ = c.read_to_string(&mut m).await;
            let line = format!(
                "relay_longrunning_requests{{cluster=\"alpha\",protocol=\"watch\"}} {want}"
            );
            if m.contains(&line) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never saw {line} in:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    gauge("1").await;
    drop(s);
    gauge("0").await;
    env.dev.stop().await;
}

/// Browsers put the bearer token in `Sec-WebSocket-Protocol`; the relay validates it like any
/// token and never forwards or echoes the entry (docs/security.md B7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bearer_subprotocol_is_validated_and_stripped() {
    use base64::Engine as _;
    let env = dev_env().await;
    let enc = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
    let ws = |protocols: String, auth: Option<&str>| {
        let mut r = format!(
            "GET /clusters/beta/api/v1/namespaces/default/pods/web-0/exec?command=echo&command=hi&stdout=true HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocols}\r\n"
        );
        if let Some(a) = auth {
            r.push_str(&format!("Authorization: Bearer {a}\r\n"));
        }
        r.push_str("\r\n");
        r
    };
    let alice = env.dev.token("alice");
    // Token only in the subprotocol: accepted, and the entry is gone upstream and in the answer.
    let raw = ws(
        format!(
            "base64url.bearer.authorization.k8s.io.{}, v4.channel.k8s.io",
            enc(&alice)
        ),
        None,
    );
    let resp = raw_exchange(&env, PUBLIC, raw.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    let head = resp.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(!head.contains("bearer.authorization"), "{head}");
    let r = env
        .dev
        .beta
        .record
        .matching("/api/v1/namespaces/default/pods/web-0/exec")
        .pop()
        .unwrap();
    assert_eq!(
        r.header("sec-websocket-protocol"),
        Some("v4.channel.k8s.io")
    );
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {alice}").as_str())
    );
    // A forged token in the subprotocol beside a valid header: the header decides, the entry
    // is stripped.
    env.dev.beta.record.clear();
    let raw = ws(
        format!(
            "base64url.bearer.authorization.k8s.io.{}, v4.channel.k8s.io",
            enc("forged.token.here")
        ),
        Some(&alice),
    );
    let resp = raw_exchange(&env, PUBLIC, raw.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    let r = env.dev.beta.record.traffic().pop().unwrap();
    assert!(r.headers.iter().all(|(_, v)| !v.contains("forged")));
    // A forged token alone is refused before anything reaches the cluster.
    env.dev.beta.record.clear();
    let raw = ws(
        format!(
            "base64url.bearer.authorization.k8s.io.{}, v4.channel.k8s.io",
            enc("forged.token.here")
        ),
        None,
    );
    let (c, _, _) = parse_response(&raw_exchange(&env, PUBLIC, raw.as_bytes()).await);
    assert_eq!(c, 401);
    assert!(env.dev.beta.record.traffic().is_empty());
    env.dev.stop().await;
}

/// `clusters[].upstream_protocol` (docs/perf "Why short requests go over HTTP/1.1"): by default
/// (`mixed`) short requests reach the cluster over HTTP/1.1 keep-alive connections and watches
/// over HTTP/2; `http2` puts every request on HTTP/2, `http1` every request on HTTP/1.1. More
/// requests in a row than the HTTP/1.1 slots (`upstream::HTTP1_CONNECTIONS`) all still go over
/// HTTP/1.1: a slot comes back when its answer is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_protocol_sends_short_requests_over_http1_and_watches_over_http2() {
    let env = dev_env().await;
    let tok = bearer(&env.dev.token("alice"));
    let pod = "/api/v1/namespaces/default/pods/web-0";
    let watch = "/api/v1/namespaces/default/pods?watch=true";
    let versions = |prefix: &str| -> Vec<http::Version> {
        env.dev
            .alpha
            .record
            .matching(prefix)
            .iter()
            .map(|r| r.version)
            .collect()
    };
    let get = || async {
        let target = format!("/clusters/alpha{pod}");
        let (code, head, _) =
            request(&env, PUBLIC, "GET", &target, &[("Authorization", &tok)]).await;
        assert_eq!(code, 200, "{head}");
    };
    // Opens a watch, reads its first event, and closes it.
    let watch_once = || async {
        drop(open_watch(&env, &tok).await);
    };
    let set = |value: &str| {
        let config = env.dev.dir.join("relay.yaml");
        let text = std::fs::read_to_string(&config).unwrap();
        let text: String = text
            .lines()
            .filter(|l| !l.contains("upstream_protocol"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(
            &config,
            text.replacen(
                "    recording: required\n",
                &format!("    recording: required\n    upstream_protocol: {value}\n"),
                1,
            ),
        )
        .unwrap();
    };

    // mixed, the default.
    let n = kube_relay::upstream::HTTP1_CONNECTIONS + 20;
    for _ in 0..n {
        get().await;
    }
    let v = versions(pod);
    assert_eq!(v.len(), n);
    assert!(v.iter().all(|v| *v == http::Version::HTTP_11), "{v:?}");
    watch_once().await;
    assert_eq!(versions(watch), [http::Version::HTTP_2]);

    // http2: the short request too.
    set("http2");
    env.dev.relay_handle.reload().await.expect("http2 loads");
    get().await;
    assert_eq!(versions(pod).last(), Some(&http::Version::HTTP_2));

    // http1: the watch too.
    set("http1");
    env.dev.relay_handle.reload().await.expect("http1 loads");
    get().await;
    assert_eq!(versions(pod).last(), Some(&http::Version::HTTP_11));
    watch_once().await;
    assert_eq!(versions(watch).last(), Some(&http::Version::HTTP_11));
    env.dev.stop().await;
}

/// Opens a watch of alpha's pods over HTTP/1.1 and reads until its first `ADDED` event (the
/// initial events arrive as chunks, flushed at once); returns the connection and what it read.
async fn open_watch(
    env: &crate::support::Env,
    tok: &str,
) -> (impl tokio::io::AsyncRead + tokio::io::AsyncWrite, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(env.dev.relay_addr, &env.relay_ca(), PUBLIC, &[b"http/1.1"]).await;
    let req = format!("GET /clusters/alpha/api/v1/namespaces/default/pods?watch=true HTTP/1.1\r\nHost: localhost\r\nAuthorization: {tok}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let mut got = String::new();
    while !got.contains("\"ADDED\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("watch events arrive")
            .unwrap();
        assert!(n > 0, "watch closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    (s, got)
}
