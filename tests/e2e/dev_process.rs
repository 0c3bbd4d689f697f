//! `kube-relay dev` as a newcomer runs it: a separate process, driven with plain kubectl.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

#[test]
fn kube_relay_dev_works_with_plain_kubectl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-relay"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(l) = line else { break };
            let _ = tx.send(l);
        }
    });
    let mut banner = Vec::new();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("kube-relay dev prints its banner within 30s");
        let done = l.starts_with("Ctrl-C");
        banner.push(l);
        if done {
            break;
        }
    }
    let text = banner.join("\n");
    assert!(text.contains("kube-relay dev: ready"), "{text}");
    assert!(text.contains("kubectl exec -it web-0 -- cat"), "{text}");
    let kubeconfig = dir.join("kubeconfig");
    assert!(kubeconfig.exists());
    assert!(dir.join("relay.yaml").exists());
    let check = run(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
            c.args(["check-config", "--config"])
                .arg(dir.join("relay.yaml"));
            c
        },
        None,
        Duration::from_secs(30),
    );
    ok(&check, "check-config on the dev config");

    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let k = |args: &[&str]| {
        let mut c = Command::new(kubectl("1.33"));
        c.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .env("HOME", &home)
            .env_remove("KUBECONFIG");
        c
    };
    let out = ok(
        &run(k(&["get", "pods"]), None, Duration::from_secs(60)),
        "get pods (current context alpha)",
    );
    assert!(out.contains("web-0"), "{out}");
    for ctx in ["beta", "alpha-sni", "beta-sni", "bob@beta"] {
        let out = ok(
            &run(
                k(&["--context", ctx, "get", "pods"]),
                None,
                Duration::from_secs(60),
            ),
            ctx,
        );
        assert!(out.contains("web-0"), "{ctx}: {out}");
    }
    let out = ok(
        &run(
            k(&["exec", "-i", "web-0", "--", "cat"]),
            Some(b"dev mode works\n"),
            Duration::from_secs(60),
        ),
        "exec",
    );
    assert_eq!(out, "dev mode works\n");
    let denied = run(
        k(&["--context", "bob@beta", "delete", "pod", "web-0"]),
        None,
        Duration::from_secs(60),
    );
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Forbidden"));
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("kube-relay dev exits on Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn check_config_and_serve_report_every_problem_and_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("relay.yaml");
    std::fs::write(
        &cfg,
        "listen: 0.0.0.0:8443\npublic_url: https://relay.example.com\ntls: {cert_file: nope.crt, key_file: nope.key}\n\
         identity:\n  issuers:\n    - {name: gh, kind: oidc, issuer: https://token.actions.githubusercontent.com, audiences: [x]}\n\
         clusters:\n  - {name: Bad_Name, server: https://a.example, ca_file: missing-ca.crt, upstream_auth: {mode: passthrough}, acess: []}\n\
         typo_key: 1\n",
    )
    .unwrap();
    for verb in ["check-config", "serve"] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
        c.args([verb, "--config"]).arg(&cfg);
        let out = run(c, None, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(1), "{verb}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for expected in [
            "tls.cert_file: cannot read",
            "tls.key_file: cannot read",
            "clusters[0].acess: unknown field `acess`",
            "typo_key: unknown key",
        ] {
            assert!(
                err.contains(expected),
                "{verb}: missing {expected:?} in:\n{err}"
            );
        }
    }
    // The valid parts of a file do not hide the invalid ones in other clusters.
    std::fs::write(
        &cfg,
        "listen: 0.0.0.0:8443\npublic_url: https://relay.example.com\ntls: {cert_file: nope.crt, key_file: nope.key}\n\
         identity:\n  issuers:\n    - {name: gh, kind: oidc, issuer: https://token.actions.githubusercontent.com, audiences: [x]}\n\
         clusters:\n  - {name: Bad_Name, server: https://a.example, ca_file: missing-ca.crt, upstream_auth: {mode: passthrough}}\n",
    )
    .unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
    c.args(["check-config", "--config"]).arg(&cfg);
    let out = run(c, None, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clusters[0].name: `Bad_Name` is not a valid cluster name"),
        "{err}"
    );
    assert!(err.contains("clusters[0].ca_file: cannot read"), "{err}");
    assert!(err.contains("problem(s) found"), "{err}");
}
