//! Proves the benchmark harness works (issue 6): runs `scripts/bench --quick` against the relay
//! binary this test suite built, with the stage (dev issuer + kube-sim) running in this process.
//! No timing assertions: only that every scenario ran and the report was written. Beside it, the
//! training of the profile-guided build (`scripts/pgo --train-only`) against the same binary.
//!
//! Skipped (passes with a note) when h2load, nginx or python3 are missing; scripts/bench installs
//! them (`nginx-light`, `nghttp2-client`, `wrk`) when run by hand.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

#[path = "../../examples/bench_stage/stage.rs"]
mod stage;

const TIMEOUT: Duration = Duration::from_secs(240);

/// Runs a harness script to its end, its output read as it comes (a full pipe must not stall
/// it); killed after [`TIMEOUT`].
async fn run_to_end(mut cmd: Command, what: &str) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(TIMEOUT, cmd.output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("python3 runs {what}: {e}")),
        Err(_) => panic!("{what} took longer than {TIMEOUT:?}"),
    }
}

/// The harness needs h2load, nginx and python3 (scripts/install-test-deps.sh installs them for
/// the test suite, scripts/bench when run by hand); says which are missing.
fn tools_missing() -> bool {
    let missing: Vec<&str> = ["h2load", "nginx", "python3"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        eprintln!("bench_harness: skipped, missing {missing:?} (scripts/bench installs them)");
    }
    !missing.is_empty()
}

fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    found || Path::new("/usr/sbin").join(tool).is_file()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_runs_every_scenario_and_writes_the_report() {
    if tools_missing() {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("tempdir");
    let out = tempfile::tempdir().expect("tempdir");
    let running = stage::start(work.path()).await.expect("stage starts");
    assert!(running.info["relay"].is_string(), "{}", running.info);

    let mut cmd = Command::new("python3");
    cmd.arg(root.join("scripts/bench"))
        .args(["--quick", "--no-install", "--no-build", "--no-criterion"])
        .arg("--relay-bin")
        .arg(env!("CARGO_BIN_EXE_kube-relay"))
        .arg("--stage-dir")
        .arg(work.path())
        .arg("--out")
        .arg(out.path());
    let output = run_to_end(cmd, "scripts/bench --quick").await;
    let status = output.status;
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

/// The profile-guided build's training (scripts/pgo) runs every workload against the relay and
/// stops it cleanly (the instrumented relay writes its profile only on a clean exit). The two
/// builds around it are left to `scripts/pgo` itself: each is a whole release build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgo_training_runs_every_workload_and_stops_the_relay_cleanly() {
    if tools_missing() {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("tempdir");
    let running = stage::start(work.path()).await.expect("stage starts");
    let mut cmd = Command::new("python3");
    cmd.arg(root.join("scripts/pgo"))
        .args(["--train-only", "--quick", "--relay-bin"])
        .arg(env!("CARGO_BIN_EXE_kube-relay"))
        .arg("--stage-dir")
        .arg(work.path());
    let output = run_to_end(cmd, "scripts/pgo --train-only").await;
    drop(running);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scripts/pgo --train-only failed\n{stderr}"
    );
    let mut workloads = vec![
        "static-pt HTTP/2",
        "static-pt HTTP/1.1",
        "static HTTP/2",
        "static HTTP/1.1",
        "alpha HTTP/2",
        "alpha HTTP/1.1",
        "fixed rate",
    ];
    if have("kubectl") {
        workloads.push("exec and port-forward");
    }
    for w in workloads {
        assert!(
            stderr.contains(&format!("pgo: trained: {w}")),
            "workload {w:?} did not run\n{stderr}"
        );
    }
}
