//! docs/security.md F4: a client that stops reading a watch while the cluster streams without
//! end must not make the relay buffer the stream. Flow control reaches the cluster: over
//! HTTP/1.1 (TCP backpressure) and HTTP/2 (stream and connection windows) the cluster manages to
//! send only what the socket buffers and windows hold, and the process's resident memory stays
//! flat while it tries to send 1 GiB. Then, after `timeouts.write_stall` with nothing taken, the
//! relay ends the stream and its audit record says `write_stall`; over SPDY and WebSocket too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{tls_connect, CustomRelay, FakeUpstream};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// What the cluster would stream if nobody pushed back.
const ENDLESS: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;

/// A cluster that answers the relay's health probes with 200 and every other request with a
/// chunked body of [`ENDLESS`] bytes, counting what it managed to write.
struct StreamingCluster {
    upstream: FakeUpstream,
    written: Arc<AtomicU64>,
}

impl StreamingCluster {
    async fn start() -> Self {
        // Borrow a FakeUpstream's CA and address shape for the relay's configuration, but serve
        // on its own listener: the canned FakeUpstream cannot stream.
        let ca = kube_sim::pki::TestCa::new("streaming cluster CA").unwrap();
        let leaf = ca.issue(&["fake.upstream.test", "127.0.0.1"]).unwrap();
        let mut cfg = (*kube_sim::server::tls_config(&leaf).unwrap()).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, w) = (acceptor.clone(), w.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|x| x == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    if text.contains(kube_relay::upstream::health::PROBE_USER_AGENT) {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    let mut frame = format!("{CHUNK:x}\r\n").into_bytes();
                    frame.extend(std::iter::repeat_n(b'x', CHUNK));
                    frame.extend_from_slice(b"\r\n");
                    let mut sent = 0u64;
                    while sent < ENDLESS {
                        if s.write_all(&frame).await.is_err() {
                            return;
                        }
                        sent += CHUNK as u64;
                        w.fetch_add(CHUNK as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Self {
            upstream: FakeUpstream::describing(addr, ca.cert_pem()),
            written,
        }
    }

    /// Waits until the cluster has stopped making progress (its writes block), bounded; returns
    /// the bytes it wrote.
    async fn settled(&self) -> u64 {
        let mut last = u64::MAX;
        for _ in 0..100 {
            let now = self.written.load(Ordering::Relaxed);
            if now == last {
                return now;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!("the cluster never stopped sending: {last} bytes");
    }
}

/// Resident memory of this process (the relay runs in it), from /proc.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// The cluster got only what the buffers and windows hold out, and the relay kept none of it.
fn pushed_back(what: &str, written: u64, grown: u64) {
    eprintln!("F4 {what}: the cluster wrote {written} bytes of {ENDLESS}; RSS grew {grown} bytes");
    assert!(
        written < 64 << 20,
        "{what}: the cluster kept sending: {written} bytes"
    );
    assert!(
        grown < 64 << 20,
        "{what}: the relay buffered the stream: RSS grew {grown} bytes"
    );
}

const WATCH: &str = "/clusters/alpha/api/v1/namespaces/default/pods?watch=true";

/// A write-stall limit short enough for a test, long enough that nothing else trips it.
const STALL: &str = "timeouts: {write_stall: 2s}\n";

/// Waits (bounded) for the audit log at `path` to hold a ResponseComplete whose close reason is
/// `write_stall`, and returns it.
async fn stall_record(path: &std::path::Path) -> serde_json::Value {
    crate::support::eventually(
        "a ResponseComplete audit record with close-reason write_stall",
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|r| {
                    r["stage"] == "ResponseComplete"
                        && r["annotations"]["kube-relay.io/close-reason"] == "write_stall"
                })
                .ok_or(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http1_watch_reader_pushes_back_to_the_cluster_then_is_cut_off() {
    let cluster = StreamingCluster::start().await;
    let relay = CustomRelay::start_with(&[("alpha", &cluster.upstream)], STALL).await;
    let token = relay.token("alice");
    let rss_before = rss_bytes();
    let mut s = tls_connect(relay.addr, &relay.ca, "localhost", &[b"http/1.1"]).await;
    s.write_all(
        format!("GET {WATCH} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    // Read the first bytes (the stream is flowing), then stop reading.
    let mut first = [0u8; 1024];
    let n = s.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let written = cluster.settled().await;
    let grown = rss_bytes().saturating_sub(rss_before);
    pushed_back("HTTP/1.1", written, grown);
    // Nothing taken for the limit: the relay ends the stream, audited, and closes the
    // connection: reading on finds its end after what the buffers held.
    let record = stall_record(&relay.audit_path()).await;
    assert_eq!(record["annotations"]["kube-relay.io/protocol"], "watch");
    let mut sink = vec![0u8; 1 << 16];
    let mut drained = 0usize;
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the connection stayed open after the stall");
    assert!(drained < 64 << 20, "{drained} bytes were still buffered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http2_watch_reader_pushes_back_to_the_cluster_then_is_cut_off() {
    let cluster = StreamingCluster::start().await;
    let relay = CustomRelay::start_with(&[("alpha", &cluster.upstream)], STALL).await;
    let token = relay.token("alice");
    let rss_before = rss_bytes();
    let tls = tls_connect(relay.addr, &relay.ca, "localhost", &[b"h2"]).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(conn);
    let req = http::Request::get(format!("https://localhost{WATCH}"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The body is not read: its stream window fills and stays full.
    let unread = resp.into_body();
    let written = cluster.settled().await;
    let grown = rss_bytes().saturating_sub(rss_before);
    pushed_back("HTTP/2", written, grown);
    let record = stall_record(&relay.audit_path()).await;
    assert_eq!(record["annotations"]["kube-relay.io/protocol"], "watch");
    // The relay reset that stream alone (src/conn_streams.rs): reading it now ends in an
    // error, not in a clean end of watch, and the connection goes on serving.
    let read = tokio::time::timeout(Duration::from_secs(30), unread.collect())
        .await
        .expect("the stalled stream ends");
    assert!(read.is_err(), "the stalled stream ended cleanly");
    let req = http::Request::get("https://localhost/clusters/none/api")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .expect("the connection still serves");
    assert_eq!(resp.status(), 404);
    assert!(!connection.is_finished());
}

/// Exec tunnels (SPDY with kubectl 1.27, WebSocket with 1.33): the pod writes 1 GiB to stdout
/// while kubectl's stdout pipe is never read. kubectl blocks on the full pipe and stops reading
/// the tunnel; the relay's 64 KiB copy buffers fill and it stops reading from the cluster, whose
/// writer blocks. So after a few seconds the command is still running (1 GiB has not gone
/// anywhere) and the process's memory has not grown by the stream. Then, with
/// `timeouts.write_stall` at 10 s, the relay ends the session and audits `write_stall`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_exec_reader_pushes_back_to_the_pod_then_is_cut_off_over_spdy_and_websocket() {
    let env = crate::support::dev_env().await;
    let config = env.dev.dir.join("relay.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("timeouts:\n", "timeouts:\n  write_stall: 10s\n", 1),
    )
    .unwrap();
    env.dev
        .relay_handle
        .reload()
        .await
        .expect("the edited configuration loads");
    let audit = env.dev.dir.join("audit.jsonl");
    for (version, protocol) in [("1.27", "spdy"), ("1.33", "websocket")] {
        let before = std::fs::read_to_string(&audit).unwrap_or_default().len();
        let rss_before = rss_bytes();
        let mut child = env
            .kubectl(version, "alpha")
            .args(["exec", "-n", "default", "web-0", "--", "gen", "1073741824"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Never read stdout. Give the stream time to fill every buffer on the way.
        let mut still_running = true;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if child.try_wait().unwrap().is_some() {
                still_running = false;
                break;
            }
        }
        let grown = rss_bytes().saturating_sub(rss_before);
        eprintln!("F4 exec {version}: still running {still_running}; RSS grew {grown} bytes");
        assert!(
            still_running,
            "kubectl {version}: 1 GiB went somewhere while nobody read it"
        );
        assert!(
            grown < 64 << 20,
            "kubectl {version}: RSS grew {grown} bytes"
        );
        let record = crate::support::eventually(
            "the exec session's write_stall record",
            Duration::from_secs(60),
            || async {
                let text = std::fs::read_to_string(&audit).unwrap_or_default();
                text.get(before..)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|r| {
                        r["stage"] == "ResponseComplete"
                            && r["annotations"]["kube-relay.io/close-reason"] == "write_stall"
                    })
                    .ok_or(())
            },
        )
        .await;
        eprintln!("F4 exec {version}: {}", record["annotations"]);
        assert_eq!(
            record["annotations"]["kube-relay.io/protocol"], protocol,
            "kubectl {version}"
        );
        // kubectl, blocked on its full stdout, notices only when someone reads on: then it
        // finds the session over after what was in flight, far short of the GiB. (How it
        // exits is kubectl's: 1.27 treats the closed SPDY connection as the end of output.)
        let mut stdout = child.stdout.take().unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            std::io::copy(&mut stdout, &mut std::io::sink()).unwrap_or(0)
        });
        let read = tokio::time::timeout(Duration::from_secs(60), reader).await;
        let _ = child.kill();
        let status = child.wait().unwrap();
        let read = read
            .expect("kubectl's output ends once the relay ended its session")
            .unwrap();
        eprintln!("F4 exec {version}: kubectl printed {read} bytes, then {status}");
        assert!(read < 64 << 20, "kubectl {version} printed {read} bytes");
    }
    env.dev.stop().await;
}
