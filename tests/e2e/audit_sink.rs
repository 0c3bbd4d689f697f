//! `audit.mode` against a disk that fills up and frees again (a small tmpfs mounted by the test;
//! CI runs as root): `blocking` refuses requests with a 503 naming the sink while records cannot
//! be written and answers no request without its record; `best_effort` keeps serving and counts
//! what it lost. In both modes no record is ever torn.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{admin_get, eventually, parse_response, CustomRelay, FakeUpstream};
use serde_json::Value;

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system: writes a filler file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let p = self.path().join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let block = [0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The fake cluster answers one request per connection: it asks for a close, so the relay dials
/// afresh for the next.
const UPSTREAM_ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";

async fn get(relay: &CustomRelay, token: &str) -> (u16, String, String) {
    let req = format!(
        "GET /clusters/alpha/api HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let raw = relay.exchange("localhost", req.as_bytes()).await;
    parse_response(&raw)
}

fn audit_id(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("audit-id: "))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Every line parses (no torn record); the audit ids of the records at `stage`.
fn records_at(path: &Path, stage: &str) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("torn record {l:?}: {e}"));
            (v["stage"] == stage).then(|| v["auditID"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// The audit ids of the final records (every line parsed).
fn records(path: &Path) -> Vec<String> {
    records_at(path, "ResponseComplete")
}

fn dropped(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("relay_audit_dropped_total "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_audit_refuses_while_the_disk_is_full_and_answers_nothing_unrecorded() {
    let disk = Tmpfs::mount("512k");
    let log = disk.path().join("audit.jsonl");
    let alpha = FakeUpstream::start(UPSTREAM_ANSWER).await;
    let relay = CustomRelay::start_audited(
        &[("alpha", &alpha)],
        &format!("audit: {{path: \"{}\", mode: blocking}}", log.display()),
        "",
    )
    .await;
    let token = relay.token("alice");
    let mut answered = Vec::new();
    for _ in 0..10 {
        let (code, head, body) = get(&relay, &token).await;
        assert_eq!(code, 200, "{body}");
        answered.push(audit_id(&head));
    }

    // The disk fills: once the last free bytes of the log's last page are used, requests are
    // refused with a 503 that names the sink (five in a row show it holds).
    let filler = disk.fill();
    let mut in_a_row = 0;
    for _ in 0..50 {
        let (code, head, body) = get(&relay, &token).await;
        match code {
            503 => {
                in_a_row += 1;
                let status: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(status["reason"], "ServiceUnavailable");
                assert!(
                    status["message"]
                        .as_str()
                        .unwrap()
                        .contains(&log.display().to_string()),
                    "{body}"
                );
                if in_a_row == 5 {
                    break;
                }
            }
            // A record that still fitted.
            200 => {
                in_a_row = 0;
                answered.push(audit_id(&head));
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(in_a_row, 5, "requests are refused while the disk is full");

    // Space again: within the probe interval requests are served, and recorded, again.
    std::fs::remove_file(&filler).unwrap();
    let (head, _) = eventually(
        "served again after the disk frees",
        Duration::from_secs(15),
        || async {
            match get(&relay, &token).await {
                (200, head, body) => Ok((head, body)),
                (code, _, body) => Err(format!("{code} {body}")),
            }
        },
    )
    .await;
    answered.push(audit_id(&head));
    for _ in 0..10 {
        let (code, head, body) = get(&relay, &token).await;
        assert_eq!(code, 200, "{body}");
        answered.push(audit_id(&head));
    }

    // Every request that got an answer other than the refusal has its record, once, and was
    // recorded as received before it went to the cluster.
    let received = records_at(&log, "RequestReceived");
    for id in &answered {
        assert!(received.contains(id), "{id} reached the cluster unrecorded");
    }
    let ids = records(&log);
    for id in &answered {
        assert_eq!(
            ids.iter().filter(|r| *r == id).count(),
            1,
            "answered request {id} has no record ({} records for {} answers)",
            ids.len(),
            answered.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_audit_keeps_serving_and_counts_what_it_lost() {
    let disk = Tmpfs::mount("512k");
    let log = disk.path().join("audit.jsonl");
    let alpha = FakeUpstream::start(UPSTREAM_ANSWER).await;
    let relay = CustomRelay::start_audited(
        &[("alpha", &alpha)],
        &format!("audit: {{path: \"{}\"}}", log.display()),
        "",
    )
    .await;
    let token = relay.token("alice");
    let filler = disk.fill();
    for _ in 0..10 {
        let (code, _, body) = get(&relay, &token).await;
        assert_eq!(code, 200, "best effort serves on: {body}");
    }
    eventually("lost records counted", Duration::from_secs(10), || async {
        let n = dropped(&admin_get(relay.admin, "/metrics").await);
        if n >= 9 {
            Ok(n)
        } else {
            Err(n)
        }
    })
    .await;
    std::fs::remove_file(&filler).unwrap();
    let (_, head, _) = get(&relay, &token).await;
    let id = audit_id(&head);
    eventually(
        "recorded again once the disk frees",
        Duration::from_secs(15),
        || async {
            if records(&log).contains(&id) {
                Ok(())
            } else {
                Err("not yet")
            }
        },
    )
    .await;
}
