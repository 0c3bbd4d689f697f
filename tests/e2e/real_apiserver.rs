//! The relay in front of a real kube-apiserver (v1.34, built from its Go modules by
//! testbed/build.sh): the kubectl matrix 1.27 … 1.33 on path and SNI contexts, with exec,
//! attach, cp, port-forward and logs reaching the kubelet stand-in through the API server's own
//! upgrade proxy and WebSocket translator.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::real::*;
use crate::support::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// Waits (bounded) for an API server audit event matching `pred`.
fn wait_audit(cluster: &RealCluster, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(e) = cluster.audit_events().into_iter().rev().find(|e| pred(e)) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no API server audit event for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_sub(e: &Value, resource: &str, name: &str, sub: &str) -> bool {
    e["objectRef"]["resource"] == resource
        && e["objectRef"]["name"] == name
        && e["objectRef"]["subresource"] == sub
}

/// Whether the event came from kubectl `version` (its user agent is `kubectl/v1.29.3 (...)`).
fn agent_is(e: &Value, version: &str) -> bool {
    e["userAgent"]
        .as_str()
        .is_some_and(|ua| ua.contains(&format!("/v{version}.")))
}

fn kubectl_ok(
    bed: &Bed,
    version: &str,
    ctx: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    what: &str,
) -> String {
    let mut c = bed.front.kubectl(version, ctx);
    c.args(args);
    ok(
        &run(c, stdin, T),
        &format!("kubectl {version} {ctx} {what}"),
    )
}

fn matrix(version: &str) {
    let bed = Bed::passthrough(Options::new(&format!("k{}", version.replace('.', ""))));
    let cluster = &bed.cluster;
    for ctx in [cluster.name.clone(), format!("{}-sni", cluster.name)] {
        let ctx = ctx.as_str();
        let tag = ctx.replace('-', "");
        let k = |args: &[&str], what: &str| kubectl_ok(&bed, version, ctx, args, None, what);
        let k_in = |args: &[&str], input: &str, what: &str| {
            kubectl_ok(&bed, version, ctx, args, Some(input.as_bytes()), what)
        };

        // get: table, JSON, YAML.
        let out = k(&["get", "pods"], "get pods");
        assert!(
            out.contains("web-0") && out.contains("Running") && out.contains("1/1"),
            "{out}"
        );
        let list: Value =
            serde_json::from_str(&k(&["get", "pods", "-o", "json"], "get -o json")).unwrap();
        assert_eq!(
            list["items"].as_array().unwrap().len(),
            PODS.len(),
            "{list}"
        );
        let yaml = k(&["get", "pod", "web-0", "-o", "yaml"], "get -o yaml");
        assert!(
            yaml.contains("nodeName: testbed-node") && yaml.contains("phase: Running"),
            "{yaml}"
        );

        // create, apply, server-side apply, patch, delete.
        k(
            &[
                "create",
                "configmap",
                &format!("c-{tag}"),
                "--from-literal=k=created",
            ],
            "create cm",
        );
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a-{tag}\ndata:\n  k: applied\n"
        );
        k_in(&["apply", "-f", "-"], &cm, "apply");
        let ssa = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: s-{tag}\ndata:\n  k: server-side\n");
        let out = k_in(
            &["apply", "--server-side", "-f", "-"],
            &ssa,
            "apply --server-side",
        );
        assert!(out.contains("serverside-applied"), "{out}");
        k(
            &[
                "patch",
                "configmap",
                &format!("a-{tag}"),
                "--type=merge",
                "-p",
                r#"{"data":{"k":"patched"}}"#,
            ],
            "patch",
        );
        let got = k(
            &["get", "cm", &format!("a-{tag}"), "-o", "jsonpath={.data.k}"],
            "get cm",
        );
        assert_eq!(got, "patched");
        let out = k(
            &[
                "create",
                "deployment",
                &format!("d-{tag}"),
                "--image=registry.k8s.io/pause:3.10",
            ],
            "create deployment",
        );
        assert!(out.contains("created"), "{out}");
        k(
            &["get", "deployment", &format!("d-{tag}")],
            "get deployment",
        );

        // get -w sees an object created after the watch reached the API server.
        let watched = format!("w-{tag}");
        let mut c = bed.front.kubectl(version, ctx);
        c.args(["get", "configmaps", "-w"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().unwrap();
        wait_audit(cluster, "the watch", |e| {
            e["verb"] == "watch"
                && e["objectRef"]["resource"] == "configmaps"
                && agent_is(e, version)
        });
        k(&["create", "configmap", &watched], "create during watch");
        read_until(child, Duration::from_secs(30), |l| l.contains(&watched));
        k(
            &[
                "delete",
                "configmap",
                &format!("c-{tag}"),
                &format!("a-{tag}"),
                &format!("s-{tag}"),
                &watched,
            ],
            "delete",
        );
        k(
            &["delete", "deployment", &format!("d-{tag}")],
            "delete deployment",
        );

        // Discovery-driven verbs.
        let out = k(&["api-resources"], "api-resources");
        assert!(
            out.contains("deployments") && out.contains("apps/v1"),
            "{out}"
        );
        let out = k(&["explain", "pod.spec.nodeName"], "explain");
        assert!(out.contains("nodeName"), "{out}");
        k(&["events"], "events");
        k(&["get", "events"], "get events");
        let out = k(&["auth", "can-i", "create", "pods/exec"], "auth can-i");
        assert_eq!(out.trim(), "yes");
        if version == "1.27" {
            // kubectl 1.27 asks for SelfSubjectReview v1alpha1/v1beta1, which a 1.34 API
            // server no longer serves (v1 only): kubectl's own message, not the relay's.
            let mut c = bed.front.kubectl(version, ctx);
            c.args(["auth", "whoami"]);
            let out = run(c, None, T);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("selfsubjectreviews API is not enabled"),
                "{err}"
            );
        } else {
            let who: Value =
                serde_json::from_str(&k(&["auth", "whoami", "-o", "json"], "auth whoami")).unwrap();
            assert_eq!(
                who["status"]["userInfo"]["username"],
                upn(OID_ALICE),
                "{who}"
            );
            assert_eq!(who["status"]["userInfo"]["uid"], OID_ALICE, "{who}");
        }

        // logs -f streams lines as the kubelet writes them.
        let mut c = bed.front.kubectl(version, ctx);
        c.args(["logs", "-f", "web-0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut n = 0;
        read_until(c.spawn().unwrap(), Duration::from_secs(30), |_| {
            n += 1;
            n >= 7
        });

        // exec -i: stdin through, exit codes back; the protocol kubectl picked is in the API
        // server's audit log (WebSocket is a GET, SPDY a POST).
        let payload = format!("through the real API server {tag}\n");
        let out = k_in(&["exec", "-i", "web-0", "--", "cat"], &payload, "exec -i");
        assert_eq!(out, payload);
        let e = wait_audit(cluster, "exec", |e| {
            is_sub(e, "pods", "web-0", "exec") && agent_is(e, version)
        });
        let want = if version >= "1.30" { "get" } else { "create" };
        assert_eq!(e["verb"], want, "kubectl {version} exec protocol: {e}");
        let mut c = bed.front.kubectl(version, ctx);
        c.args(["exec", "web-0", "--", "sh", "-c", "exit 3"]);
        let st = run(c, None, T);
        assert_eq!(
            st.status.code(),
            Some(3),
            "exit code through relay and API server: {st:?}"
        );

        // exec -it under a real pseudo-terminal.
        let cmdline = format!(
            "{} --kubeconfig {} --context {ctx} exec -it web-0 -- echo tty-{tag}",
            kubectl(version).display(),
            bed.front.kubeconfig.display()
        );
        let mut s = crate::support::under_pty(&cmdline);
        s.env("HOME", &bed.front.home);
        let out = ok(&run(s, None, T), "exec -it");
        assert!(out.contains(&format!("tty-{tag}")), "{out}");

        // attach to the pod's main process.
        let out = k_in(
            &["attach", "-i", "web-0", "-c", "main"],
            &format!("attached {tag}\n"),
            "attach",
        );
        assert!(out.contains(&format!("attached {tag}")), "{out}");

        // cp both ways.
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("up.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&local, &data).unwrap();
        k(
            &[
                "cp",
                local.to_str().unwrap(),
                &format!("web-0:/tmp/cp-{tag}.bin"),
            ],
            "cp to pod",
        );
        let back = dir.path().join("down.bin");
        k(
            &[
                "cp",
                &format!("web-0:/tmp/cp-{tag}.bin"),
                back.to_str().unwrap(),
            ],
            "cp from pod",
        );
        assert_eq!(std::fs::read(&back).unwrap(), data, "cp round trip");

        // port-forward moves bytes both ways (every port of the stand-in echoes).
        let mut c = bed.front.kubectl(version, ctx);
        c.args(["port-forward", "pod/web-0", ":8080"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let port = crate::support::forwarded_port(&mut child);
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let msg = format!("ping via the API server {tag}");
        sock.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        sock.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
        drop(sock);
        let _ = child.kill();
        let _ = child.wait();
        let e = wait_audit(cluster, "port-forward", |e| {
            is_sub(e, "pods", "web-0", "portforward") && agent_is(e, version)
        });
        let want = if version >= "1.31" { "get" } else { "create" };
        assert_eq!(
            e["verb"], want,
            "kubectl {version} port-forward protocol: {e}"
        );
    }

    // Bob passes the relay, and the API server's own RBAC refuses him with its own Status.
    let mut c = bed.front.kubectl(version, &format!("bob@{}", cluster.name));
    c.args(["get", "pods"]);
    let denied = run(c, None, T);
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        err.contains("Error from server (Forbidden)")
            && err.contains(&format!(
                "User \"{}\" cannot list resource \"pods\"",
                upn(OID_BOB)
            )),
        "{err}"
    );
    drop(bed);
}

#[test]
fn kubectl_1_27_real_apiserver() {
    matrix("1.27");
}
#[test]
fn kubectl_1_28_real_apiserver() {
    matrix("1.28");
}
#[test]
fn kubectl_1_29_real_apiserver() {
    matrix("1.29");
}
#[test]
fn kubectl_1_30_real_apiserver() {
    matrix("1.30");
}
#[test]
fn kubectl_1_31_real_apiserver() {
    matrix("1.31");
}
#[test]
fn kubectl_1_32_real_apiserver() {
    matrix("1.32");
}
#[test]
fn kubectl_1_33_real_apiserver() {
    matrix("1.33");
}

/// The Python `kubernetes` client and `@kubernetes/client-node` through the relay to the real
/// API server: list, watch, exec over WebSocket (v5 and v4; the API server translates v5 to
/// SPDY and hands v4 to the kubelet as is), port-forward (Python).
#[test]
fn python_and_node_clients_real_apiserver() {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = repo.join(".venv/bin/python");
    assert!(
        python.exists() && repo.join("tests/clients/node/node_modules").exists(),
        "run scripts/install-test-deps.sh (scripts/test does)"
    );
    let bed = Bed::passthrough(Options::new("clients"));
    for ctx in ["clients", "clients-sni"] {
        let mut c = std::process::Command::new(&python);
        c.arg(repo.join("tests/clients/python/check_client.py"))
            .arg("--kubeconfig")
            .arg(&bed.front.kubeconfig)
            .args(["--context", ctx])
            .env("HOME", &bed.front.home);
        println!(
            "{}",
            ok(
                &run(c, None, Duration::from_secs(120)),
                &format!("python client on {ctx}")
            )
        );
        let mut c = std::process::Command::new("node");
        c.arg(repo.join("tests/clients/node/check_client.mjs"))
            .arg("--kubeconfig")
            .arg(&bed.front.kubeconfig)
            .args(["--context", ctx])
            .env("HOME", &bed.front.home);
        println!(
            "{}",
            ok(
                &run(c, None, Duration::from_secs(120)),
                &format!("client-node on {ctx}")
            )
        );
    }
    // Both reached the kubelet through the API server.
    let execs = bed
        .cluster
        .kubelet
        .record
        .matching("/exec/default/web-0/main");
    assert!(
        execs.len() >= 4,
        "{} execs reached the kubelet",
        execs.len()
    );
}
