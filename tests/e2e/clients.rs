//! The other real clients through the relay: the Python `kubernetes` client (HTTP/1.1 REST,
//! watch, WebSocket v4 exec and port-forward) and `@kubernetes/client-node` (list, exec).
//! Their packages are installed, pinned, by scripts/install-test-deps.sh.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_kubernetes_client() {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/install-test-deps.sh (scripts/test does)",
        python.display()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(dev_env());
    for ctx in ["alpha", "beta"] {
        let mut c = Command::new(&python);
        c.arg(repo().join("tests/clients/python/check_client.py"))
            .arg("--kubeconfig")
            .arg(env.kubeconfig())
            .args(["--context", ctx])
            .env("HOME", &env.home);
        let out = ok(
            &run(c, None, Duration::from_secs(120)),
            &format!("python client on {ctx}"),
        );
        println!("{out}");
    }
    let ws = env
        .dev
        .alpha
        .record
        .matching("/api/v1/namespaces/default/pods/web-0/exec");
    assert!(ws.iter().any(|r| r
        .header("sec-websocket-protocol")
        .is_some_and(|p| p.contains("v4.channel.k8s.io"))));
    rt.block_on(env.dev.stop());
}

#[test]
fn kubernetes_client_node() {
    let script = repo().join("tests/clients/node/check_client.mjs");
    assert!(
        repo().join("tests/clients/node/node_modules").exists(),
        "run scripts/install-test-deps.sh (scripts/test does)"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(dev_env());
    for ctx in ["alpha", "beta"] {
        let mut c = Command::new("node");
        c.arg(&script)
            .arg("--kubeconfig")
            .arg(env.kubeconfig())
            .args(["--context", ctx])
            .env("HOME", &env.home);
        let out = ok(
            &run(c, None, Duration::from_secs(120)),
            &format!("client-node on {ctx}"),
        );
        println!("{out}");
    }
    rt.block_on(env.dev.stop());
}
