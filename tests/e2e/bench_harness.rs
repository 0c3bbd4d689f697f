//! Proves the benchmark harness works (issue 6): runs `scripts/bench --quick` against the relay
//! binary this test suite built, with the stage (dev issuer + kube-sim) running in this process.
//! No timing assertions: only that every scenario ran and the report was written.
//!
//! Skipped (passes with a note) when h2load, nginx or python3 are missing; scripts/bench installs
//! them (`nginx-light`, `nghttp2-client`, `wrk`) when run by hand.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

#[path = "../../examples/bench_stage/stage.rs"]
mod stage;

const TIMEOUT: Duration = Duration::from_secs(240);

fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    found || Path::new("/usr/sbin").join(tool).is_file()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_runs_every_scenario_and_writes_the_report() {
    let missing: Vec<&str> = ["h2load", "nginx", "python3"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        eprintln!("bench_harness: skipped, missing {missing:?} (scripts/bench installs them)");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("tempdir");
    let out = tempfile::tempdir().expect("tempdir");
    let running = stage::start(work.path()).await.expect("stage starts");
    assert!(running.info["relay"].is_string(), "{}", running.info);

    let mut child = Command::new("python3")
        .arg(root.join("scripts/bench"))
        .args(["--quick", "--no-install", "--no-build", "--no-criterion"])
        .arg("--relay-bin")
        .arg(env!("CARGO_BIN_EXE_kube-relay"))
        .arg("--stage-dir")
        .arg(work.path())
        .arg("--out")
        .arg(out.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs scripts/bench");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("scripts/bench --quick took longer than {TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = child.wait_with_output().expect("output");
    drop(running);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.success(),
        "scripts/bench --quick failed\n{stdout}\n{stderr}"
    );
    for scenario in [
        "GET throughput",
        "latency p99",
        "8 independent clients",
        "full TLS handshakes",
        "idle watches",
        "ready after start",
    ] {
        assert!(
            stdout.contains(scenario),
            "no {scenario:?} row in the table\n{stdout}\n{stderr}"
        );
    }
    let report = std::fs::read_to_string(out.path().join("latest.md")).expect("report written");
    assert!(report.contains("| scenario |"), "{report}");
    for svg in ["throughput.svg", "latency.svg", "handshakes.svg"] {
        let text = std::fs::read_to_string(out.path().join(svg)).expect("plot written");
        assert!(text.starts_with("<svg"), "{svg}: {text}");
    }
}
