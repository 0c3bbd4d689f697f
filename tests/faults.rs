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
