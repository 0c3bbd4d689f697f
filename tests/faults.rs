//! Fault scenarios (security.md (b) 1 and 2): an upstream that black-holes connections or never
//! answers makes requests fail fast with a Status naming the cluster, never hang; other clusters
//! are unaffected. (Refused and flapping upstreams: tests/lifecycle.rs; IdP outages:
//! tests/identity.rs.)

mod support;

use std::time::{Duration, Instant};

use support::*;

fn get(relay: &CustomRelay, cluster: &str) -> String {
    format!(
        "GET /clusters/{cluster}/api HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        relay.token("alice")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_and_silent_upstreams_fail_fast_and_alone() {
    // Accepts TCP, never speaks TLS.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let _holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    // Completes TLS and reads the request, never answers.
    let silent = FakeUpstream::start(b"").await;
    let healthy = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
    let black = FakeUpstream {
        addr: hole_addr,
        ca_pem: silent.ca_pem.clone(),
        received: Default::default(),
        connections: Default::default(),
    };
    let relay = CustomRelay::start_with(
        &[("hole", &black), ("silent", &silent), ("ok", &healthy)],
        "timeouts: {connect: 500ms, response_header: 1s, health_interval: 1h}\n",
    )
    .await;

    for (cluster, codes) in [("hole", [503u16, 504]), ("silent", [504, 503])] {
        let started = Instant::now();
        let resp = relay
            .exchange("localhost", get(&relay, cluster).as_bytes())
            .await;
        let (code, _, body) = parse_response(&resp);
        assert!(codes.contains(&code), "{cluster}: {code} {body}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{cluster} took {:?}",
            started.elapsed()
        );
        assert!(
            body.contains(&format!("\"name\":\"{cluster}\"")),
            "{cluster}: {body}"
        );
    }
    // The healthy cluster is unaffected, also while the others hang.
    let started = Instant::now();
    let (code, _, _) = parse_response(
        &relay
            .exchange("localhost", get(&relay, "ok").as_bytes())
            .await,
    );
    assert_eq!(code, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Scenario 3: an IdP that answers garbage leaves the relay not ready, refusing tokens fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_answering_garbage_keeps_the_relay_unready_and_refusing_fast() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let garbage = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"keys\":[").await;
    let upstream = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("idp-ca.crt"), &garbage.ca_pem).unwrap();
    // A relay whose only issuer is the broken IdP.
    let ca = kube_sim::pki::TestCa::new("relay CA").unwrap();
    let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.path().join("relay.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("relay.key"), &leaf.key_pem).unwrap();
    std::fs::write(dir.path().join("up-ca.crt"), &upstream.ca_pem).unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\npublic_url: https://localhost\ntls: {{cert_file: relay.crt, key_file: relay.key}}\n\
         admin: {{listen: 127.0.0.1:0}}\naudit: {{path: off}}\n\
         identity: {{issuers: [{{name: broken, kind: oidc, issuer: \"https://127.0.0.1:{}\", audiences: [x], ca_file: idp-ca.crt}}]}}\n\
         clusters: [{{name: ok, server: \"https://fake.upstream.test:{p}\", connect: \"127.0.0.1:{p}\", ca_file: up-ca.crt, upstream_auth: {{mode: passthrough}}, access: [{{users: [broken/x]}}]}}]\n",
        garbage.addr.port(),
        p = upstream.addr.port()
    );
    let path = dir.path().join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    let app = kube_relay::app::App::bind(kube_relay::config::load(&path).unwrap())
        .await
        .unwrap();
    let admin = app.admin_addr().unwrap();
    let addr = app.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    // Not ready, and saying why.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut m = String::new();
        let _ = c.read_to_string(&mut m).await;
        if m.starts_with("HTTP/1.1 503") && m.contains("no usable signing keys") {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A token for that issuer is refused quickly, whatever the IdP says.
    let issuer = kube_sim::issuer::DevIssuer::generate(
        &format!("https://127.0.0.1:{}", garbage.addr.port()),
        kube_sim::issuer::KeyAlg::Es256,
    )
    .unwrap();
    let tok = issuer.mint(serde_json::json!({"sub": "x", "aud": "x"}));
    let cas = rustls_pki_types::pem::PemObject::pem_slice_iter(ca.cert_pem().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let started = Instant::now();
    let mut s = tls_connect(addr, &cas, "localhost", &[b"http/1.1"]).await;
    s.write_all(format!("GET /clusters/ok/api HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
    assert_eq!(parse_response(&String::from_utf8_lossy(&buf)).0, 401);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    shutdown.cancel();
}
