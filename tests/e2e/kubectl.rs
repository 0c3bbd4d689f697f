//! Real kubectl through the relay: the version matrix of issue "data plane" (1.27 SPDY exec …
//! 1.33 WebSocket exec and port-forward tunnel), both routing styles, every verb users reach for.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::*;

const T: Duration = Duration::from_secs(60);

fn kubectl_matrix(version: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(dev_env());
    let v = version.replace('.', "");
    for ctx in ["alpha", "alpha-sni"] {
        let k = || env.kubectl(version, ctx);
        let tag = format!("{v}-{}", ctx.replace('-', ""));

        // get: table and JSON.
        let out = ok(
            &run(
                {
                    let mut c = k();
                    c.args(["get", "pods"]);
                    c
                },
                None,
                T,
            ),
            "get pods",
        );
        assert!(out.contains("web-0") && out.contains("Running"), "{out}");
        let out = ok(
            &run(
                {
                    let mut c = k();
                    c.args(["get", "pods", "-o", "json"]);
                    c
                },
                None,
                T,
            ),
            "get -o json",
        );
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["metadata"]["name"] == "web-0"));

        // apply and delete.
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{tag}\ndata:\n  k: v-{tag}\n"
        );
        ok(
            &run(
                {
                    let mut c = k();
                    c.args(["apply", "-f", "-"]);
                    c
                },
                Some(cm.as_bytes()),
                T,
            ),
            "apply",
        );
        let out = ok(
            &run(
                {
                    let mut c = k();
                    c.args([
                        "get",
                        "cm",
                        &format!("cm-{tag}"),
                        "-o",
                        "jsonpath={.data.k}",
                    ]);
                    c
                },
                None,
                T,
            ),
            "get cm",
        );
        assert_eq!(out, format!("v-{tag}"));

        // get -w receives an event for an object created after the watch started.
        let watched = format!("w-{tag}");
        let mut c = k();
        c.args(["get", "configmaps", "-w"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().unwrap();
        let record = env.dev.alpha.record.clone();
        let kc = env.kubectl(version, ctx);
        let applier = std::thread::spawn({
            let watched = watched.clone();
            move || {
                // Create the object once the watch request has reached the cluster.
                let deadline = Instant::now() + Duration::from_secs(30);
                while !record
                    .all()
                    .iter()
                    .any(|r| r.path_and_query.contains("watch="))
                {
                    assert!(Instant::now() < deadline, "watch never reached the cluster");
                    std::thread::sleep(Duration::from_millis(50));
                }
                let mut kc = kc;
                // `kubectl create configmap` posts protobuf, which kube-sim does not decode;
                // apply sends JSON.
                kc.args(["apply", "-f", "-"]);
                let doc =
                    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {watched}\n");
                ok(&run(kc, Some(doc.as_bytes()), T), "create during watch");
            }
        });
        read_until(child, Duration::from_secs(30), |l| l.contains(&watched));
        applier.join().unwrap();
        env.dev.alpha.record.clear();
        ok(
            &run(
                {
                    let mut c = k();
                    c.args(["delete", "cm", &format!("cm-{tag}"), &watched]);
                    c
                },
                None,
                T,
            ),
            "delete",
        );

        // logs -f streams lines as they come.
        let mut c = k();
        c.args(["logs", "-f", "web-0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut n = 0;
        read_until(c.spawn().unwrap(), Duration::from_secs(30), |_| {
            n += 1;
            n >= 6
        });

        // exec -i with stdin, and exit codes.
        let payload = format!("hello through the relay {tag}\n");
        let out = ok(
            &run(
                {
                    let mut c = k();
                    c.args(["exec", "-i", "web-0", "--", "cat"]);
                    c
                },
                Some(payload.as_bytes()),
                T,
            ),
            "exec -i cat",
        );
        assert_eq!(out, payload);
        let wanted_ws = version >= "1.30";
        let last_exec = env
            .dev
            .alpha
            .record
            .matching("/api/v1/namespaces/default/pods/web-0/exec")
            .pop()
            .expect("exec reached alpha");
        assert_eq!(
            last_exec
                .header("upgrade")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some(if wanted_ws { "websocket" } else { "spdy/3.1" }),
            "kubectl {version} exec protocol"
        );
        let st = run(
            {
                let mut c = k();
                c.args(["exec", "web-0", "--", "sh", "-c", "exit 3"]);
                c
            },
            None,
            T,
        );
        assert_eq!(
            st.status.code(),
            Some(3),
            "exit code through the relay: {st:?}"
        );

        // exec -t under a real pseudo-terminal.
        let kubeconfig = env.kubeconfig().display().to_string();
        let cmdline = format!(
            "{} --kubeconfig {kubeconfig} --context {ctx} exec -it web-0 -- echo tty-{tag}",
            kubectl(version).display()
        );
        let mut s = crate::support::under_pty(&cmdline);
        s.env("HOME", &env.home);
        let out = ok(&run(s, None, T), "exec -it");
        assert!(out.contains(&format!("tty-{tag}")), "{out}");

        // cp both ways.
        let local = env.tmp.path().join(format!("cp-{tag}.bin"));
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&local, &data).unwrap();
        ok(
            &run(
                {
                    let mut c = k();
                    c.arg("cp")
                        .arg(&local)
                        .arg(format!("web-0:/tmp/cp-{tag}.bin"));
                    c
                },
                None,
                T,
            ),
            "cp to pod",
        );
        let back = env.tmp.path().join(format!("back-{tag}.bin"));
        ok(
            &run(
                {
                    let mut c = k();
                    c.arg("cp")
                        .arg(format!("web-0:/tmp/cp-{tag}.bin"))
                        .arg(&back);
                    c
                },
                None,
                T,
            ),
            "cp from pod",
        );
        assert_eq!(std::fs::read(&back).unwrap(), data, "cp round trip");

        // port-forward moves bytes (the simulated pod echoes).
        let mut c = k();
        c.args(["port-forward", "pod/web-0", ":8080"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let port = crate::support::forwarded_port(&mut child);
        let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let msg = format!("ping through port-forward {tag}");
        sock.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        sock.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
        drop(sock);
        let _ = child.kill();
        let _ = child.wait();
        let pf = env
            .dev
            .alpha
            .record
            .matching("/api/v1/namespaces/default/pods/web-0/portforward")
            .pop()
            .expect("port-forward reached alpha");
        let pf_ws = version >= "1.31";
        assert_eq!(
            pf.header("upgrade").map(str::to_ascii_lowercase).as_deref(),
            Some(if pf_ws { "websocket" } else { "spdy/3.1" }),
            "kubectl {version} port-forward protocol"
        );
    }

    // auth whoami: the impersonated identity on alpha, the token's own on beta.
    for (ctx, cluster) in [("alpha", &env.dev.alpha), ("beta", &env.dev.beta)] {
        let mut c = env.kubectl(version, ctx);
        c.args(["auth", "whoami", "-o", "json"]);
        let out = ok(&run(c, None, T), "auth whoami");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["status"]["userInfo"]["username"], "alice", "{out}");
        assert!(
            v["status"]["userInfo"]["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == "dev:admins"),
            "{out}"
        );
        let r = cluster
            .record
            .matching("/apis/authentication.k8s.io/")
            .pop()
            .unwrap();
        if ctx == "alpha" {
            assert_eq!(r.header("impersonate-user"), Some("alice"));
        } else {
            assert!(r.header("impersonate-user").is_none());
            assert!(
                r.header("authorization").unwrap().len() > 100,
                "the user's own JWT"
            );
        }
    }

    // bob may read beta and nothing more; the relay's Status reaches the terminal.
    ok(
        &run(
            {
                let mut c = env.kubectl(version, "bob@beta");
                c.args(["get", "pods"]);
                c
            },
            None,
            T,
        ),
        "bob get",
    );
    let denied = run(
        {
            let mut c = env.kubectl(version, "bob@beta");
            c.args(["delete", "pod", "web-0"]);
            c
        },
        None,
        T,
    );
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("Error from server (Forbidden)"), "{err}");
    // `kubectl get --raw` drops the path prefix: tls-server-name still routes it.
    let out = ok(
        &run(
            {
                let mut c = env.kubectl(version, "beta");
                c.args(["get", "--raw", "/version"]);
                c
            },
            None,
            T,
        ),
        "get --raw",
    );
    assert!(out.contains("gitVersion"), "{out}");

    rt.block_on(env.dev.stop());
}

#[test]
fn kubectl_1_27() {
    kubectl_matrix("1.27");
}

#[test]
fn kubectl_1_29() {
    kubectl_matrix("1.29");
}

#[test]
fn kubectl_1_30() {
    kubectl_matrix("1.30");
}

#[test]
fn kubectl_1_31() {
    kubectl_matrix("1.31");
}

#[test]
fn kubectl_1_33() {
    kubectl_matrix("1.33");
}
