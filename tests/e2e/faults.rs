//! Fault scenarios (docs/security.md scenarios 1 and 2): an upstream that black-holes connections
//! or never
//! answers makes requests fail fast with a Status naming the cluster, never hang; other clusters
//! are unaffected; an API server refusing requests unprocessed gets them again, a bounded
//! number of times. (Refused and flapping upstreams: tests/e2e/lifecycle.rs; IdP outages:
//! tests/e2e/identity.rs.)

use std::time::Duration;

use tokio::time::Instant;

use crate::support::*;

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
            started.elapsed() < Duration::from_secs(7),
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
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A relay whose only issuer is `idp` (a scripted, broken IdP) in front of a healthy cluster.
struct BrokenIdpRelay {
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    issuer_url: String,
    shutdown: tokio_util::sync::CancellationToken,
    _dir: tempfile::TempDir,
    _upstream: FakeUpstream,
}

impl Drop for BrokenIdpRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn relay_with_broken_idp(idp: &FakeUpstream) -> BrokenIdpRelay {
    let upstream = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = kube_sim::pki::TestCa::new("relay CA").unwrap();
    let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.path().join("relay.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("relay.key"), &leaf.key_pem).unwrap();
    std::fs::write(dir.path().join("up-ca.crt"), &upstream.ca_pem).unwrap();
    std::fs::write(dir.path().join("idp-ca.crt"), &idp.ca_pem).unwrap();
    let issuer_url = format!("https://127.0.0.1:{}", idp.addr.port());
    let yaml = format!(
        "listen: 127.0.0.1:0\npublic_url: https://localhost\ntls: {{cert_file: relay.crt, key_file: relay.key}}\n\
         admin: {{listen: 127.0.0.1:0}}\naudit: {{path: off}}\n\
         identity: {{issuers: [{{name: broken, kind: oidc, issuer: \"{issuer_url}\", audiences: [x], ca_file: idp-ca.crt}}]}}\n\
         clusters: [{{name: ok, server: \"https://fake.upstream.test:{p}\", connect: \"127.0.0.1:{p}\", ca_file: up-ca.crt, upstream_auth: {{mode: passthrough}}, access: [{{users: [broken/x]}}]}}]\n",
        p = upstream.addr.port()
    );
    let path = dir.path().join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    let app = kube_relay::server::App::bind(kube_relay::config::load(&path).unwrap())
        .await
        .unwrap();
    let admin = app.admin_addr().unwrap();
    let addr = app.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    let ca = rustls_pki_types::pem::PemObject::pem_slice_iter(ca.cert_pem().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    BrokenIdpRelay {
        addr,
        admin,
        ca,
        issuer_url,
        shutdown,
        _dir: dir,
        _upstream: upstream,
    }
}

impl BrokenIdpRelay {
    async fn readyz(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut m = String::new();
        let _ = c.read_to_string(&mut m).await;
        m
    }

    /// A request with a token of the broken issuer: (status, how long it took).
    async fn request(&self) -> (u16, Duration) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let issuer = kube_sim::issuer::DevIssuer::generate(
            &self.issuer_url,
            kube_sim::issuer::KeyAlg::Es256,
        )
        .unwrap();
        let tok = issuer.mint(serde_json::json!({"sub": "x", "aud": "x"}));
        let started = Instant::now();
        let mut s = tls_connect(self.addr, &self.ca, "localhost", &[b"http/1.1"]).await;
        s.write_all(format!("GET /clusters/ok/api HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
        (
            parse_response(&String::from_utf8_lossy(&buf)).0,
            started.elapsed(),
        )
    }
}

/// Scenario 3: an IdP that answers garbage leaves the relay unready, refusing tokens fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_answering_garbage_keeps_the_relay_unready_and_refusing_fast() {
    let garbage = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"keys\":[").await;
    let r = relay_with_broken_idp(&garbage).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = r.readyz().await;
        if m.starts_with("HTTP/1.1 503") && m.contains("no usable signing keys") {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, took) = r.request().await;
    assert_eq!(code, 401);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// Scenario 3: an IdP that accepts and never answers: a request with an unknown key waits for
/// the fetch it triggered at most ~2 s (not the 10 s fetch timeout), then gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_idp_costs_a_request_at_most_a_bounded_wait() {
    let hanging = FakeUpstream::start(b"").await;
    let r = relay_with_broken_idp(&hanging).await;
    assert!(r.readyz().await.starts_with("HTTP/1.1 503"));
    let (code, took) = r.request().await;
    assert_eq!(code, 401);
    assert!(
        took < Duration::from_secs(7),
        "a request waited {took:?} on a hanging IdP"
    );
}

/// An HTTP/2 API server that resets the first `refuse` user requests with REFUSED_STREAM
/// (RFC 9113 §8.7: not processed) and answers the rest; health probes get a plain 200. Returns
/// its address, its CA and the count of user requests it saw.
async fn refusing_h2_upstream(
    refuse: usize,
) -> (
    std::net::SocketAddr,
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let ca = kube_sim::pki::TestCa::new("refusing upstream CA").unwrap();
    let leaf = ca.issue(&["fake.upstream.test", "127.0.0.1"]).unwrap();
    let mut tls = (*kube_sim::server::tls_config(&leaf).unwrap()).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, seen) = (acceptor.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let probe = req.headers().get("user-agent").is_some_and(|v| {
                        v.as_bytes() == kube_relay::upstream::health::PROBE_USER_AGENT.as_bytes()
                    });
                    if !probe && seen.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let head = http::Response::builder()
                        .header("content-type", "application/json")
                        .header("content-length", "2")
                        .body(())
                        .unwrap();
                    if let Ok(mut body) = respond.send_response(head, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"{}"), true);
                    }
                }
            });
        }
    });
    (addr, ca.cert_pem().to_owned(), seen)
}

/// docs/security.md scenario 1: a request the API server refused unprocessed is sent again,
/// more than once if need be (a draining server's fresh connection can refuse it too), but a
/// bounded number of times: a server that refuses everything gets, after four attempts, a 503
/// naming the cluster with `Retry-After` (client-go then retries by itself), never a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_unprocessed_are_resent_a_bounded_number_of_times() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (mostly_addr, mostly_ca, mostly_seen) = refusing_h2_upstream(3).await;
    let (always_addr, always_ca, always_seen) = refusing_h2_upstream(usize::MAX).await;
    let (often_addr, often_ca, often_seen) = refusing_h2_upstream(6).await;
    let mut clusters = String::from("clusters:\n");
    for (name, addr, ca) in [
        ("mostly", mostly_addr, &mostly_ca),
        ("always", always_addr, &always_ca),
        ("often", often_addr, &often_ca),
    ] {
        let ca_path = dir.path().join(format!("{name}-ca.crt"));
        std::fs::write(&ca_path, ca).unwrap();
        clusters.push_str(&format!(
            "  - {{name: {name}, server: \"https://fake.upstream.test:{port}\", connect: \"127.0.0.1:{port}\", ca_file: \"{ca}\", upstream_protocol: http2, upstream_auth: {{mode: passthrough}}, access: [{{users: [dev/alice]}}]}}\n",
            port = addr.port(),
            ca = ca_path.display()
        ));
    }
    clusters.push_str("timeouts: {health_interval: 1h}\n");
    let relay = CustomRelay::start_with(&[], &clusters).await;

    // Refused three times, answered the fourth.
    let (code, _, body) = parse_response(
        &relay
            .exchange("localhost", get(&relay, "mostly").as_bytes())
            .await,
    );
    assert_eq!((code, body.as_str()), (200, "{}"));
    assert_eq!(mostly_seen.load(Ordering::SeqCst), 4);

    // Refused every time: four attempts, then a Status naming the cluster.
    let (code, head, body) = parse_response(
        &relay
            .exchange("localhost", get(&relay, "always").as_bytes())
            .await,
    );
    assert_eq!(code, 503, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{head}"
    );
    assert!(body.contains("\"name\":\"always\""), "{body}");
    assert!(body.contains("refused the request"), "{body}");
    assert_eq!(always_seen.load(Ordering::SeqCst), 4);

    // kubectl meets that 503 and sends the request again after Retry-After by itself: refused
    // six times, it gets its answer on its second request to the relay.
    let relay_dir = relay.audit_path().parent().unwrap().to_owned();
    let kubeconfig = relay_dir.join("often.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: often\n  cluster:\n    server: https://localhost:{port}\n    certificate-authority: {ca}\nusers:\n- name: alice\n  user:\n    token: {token}\ncontexts:\n- name: often\n  context: {{cluster: often, user: alice}}\ncurrent-context: often\n",
            port = relay.addr.port(),
            ca = relay_dir.join("ca.crt").display(),
            token = relay.token("alice"),
        ),
    )
    .unwrap();
    let mut kubectl = std::process::Command::new(kubectl("1.33"));
    kubectl
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "get",
            "--raw",
            "/clusters/often/api",
            "--request-timeout=30s",
        ])
        .env("HOME", &relay_dir)
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || run(kubectl, None, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(ok(&out, "kubectl get --raw").trim(), "{}");
    assert_eq!(often_seen.load(Ordering::SeqCst), 7);

    let metrics = admin_get(relay.admin, "/metrics").await;
    for sample in [
        // 3 for `mostly`, 3 for `always`, 3 and 2 for kubectl's two requests to `often`.
        "relay_upstream_retries_total 11",
        "relay_upstream_errors_total{cluster=\"often\",reason=\"refused\"} 1",
        "relay_upstream_errors_total{cluster=\"always\",reason=\"refused\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == sample), "{sample}: {metrics}");
    }
}
