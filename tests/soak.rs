//! The soak (docs/security.md scenario 13): the dev environment under mixed, steady load for
//! `KUBE_RELAY_SOAK_SECS` (default 180 s, the CI run; `scripts/soak` runs 1,800 s and writes the
//! figures to docs/perf/soak.md):
//! - REST: GETs at a steady rate over HTTP/2, a fresh connection every few seconds (so new
//!   handshakes meet the rotated certificate), each one counted;
//! - 500 watches over HTTP/2, 50 of them with tokens that expire during the run and are reopened;
//! - interactive exec sessions (kubectl 1.33, WebSocket) echoing a line every second;
//! - port-forwards moving bytes;
//! - a configuration reload every 30 s and, half-way, a serving-certificate rotation;
//! - cluster `beta` flapping (a proxy in front of it refuses connections for 10 s of every 30 s).
//!
//! Pass: no failed REST request (to `alpha`), no watch or exec session ends except those whose
//! token expired, `beta` answers only 200 or a 503 naming it, RSS, open files and threads flat
//! after warm-up (bounds below), and exactly one audit record per REST request. Its own test
//! binary, so the process's figures are the relay's and this harness's alone.
#![allow(unreachable_pub)]
#![allow(clippy::disallowed_types)]

#[allow(dead_code)]
mod support;

use std::io::{BufRead as _, Write as _};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject as _;
use support::*;
use tokio::net::TcpListener;
use tokio::time::Instant;

const WATCHES: usize = 500;
const EXPIRING_WATCHES: usize = 50;
const EXEC_SESSIONS: usize = 20;
const PORT_FORWARDS: usize = 4;
const REST_PER_SECOND: u64 = 20;
const PROBE_AGENT: &str = "kube-relay-soak-probe";

fn soak_secs() -> u64 {
    std::env::var("KUBE_RELAY_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180)
}

/// RSS (bytes), open file descriptors and threads of this process.
fn sample() -> (u64, usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    (field("VmRSS:") * 1024, fds, field("Threads:") as usize)
}

/// A TCP proxy in front of a cluster that can be switched off: then it refuses new connections
/// and cuts the ones it carries.
struct Flapper {
    port: u16,
    up: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Flapper {
    async fn start(target: std::net::SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(AtomicU64::new(0));
        let (u, g) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = l.accept().await else {
                    return;
                };
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let (u, g) = (u.clone(), g.clone());
                tokio::spawn(async move {
                    let born = g.load(Ordering::SeqCst);
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    tokio::pin!(copy);
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {
                                if !u.load(Ordering::SeqCst) || g.load(Ordering::SeqCst) != born {
                                    return; // cut
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            port,
            up,
            generation,
        }
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// An HTTP/2 connection to the relay trusting `ca` (one or more PEM CAs).
async fn h2(
    relay: std::net::SocketAddr,
    ca: &[rustls_pki_types::CertificateDer<'static>],
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tls = tls_connect(relay, ca, "localhost", &[b"h2"]).await;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

fn get(path: &str, token: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("https://localhost{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("user-agent", PROBE_AGENT)
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let secs = soak_secs();
    let env = dev_env().await;
    let relay = env.dev.relay_addr;
    let dir = env.dev.dir.clone();
    let mut trusted = env.relay_ca();
    let alice = env.dev.token("alice");

    // beta through a switchable proxy: rewrite its `connect` and reload.
    let config_path = dir.join("relay.yaml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let beta_port = env.dev.beta.addr.port();
    let flapper = Flapper::start(env.dev.beta.addr).await;
    let config = config.replace(
        &format!("connect: 127.0.0.1:{beta_port}"),
        &format!("connect: 127.0.0.1:{}", flapper.port),
    );
    assert!(config.contains(&format!(":{}", flapper.port)));
    // Faster probes (beta's flaps seen within a second or two); a short grace after a token
    // expires, so the expiring watches end within the run.
    let config = config.replace(
        "timeouts:\n",
        "timeouts:\n  health_interval: 1s\n  token_grace: 5s\n",
    );
    // One user drives the whole load: lift the per-identity rate out of reach (the stream cap,
    // 1,000, already holds 500 watches and the sessions).
    let config = format!(
        "{config}\nlimits: {{per_identity_requests_per_second: 100000, per_identity_burst: 100000}}\n"
    );
    std::fs::write(&config_path, &config).unwrap();
    env.dev.relay_handle.reload().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rest_ok = Arc::new(AtomicU64::new(0));
    let rest_failed = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));

    // REST to alpha, steady rate, a new connection every 5 s.
    let rest = {
        let (stop, ok, failed, failures, alice) = (
            stop.clone(),
            rest_ok.clone(),
            rest_failed.clone(),
            failures.clone(),
            alice.clone(),
        );
        let ca = Arc::new(std::sync::Mutex::new(trusted.clone()));
        let ca_for_rotation = ca.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / REST_PER_SECOND));
            let mut conn_born = Instant::now();
            let roots = ca.lock().unwrap().clone();
            let mut send = h2(relay, &roots).await;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                if conn_born.elapsed() > Duration::from_secs(5) {
                    let roots = ca.lock().unwrap().clone();
                    send = h2(relay, &roots).await;
                    conn_born = Instant::now();
                }
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    send.send_request(get(
                        "/clusters/alpha/api/v1/namespaces/default/pods",
                        &alice,
                    )),
                )
                .await;
                match r {
                    Ok(Ok(resp)) if resp.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("REST: {:?}", other.map(|r| r.map(|x| x.status()))));
                        let roots = ca.lock().unwrap().clone();
                        send = h2(relay, &roots).await;
                        conn_born = Instant::now();
                    }
                }
            }
        });
        (task, ca_for_rotation)
    };

    // 500 watches on alpha over 5 HTTP/2 connections; the expiring ones are reopened.
    let watch_ends = Arc::new(AtomicU64::new(0));
    let unexpected_watch_ends = Arc::new(AtomicU64::new(0));
    let mut watch_conns = Vec::new();
    for _ in 0..5 {
        watch_conns.push(h2(relay, &trusted).await);
    }
    for i in 0..WATCHES {
        let expiring = i < EXPIRING_WATCHES;
        let mut send = watch_conns[i % 5].clone();
        let (stop, ends, unexpected, failures) = (
            stop.clone(),
            watch_ends.clone(),
            unexpected_watch_ends.clone(),
            failures.clone(),
        );
        let issuer = env.dev.issuer.clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let token = if expiring {
                    let now = kube_relay::clock::unix_now();
                    issuer.mint(serde_json::json!({"sub": "alice", "aud": "kube-relay", "iat": now, "nbf": now, "exp": now + 20}))
                } else {
                    alice.clone()
                };
                let Ok(resp) = send
                    .send_request(get(
                        "/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true",
                        &token,
                    ))
                    .await
                else {
                    unexpected.fetch_add(1, Ordering::SeqCst);
                    failures
                        .lock()
                        .unwrap()
                        .push("watch: could not open".into());
                    return;
                };
                if resp.status() != 200 {
                    unexpected.fetch_add(1, Ordering::SeqCst);
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("watch: {}", resp.status()));
                    return;
                }
                let mut body = resp.into_body();
                while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                    if frame.is_err() {
                        break;
                    }
                }
                ends.fetch_add(1, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                if !expiring {
                    unexpected.fetch_add(1, Ordering::SeqCst);
                    failures
                        .lock()
                        .unwrap()
                        .push("watch ended before the end of the soak".into());
                    return;
                }
            }
        });
    }

    // Interactive exec sessions: a line in, the same line out, every second.
    let exec_failures = Arc::new(AtomicU64::new(0));
    let mut execs = Vec::new();
    for n in 0..EXEC_SESSIONS {
        let mut c = env.kubectl("1.33", "alpha");
        c.args(["exec", "-i", "-n", "default", "web-0", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (stop, failed, failures) = (stop.clone(), exec_failures.clone(), failures.clone());
        execs.push(std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let line = format!("exec {n} line {i}");
                if writeln!(stdin, "{line}").is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("exec {n}: stdin closed"));
                    break;
                }
                match lines.next() {
                    Some(Ok(got)) if got == line => {}
                    other => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("exec {n}: {other:?}"));
                        break;
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            drop(stdin);
            let _ = child.kill();
            let _ = child.wait();
            i
        }));
    }

    // Port-forwards moving bytes every second.
    let pf_failures = Arc::new(AtomicU64::new(0));
    let mut forwards = Vec::new();
    for n in 0..PORT_FORWARDS {
        let mut c = env.kubectl("1.33", "alpha");
        c.args(["port-forward", "pod/web-0", ":8080"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let port = forwarded_port(&mut child);
        let (stop, failed, failures) = (stop.clone(), pf_failures.clone(), failures.clone());
        forwards.push(std::thread::spawn(move || {
            use std::io::Read as _;
            let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let msg = format!("port-forward {n} message {i:08}");
                let mut got = vec![0u8; msg.len()];
                if sock.write_all(msg.as_bytes()).is_err()
                    || sock.read_exact(&mut got).is_err()
                    || got != msg.as_bytes()
                {
                    failed.fetch_add(1, Ordering::SeqCst);
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("port-forward {n} failed at {i}"));
                    break;
                }
                i += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            let _ = child.kill();
            let _ = child.wait();
            i
        }));
    }

    // beta, flapping: only 200 or a 503 naming it.
    let beta_bad = Arc::new(AtomicU64::new(0));
    let beta_counts = Arc::new(std::sync::Mutex::new((0u64, 0u64)));
    let beta_task = {
        let (stop, bad, counts, failures, alice, roots) = (
            stop.clone(),
            beta_bad.clone(),
            beta_counts.clone(),
            failures.clone(),
            alice.clone(),
            trusted.clone(),
        );
        tokio::spawn(async move {
            let mut send = h2(relay, &roots).await;
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let r = tokio::time::timeout(
                    Duration::from_secs(15),
                    send.send_request(get("/clusters/beta/api/v1/namespaces/default/pods", &alice)),
                )
                .await;
                match r {
                    Ok(Ok(resp)) if resp.status() == 200 => counts.lock().unwrap().0 += 1,
                    Ok(Ok(resp)) if resp.status() == 503 || resp.status() == 504 => {
                        let body = http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .unwrap()
                            .to_bytes();
                        if !String::from_utf8_lossy(&body).contains("beta") {
                            bad.fetch_add(1, Ordering::SeqCst);
                        }
                        counts.lock().unwrap().1 += 1;
                    }
                    other => {
                        bad.fetch_add(1, Ordering::SeqCst);
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("beta: {:?}", other.map(|r| r.map(|x| x.status()))));
                        send = h2(relay, &roots).await;
                    }
                }
            }
        })
    };

    // The schedule: reloads every 30 s, beta down 10 s of every 30 s, rotation half-way,
    // samples every 5 s (warm-up: the first 30 s or a sixth of the run).
    let started = Instant::now();
    let warm_up = Duration::from_secs((secs / 6).max(30).min(secs / 2));
    let mut samples = Vec::new();
    let mut rotated = false;
    let mut last_reload = Instant::now();
    let mut reloads = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t = started.elapsed().as_secs();
        flapper.set(t % 30 >= 10);
        if last_reload.elapsed() >= Duration::from_secs(30) {
            env.dev.relay_handle.reload().await.unwrap();
            reloads += 1;
            last_reload = Instant::now();
        }
        if !rotated && t >= secs / 2 {
            // A new serving certificate from a new CA: new handshakes must get it.
            let ca2 = kube_sim::pki::TestCa::new("soak rotation CA").unwrap();
            let leaf = ca2
                .issue(&["localhost", "*.relay.localhost", "127.0.0.1"])
                .unwrap();
            let ca2_der: Vec<_> =
                rustls_pki_types::CertificateDer::pem_slice_iter(ca2.cert_pem().as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            trusted.extend(ca2_der.iter().cloned());
            rest.1.lock().unwrap().extend(ca2_der.iter().cloned());
            std::fs::write(dir.join("relay.crt"), &leaf.cert_pem).unwrap();
            std::fs::write(dir.join("relay.key"), &leaf.key_pem).unwrap();
            std::fs::write(dir.join("ca.crt"), ca2.cert_pem()).unwrap();
            env.dev.relay_handle.reload().await.unwrap();
            reloads += 1;
            // Only the new CA: the handshake proves the rotation.
            let mut only_new = h2(relay, &ca2_der).await;
            let resp = only_new
                .send_request(get(
                    "/clusters/alpha/api/v1/namespaces/default/pods",
                    &alice,
                ))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "served with the rotated certificate");
            rest_ok.fetch_add(1, Ordering::SeqCst);
            rotated = true;
        }
        if started.elapsed() >= warm_up {
            samples.push((t, sample()));
        }
    }
    flapper.set(true);
    stop.store(true, Ordering::SeqCst);
    let _ = rest.0.await;
    let _ = beta_task.await;
    let exec_lines: u64 = execs.into_iter().map(|h| h.join().unwrap()).sum();
    let pf_messages: u64 = forwards.into_iter().map(|h| h.join().unwrap()).sum();

    // The audit log: one record per REST request (the soak's own user agent).
    let requests = rest_ok.load(Ordering::SeqCst) + rest_failed.load(Ordering::SeqCst);
    let audit_path = dir.join("audit.jsonl");
    let records = eventually(
        "the audit log has caught up",
        Duration::from_secs(15),
        || {
            let text = std::fs::read_to_string(&audit_path).unwrap_or_default();
            let n = text
                .lines()
                .filter(|l| {
                    l.contains(PROBE_AGENT)
                        && l.contains("/clusters/alpha/api/v1/namespaces/default/pods\"")
                })
                .count() as u64;
            async move {
                if n >= requests {
                    Ok(n)
                } else {
                    Err(n)
                }
            }
        },
    )
    .await;

    // The first and the last minute after warm-up (medians: a reload's moment is no trend;
    // threads: the fewest, as any one sample can catch a few of tokio's blocking threads in
    // passing, while a leak raises the floor).
    let window = 12.min(samples.len() / 2).max(1);
    let steady = |part: &[(u64, (u64, usize, usize))]| -> (u64, usize, usize) {
        let mut rss: Vec<u64> = part.iter().map(|s| s.1 .0).collect();
        let mut fds: Vec<usize> = part.iter().map(|s| s.1 .1).collect();
        let mut threads: Vec<usize> = part.iter().map(|s| s.1 .2).collect();
        rss.sort_unstable();
        fds.sort_unstable();
        threads.sort_unstable();
        let mid = |n: usize| n / 2;
        (
            rss.get(mid(rss.len())).copied().unwrap_or(0),
            fds.get(mid(fds.len())).copied().unwrap_or(0),
            threads.first().copied().unwrap_or(0),
        )
    };
    let first = steady(&samples[..window.min(samples.len())]);
    let last = steady(&samples[samples.len().saturating_sub(window)..]);
    let peak_rss = samples.iter().map(|s| s.1 .0).max().unwrap_or(0);
    let (beta_200, beta_503) = *beta_counts.lock().unwrap();
    let report = format!(
        "soak {secs} s: REST {requests} requests, {} failed; audit records {records}; watches {WATCHES} ({} ends, {} unexpected); exec sessions {EXEC_SESSIONS} ({exec_lines} lines echoed, {} failures); port-forwards {PORT_FORWARDS} ({pf_messages} messages, {} failures); beta {beta_200} x 200, {beta_503} x 503, {} other; reloads {reloads}, certificate rotated {rotated}; after warm-up, first and last minute (medians; threads the fewest): RSS {:.1} -> {:.1} MiB (peak {:.1}), fds {} -> {}, threads {} -> {}",
        rest_failed.load(Ordering::SeqCst),
        watch_ends.load(Ordering::SeqCst),
        unexpected_watch_ends.load(Ordering::SeqCst),
        exec_failures.load(Ordering::SeqCst),
        pf_failures.load(Ordering::SeqCst),
        beta_bad.load(Ordering::SeqCst),
        first.0 as f64 / 1048576.0,
        last.0 as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0,
        first.1,
        last.1,
        first.2,
        last.2,
    );
    eprintln!("{report}");
    if let Ok(out) = std::env::var("KUBE_RELAY_SOAK_REPORT") {
        let series: Vec<String> = samples
            .iter()
            .map(|(t, (rss, fds, threads))| format!("{t} {rss} {fds} {threads}"))
            .collect();
        std::fs::write(
            out,
            format!("{report}\n# t rss fds threads\n{}\n", series.join("\n")),
        )
        .unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert_eq!(
        rest_failed.load(Ordering::SeqCst),
        0,
        "{report}\n{failures:?}"
    );
    assert_eq!(
        unexpected_watch_ends.load(Ordering::SeqCst),
        0,
        "{report}\n{failures:?}"
    );
    assert_eq!(
        exec_failures.load(Ordering::SeqCst),
        0,
        "{report}\n{failures:?}"
    );
    assert_eq!(
        pf_failures.load(Ordering::SeqCst),
        0,
        "{report}\n{failures:?}"
    );
    assert_eq!(beta_bad.load(Ordering::SeqCst), 0, "{report}\n{failures:?}");
    assert!(beta_200 > 0 && beta_503 > 0, "beta flapped: {report}");
    assert!(rotated && reloads >= secs / 30, "{report}");
    assert_eq!(records, requests, "one audit record per request: {report}");
    assert!(
        watch_ends.load(Ordering::SeqCst) >= EXPIRING_WATCHES as u64,
        "the expiring watches ended and were reopened: {report}"
    );
    // Flat after warm-up: RSS within 32 MiB (allocator slack, connection churn), files within
    // a few of where they were. Threads too, but for tokio's blocking pool: recordings are
    // appended through `tokio::fs` (one job at a time per session's file), and the pool can
    // keep as many threads as were ever busy at once: it hands jobs to its idle threads in
    // turn, so none need stay idle for its 10 s keep-alive. A moment when every recorded session
    // appended together (a slow disk) leaves up to one thread per session for the rest of the
    // run: bounded, not a leak. A thread per request, watch or connection would pass that.
    assert!(last.0 <= first.0 + (32 << 20), "RSS grew: {report}");
    assert!(last.1 <= first.1 + 16, "file descriptors grew: {report}");
    assert!(
        last.2 <= first.2 + 4 + EXEC_SESSIONS,
        "threads grew: {report}"
    );
}
