//! Real kube-apiserver behaviour the relay must survive, each against the test bed: watches the
//! API server ends at `--min-request-timeout`, HTTP/2 GOAWAY under `--goaway-chance`, API
//! Priority and Fairness 429s, the API server stopped and started again (AKS stop/start), and
//! the API server's own `MAX_CONCURRENT_STREAMS` with 500 concurrent watches.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::real::*;
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// Like [`Bed::passthrough`], with a TCP forwarder between the relay and the API server
/// counting the connections the relay opens.
fn bed_via_counter(opts: Options) -> (Bed, Arc<std::sync::atomic::AtomicUsize>) {
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = conns.clone();
    let bed = Bed::passthrough_with(opts, move |rt, cluster| {
        let target = cluster.port;
        let l = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = l.local_addr().unwrap().port();
        rt.spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Some(port)
    });
    (bed, conns)
}

/// An HTTP/2 connection to the relay naming `cluster` by SNI.
async fn h2(
    front: &Front,
    ca_pem: &str,
    cluster: &str,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let ca = rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let tls = tls_connect(front.relay, &ca, &format!("{cluster}.relay.test"), &[b"h2"]).await;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

fn get(path: &str, token: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(format!("https://relay.test{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "application/json")
        .body(Empty::new())
        .unwrap()
}

/// Reads one ended watch's events: none may be an ERROR; `rv` follows the last object's
/// resourceVersion and `seen` collects the names of ADDED objects.
fn take_events(bytes: &[u8], rv: &mut String, seen: &mut Vec<String>) {
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let ev: Value = serde_json::from_slice(line).unwrap();
        assert_ne!(ev["type"], "ERROR", "{ev}");
        let object = &ev["object"]["metadata"];
        *rv = object["resourceVersion"].as_str().unwrap().to_owned();
        if ev["type"] == "ADDED" {
            seen.push(object["name"].as_str().unwrap().to_owned());
        }
    }
}

#[test]
fn watches_the_api_server_ends_at_min_request_timeout_are_resumed_not_relisted() {
    let mut opts = Options::new("mrt");
    opts.min_request_timeout = Some(2);
    let b = Bed::passthrough(opts);
    // A client-go style watch loop through the relay: list once, then watch from the list's
    // resourceVersion, and re-watch from the last seen version each time the API server ends
    // the watch (after 2-4 s here).
    let mut send = b.rt.block_on(h2(&b.front, b.idp.ca.cert_pem(), "mrt"));
    let list: Value = b.rt.block_on(async {
        let r = send
            .send_request(get("/api/v1/namespaces/default/configmaps", &b.alice))
            .await
            .unwrap();
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap()
    });
    let mut rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = Instant::now();
    let mut ended_by_server = 0;
    let mut seen = Vec::new();
    let mut n = 0;
    while ended_by_server < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the API server never ended 3 watches"
        );
        let path = format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&allowWatchBookmarks=true");
        let resp =
            b.rt.block_on(send.send_request(get(&path, &b.alice)))
                .unwrap();
        assert_eq!(resp.status(), 200);
        // Create an object while this watch runs: the next event must arrive on it or, if the
        // server ends it first, on the resumed one.
        n += 1;
        b.cluster
            .admin_ok(&["create", "configmap", &format!("mrt-{n}")], None);
        let body = b.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect()).await
        });
        let bytes = body
            .expect("the API server ends the watch within 2*min-request-timeout")
            .expect("the watch ends cleanly, not with an error")
            .to_bytes();
        take_events(&bytes, &mut rv, &mut seen);
        ended_by_server += 1;
    }
    // Every object created shows up exactly once, across the resumed watches.
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < n {
        assert!(
            Instant::now() < deadline,
            "missing events: saw {seen:?} of {n}"
        );
        let path = format!(
            "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=2"
        );
        let resp =
            b.rt.block_on(send.send_request(get(&path, &b.alice)))
                .unwrap();
        let bytes =
            b.rt.block_on(resp.into_body().collect())
                .unwrap()
                .to_bytes();
        take_events(&bytes, &mut rv, &mut seen);
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "duplicate events: {seen:?}");

    // kubectl get -w through the relay: the server's end of the watch ends kubectl cleanly
    // (exit 0, no error), as it does talking to the API server directly.
    let mut c = b.front.kubectl("1.33", "mrt");
    c.args(["get", "configmaps", "-w", "--request-timeout=0"]);
    let out = run(c, None, T);
    assert!(out.status.success(), "kubectl get -w: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "{out:?}"
    );
    // The relay audited each server-ended watch as a completed request.
    assert!(
        b.front
            .audit_records()
            .iter()
            .filter(|r| r["requestURI"]
                .as_str()
                .is_some_and(|u| u.contains("watch=1"))
                && r["responseStatus"]["code"] == 200)
            .count()
            >= 3
    );
}

#[test]
fn goaway_from_the_api_server_fails_no_client_request() {
    let mut opts = Options::new("goaway");
    opts.goaway_chance = Some(0.02);
    // kube-apiserver sends GOAWAY on HTTP/2 only: by default the relay's short requests travel
    // over HTTP/1.1 and never meet one, so this test puts them on HTTP/2.
    opts.upstream_protocol = Some("http2");
    let (b, conns) = bed_via_counter(opts);
    const CONNS: usize = 4;
    const PER_CONN: usize = 750;
    let failures = b.rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONNS {
            let mut send = h2(&b.front, b.idp.ca.cert_pem(), "goaway").await;
            let token = b.alice.clone();
            tasks.push(tokio::spawn(async move {
                let mut bad = Vec::new();
                for i in 0..PER_CONN {
                    let path = if i % 2 == 0 {
                        "/api/v1/namespaces/default/pods/web-0"
                    } else {
                        "/api/v1/namespaces/default/pods"
                    };
                    match send.send_request(get(path, &token)).await {
                        Ok(r) if r.status() == 200 => {
                            if r.into_body().collect().await.is_err() {
                                bad.push(format!("{i}: body cut"));
                            }
                        }
                        Ok(r) => {
                            let code = r.status();
                            let body = r
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            bad.push(format!("{i}: {code} {}", String::from_utf8_lossy(&body)));
                        }
                        Err(e) => bad.push(format!("{i}: {e}")),
                    }
                }
                bad
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        CONNS * PER_CONN,
        &failures[..failures.len().min(10)]
    );
    // The API server did send GOAWAYs: each one makes the relay open a fresh connection.
    let opened = conns.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        opened >= 10,
        "only {opened} upstream connections: no GOAWAY seen"
    );
}

#[test]
fn priority_and_fairness_429_passes_through_unchanged() {
    // The relay admits bob (Bed::passthrough does); the API server limits him.
    let b = Bed::passthrough(Options::new("apf"));
    // Bob's requests go to a priority level with one seat that rejects instead of queueing.
    let apf = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "PriorityLevelConfiguration",
         "metadata": {"name": "one-seat"},
         "spec": {"type": "Limited", "limited": {"nominalConcurrencyShares": 1, "lendablePercent": 0,
                  "limitResponse": {"type": "Reject"}}}},
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
         "metadata": {"name": "bob-one-seat"},
         "spec": {"priorityLevelConfiguration": {"name": "one-seat"}, "matchingPrecedence": 100,
                  "distinguisherMethod": {"type": "ByUser"},
                  "rules": [{"subjects": [{"kind": "User", "user": {"name": upn(OID_BOB)}}],
                             "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                "namespaces": ["*"], "clusterScope": true}],
                             "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]}},
        // Not the built-in `view`: it is aggregated by kube-controller-manager, which the test
        // bed does not run, so it has no rules here.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "pod-reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "bob-view"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pod-reader"},
         "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": upn(OID_BOB)}]},
    ]});
    b.cluster
        .admin_ok(&["apply", "-f", "-"], Some(&apf.to_string()));
    let bob = b.idp.user_token(OID_BOB, &[]);
    // RBAC and APF pick up new objects from their informers: wait for bob's binding first.
    let deadline = Instant::now() + Duration::from_secs(30);
    b.rt.block_on(async {
        let mut send = h2(&b.front, b.idp.ca.cert_pem(), "apf").await;
        loop {
            let r = send.send_request(get("/api/v1/pods", &bob)).await.unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bob's view binding never took effect"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let rejected = loop {
        let rejected = b.rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let mut send = h2(&b.front, b.idp.ca.cert_pem(), "apf").await;
                let bob = bob.clone();
                tasks.push(tokio::spawn(async move {
                    let futs: Vec<_> = (0..50)
                        .map(|_| send.send_request(get("/api/v1/pods", &bob)))
                        .collect();
                    let mut out = Vec::new();
                    for r in futures_util::future::join_all(futs).await {
                        let r = r.unwrap();
                        if r.status() == 429 {
                            let retry = r
                                .headers()
                                .get("retry-after")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let ct = r
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let body = r.into_body().collect().await.unwrap().to_bytes();
                            out.push((retry, ct, body));
                        } else {
                            let code = r.status();
                            let body = r.into_body().collect().await.unwrap().to_bytes();
                            assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
                        }
                    }
                    out
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        if !rejected.is_empty() {
            break rejected;
        }
        // The new FlowSchema takes effect asynchronously.
        assert!(Instant::now() < deadline, "APF never rejected bob's burst");
        std::thread::sleep(Duration::from_millis(200));
    };
    for (retry, ct, body) in rejected {
        // The API server's own value (it grows with its queues' wait), never one of the relay's.
        assert!(
            retry
                .as_deref()
                .and_then(|r| r.parse::<u32>().ok())
                .is_some_and(|s| s >= 1),
            "Retry-After from the API server: {retry:?}"
        );
        // kube-apiserver answers APF rejections in plain text, not as a Status; the relay
        // passes that through byte for byte rather than rewriting it.
        assert_eq!(ct.as_deref(), Some("text/plain; charset=utf-8"));
        assert_eq!(
            String::from_utf8_lossy(&body),
            "Too many requests, please try again later.\n"
        );
    }
}

#[test]
fn api_server_stopped_and_started_fast_503_then_recovery_without_relay_restart() {
    let mut b = Bed::passthrough(Options::new("stopstart"));
    let k = |front: &Front| {
        let mut c = front.kubectl("1.33", "stopstart");
        c.args(["get", "pods", "--request-timeout=20s"]);
        run(c, None, T)
    };
    ok(&k(&b.front), "before stop");
    b.cluster.stop_apiserver();
    let t0 = Instant::now();
    let out = k(&b.front);
    let took = t0.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stopstart"),
        "the Status names the cluster: {err}"
    );
    assert!(
        err.contains("ServiceUnavailable") || err.contains("503") || err.contains("unavailable"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "a stopped API server is refused fast, took {took:?}"
    );
    b.cluster.start_apiserver();
    b.cluster.wait_for_jwt(&b.alice);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = k(&b.front);
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("web-0"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after start: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn five_hundred_watches_beyond_the_api_servers_stream_limit_all_start() {
    let mut opts = Options::new("streams");
    opts.http2_max_streams = Some(100);
    let b = Bed::passthrough(opts);
    let started = b.rt.block_on(async {
        let mut bodies = Vec::new();
        for _ in 0..5 {
            let send = h2(&b.front, b.idp.ca.cert_pem(), "streams").await;
            let mut futs = Vec::new();
            for _ in 0..100 {
                let mut s = send.clone();
                let req = get("/api/v1/namespaces/default/configmaps?watch=1", &b.alice);
                futs.push(async move { s.send_request(req).await });
            }
            for r in tokio::time::timeout(
                Duration::from_secs(60),
                futures_util::future::join_all(futs),
            )
            .await
            .expect("watches start in time")
            {
                let r = r.unwrap();
                assert_eq!(r.status(), 200);
                bodies.push(r.into_body());
            }
        }
        bodies
    });
    assert_eq!(started.len(), 500);
    // Every watch is live: one new object reaches all of them.
    b.cluster.admin_ok(&["create", "configmap", "fanout"], None);
    let got = b.rt.block_on(async {
        let futs = started.into_iter().map(|mut body| async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                use hyper::body::Body as _;
                let mut buf = Vec::new();
                loop {
                    let frame =
                        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx))
                            .await;
                    match frame {
                        Some(Ok(f)) => {
                            if let Ok(d) = f.into_data() {
                                buf.extend_from_slice(&d);
                                if String::from_utf8_lossy(&buf).contains("\"fanout\"") {
                                    return true;
                                }
                            }
                        }
                        _ => return false,
                    }
                }
            })
            .await
            .unwrap_or(false)
        });
        futures_util::future::join_all(futs).await
    });
    assert_eq!(
        got.iter().filter(|g| **g).count(),
        500,
        "every watch saw the event"
    );
}
