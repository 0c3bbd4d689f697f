//! Session recording (docs/security.md G-rows): exec sessions through the relay with kubectl
//! 1.27 (SPDY) and 1.33 (WebSocket) are recorded as asciicast v2 while they run, each audit
//! record names its recording, and a required recording whose store cannot be written refuses
//! the session with a Status saying why.

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use crate::support::*;

/// The `ResponseComplete` records of exec sessions in the dev environment's audit log.
fn exec_records(env: &Env) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.dev.dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["stage"] == "ResponseComplete" && r["objectRef"]["subresource"] == "exec")
        .collect()
}

/// `kubectl exec -n default web-0 -- <command>` on alpha with kubectl `version`.
fn exec(env: &Env, version: &str, command: &[&str]) -> std::process::Output {
    env.kubectl(version, "alpha")
        .args(["exec", "-n", "default", "web-0", "--"])
        .args(command)
        .output()
        .unwrap()
}

/// Waits (bounded) for the exec record after the first `before` and returns it.
async fn exec_record_after(env: &Env, before: usize) -> serde_json::Value {
    eventually(
        "the session's ResponseComplete record",
        Duration::from_secs(60),
        || async {
            let all = exec_records(env);
            all.get(before).cloned().ok_or(all.len())
        },
    )
    .await
}

/// A recording's lines: the header, then the events.
fn read_cast(env: &Env, name: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(env.dev.dir.join("recordings").join(name))
        .unwrap_or_else(|e| panic!("recording {name}: {e}"));
    let mut lines = text.lines().map(|l| serde_json::from_str(l).unwrap());
    let header = lines.next().expect("a header line");
    (header, lines.collect())
}

fn shown(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .filter(|e| e[1] == "o")
        .map(|e| e[2].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_sessions_are_recorded_over_spdy_and_websocket() {
    let env = dev_env().await;
    for (version, protocol) in [("1.27", "spdy"), ("1.33", "websocket")] {
        let before = exec_records(&env).len();
        // An interactive shell: what is typed goes in on stdin, what it prints comes back.
        let mut child = env
            .kubectl(version, "alpha")
            .args(["exec", "-i", "-n", "default", "web-0", "--", "sh"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "echo recorded-by-{version}").unwrap();
        writeln!(stdin, "echo to-stderr-{version} >&2").unwrap();
        writeln!(stdin, "exit").unwrap();
        drop(stdin);
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("recorded-by-{version}")),
            "kubectl {version}: {stdout} / {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let record = exec_record_after(&env, before).await;
        let notes = &record["annotations"];
        assert_eq!(notes["kube-relay.io/protocol"], protocol, "{notes}");
        assert!(
            notes.get("kube-relay.io/recording-error").is_none(),
            "{notes}"
        );
        let name = notes["kube-relay.io/recording"]
            .as_str()
            .unwrap_or_else(|| panic!("no recording named in {notes}"));
        assert!(
            name.starts_with("alpha_") && name.ends_with(".cast"),
            "{name}"
        );
        let (header, events) = read_cast(&env, name);
        assert_eq!(header["version"], 2);
        assert!(header["title"]
            .as_str()
            .unwrap()
            .contains("alice on alpha: default/web-0"));
        assert_eq!(header["command"], "sh");
        let text = shown(&events);
        assert!(text.contains(&format!("recorded-by-{version}")), "{text}");
        assert!(text.contains(&format!("to-stderr-{version}")), "{text}");
        // Times only grow, and what was typed is not recorded unless asked for.
        let times: Vec<f64> = events.iter().map(|e| e[0].as_f64().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        assert!(events.iter().all(|e| e[1] != "i"));
    }
    env.dev.stop().await;
}

/// Recording reads the tunnel; it never changes it: 1 MiB of binary stdin comes back from
/// `cat` byte for byte through a recorded session, over SPDY and WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_sessions_relay_every_byte_unchanged() {
    let env = dev_env().await;
    let payload: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for version in ["1.27", "1.33"] {
        let before = exec_records(&env).len();
        let mut c = env.kubectl(version, "alpha");
        c.args(["exec", "-i", "-n", "default", "web-0", "--", "cat"]);
        let out = run(c, Some(&payload), Duration::from_secs(60));
        assert!(out.status.success(), "kubectl {version}");
        assert!(
            out.stdout == payload,
            "kubectl {version}: {} bytes back",
            out.stdout.len()
        );
        let record = exec_record_after(&env, before).await;
        assert!(
            record["annotations"]["kube-relay.io/recording"].is_string(),
            "{record}"
        );
    }
    env.dev.stop().await;
}

/// docs/security.md G: recording: required fails closed. With the store unwritable, kubectl
/// is refused with a Status naming the reason and nothing runs in the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_recording_that_cannot_be_written_refuses_the_session() {
    let env = dev_env().await;
    // A file where the recordings directory should be: nothing can be created in it.
    let dir = env.dev.dir.join("recordings");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::write(&dir, "not a directory").unwrap();
    for version in ["1.27", "1.33"] {
        let out = exec(&env, version, &["echo", "must-not-run"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "kubectl {version} ran the command");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("must-not-run"),
            "kubectl {version}"
        );
        assert!(
            stderr.contains("requires session recording")
                && stderr.contains("the session was not started"),
            "kubectl {version}: {stderr}"
        );
    }
    // doctor says so before any session would.
    let check = doctor_store_row(&env).await;
    assert_eq!(
        check.outcome,
        kube_relay::cli::doctor::Outcome::Fail,
        "{}",
        check.detail
    );
    assert!(check.detail.contains("recordings"), "{}", check.detail);
    // Reads are not sessions: they go on.
    let out = env
        .kubectl("1.33", "alpha")
        .args(["get", "pods", "-n", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    env.dev.stop().await;
}

/// The record of the exec session after the first `before`, whose recording stopped at
/// `limit`: the record says why, and the recording ends with the marker, within `limit` (plus
/// that marker line). Returns the record's annotations.
async fn record_cut_at_the_limit(env: &Env, before: usize, limit: usize) -> serde_json::Value {
    let record = exec_record_after(env, before).await;
    let notes = record["annotations"].clone();
    assert!(
        notes["kube-relay.io/recording-error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("recording.max_session_size ({limit} bytes)"))),
        "{notes}"
    );
    let name = notes["kube-relay.io/recording"]
        .as_str()
        .unwrap_or_else(|| panic!("no recording named in {notes}"));
    let path = env.dev.dir.join("recordings").join(name);
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(size <= limit + 200, "{name}: {size} bytes");
    let (_, events) = read_cast(env, name);
    let last = events.last().expect("events");
    assert_eq!(last[1], "m", "{name} ends with {last}");
    assert!(events[..events.len() - 1].iter().any(|e| e[1] == "o"));
    notes
}

/// docs/security.md G8: one session cannot grow its recording without bound. At
/// `recording.max_session_size` the recording stops with a marker; a required recording then
/// ends its session (`recording_failed`), an optional one lets it go on; the audit record says
/// why either way. kubectl 1.27 (SPDY) and 1.33 (WebSocket) stream 9.25 MB through `cat`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_stops_at_its_size_limit_and_a_required_one_ends_its_session() {
    let env = dev_env().await;
    let config = env.dev.dir.join("relay.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let capped = text.replacen("recording:\n", "recording:\n  max_session_size: 256Ki\n", 1);
    assert_ne!(capped, text, "the dev config's recording section moved");
    std::fs::write(&config, &capped).unwrap();
    env.dev
        .relay_handle
        .reload()
        .await
        .expect("the limit loads");
    let limit = 256 << 10;
    // Text, so that each piece `cat` sends back is an event well under the limit.
    let payload: Vec<u8> = (0..250_000u32)
        .flat_map(|i| format!("line {i:08} of what cat sends back\n").into_bytes())
        .collect();
    let cat = |version: &str| {
        let mut c = env.kubectl(version, "alpha");
        c.args(["exec", "-i", "-n", "default", "web-0", "--", "cat"]);
        run(c, Some(&payload), Duration::from_secs(90))
    };
    // alpha's recording is required: the session ends when its recording is full. Over
    // WebSocket kubectl is told why on the error channel and fails with it; over SPDY the
    // relay closes the tunnel and kubectl 1.27 exits 0 with what it got (docs/protocols.md).
    for version in ["1.27", "1.33"] {
        let before = exec_records(&env).len();
        let out = cat(version);
        assert!(
            out.stdout.len() < payload.len(),
            "kubectl {version}: {:?}, {} bytes back",
            out.status,
            out.stdout.len()
        );
        if version == "1.33" {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success()
                    && stderr.contains("kube-relay ended the session")
                    && stderr.contains("requires session recording"),
                "kubectl {version}: {:?}: {stderr}",
                out.status
            );
        }
        let notes = record_cut_at_the_limit(&env, before, limit).await;
        assert_eq!(
            notes["kube-relay.io/close-reason"], "recording_failed",
            "{notes}"
        );
    }
    // Optional: the session goes on whole, recorded up to the limit.
    let optional = capped.replacen("    recording: required\n", "    recording: optional\n", 1);
    assert_ne!(optional, capped, "alpha's recording mode moved");
    std::fs::write(&config, optional).unwrap();
    env.dev.relay_handle.reload().await.expect("optional loads");
    for version in ["1.27", "1.33"] {
        let before = exec_records(&env).len();
        let out = cat(version);
        assert!(out.status.success(), "kubectl {version}");
        assert!(
            out.stdout == payload,
            "kubectl {version}: {} bytes back",
            out.stdout.len()
        );
        let notes = record_cut_at_the_limit(&env, before, limit).await;
        assert_ne!(
            notes["kube-relay.io/close-reason"], "recording_failed",
            "{notes}"
        );
    }
    env.dev.stop().await;
}

/// The client the relay authenticates to Azure Storage as (client secret, at the tests' token
/// endpoint, which mints v1 tokens for `https://storage.azure.com` that Azurite accepts).
const STORAGE_APP: &str = "5a5a5a5a-0000-0000-0000-00000000005a";
const STORAGE_SECRET: &str = "storage-app-secret";

/// Switches the dev environment's recordings to Azurite and reloads; returns what the test needs
/// to keep running (the emulator, the token endpoint).
async fn record_to_azurite(
    env: &Env,
) -> (
    crate::support::storage::Azurite,
    kube_sim::token_endpoint::TokenEndpointHandle,
) {
    let dir = env.dev.dir.clone();
    let azurite = crate::support::storage::Azurite::start(&dir).await;
    let entra = dir.join("entra");
    std::fs::create_dir_all(&entra).unwrap();
    let (_ca, tls) = crate::support::tenant::test_pki(&entra, "storage tenant CA");
    let (authority, _, te) = crate::support::tenant::token_endpoint(&tls, |c| {
        c.client_secrets
            .insert(STORAGE_APP.into(), STORAGE_SECRET.into());
    })
    .await;
    std::fs::write(dir.join("storage-secret"), STORAGE_SECRET).unwrap();
    let config = dir.join("relay.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let file_store = "  store:\n    kind: file\n    dir: recordings\n";
    assert!(
        text.contains(file_store),
        "the dev config's recording store moved"
    );
    let blob_store = format!(
        "  store:\n    kind: azure_blob\n    account_url: {}\n    container: kube-relay-recordings\n    ca_file: {}\n    credential: {{azure: {{credential: client_secret, client_id: {STORAGE_APP}, tenant_id: {}, client_secret_file: storage-secret, authority_host: \"{authority}\", ca_file: entra/ca.crt}}}}\n",
        azurite.account_url,
        azurite.ca_file.display(),
        crate::support::tenant::TID,
    );
    std::fs::write(&config, text.replacen(file_store, &blob_store, 1)).unwrap();
    env.dev
        .relay_handle
        .reload()
        .await
        .expect("the blob store configuration loads");
    (azurite, te)
}

/// The relay's own store client, built from the running configuration: reads back what the
/// relay wrote, through the same code the portal's playback uses.
fn store_of(env: &Env) -> kube_relay::recording::RecordingStore {
    let cfg = kube_relay::config::load(&env.dev.dir.join("relay.yaml")).unwrap();
    kube_relay::recording::RecordingStore::new(&cfg.recording.unwrap().store).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_recorded_to_azure_blob_storage() {
    let env = dev_env().await;
    let (_azurite, _te) = record_to_azurite(&env).await;
    for version in ["1.27", "1.33"] {
        let before = exec_records(&env).len();
        let out = exec(&env, version, &["echo", &format!("in-a-blob-{version}")]);
        assert!(
            out.status.success(),
            "kubectl {version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let record = exec_record_after(&env, before).await;
        let notes = &record["annotations"];
        assert!(
            notes.get("kube-relay.io/recording-error").is_none(),
            "{notes}"
        );
        let name = notes["kube-relay.io/recording"]
            .as_str()
            .unwrap()
            .to_owned();
        let store = store_of(&env);
        let listed = store.list().await.unwrap();
        assert!(listed.iter().any(|l| l.name == name), "{listed:?}");
        let cast = store.read(&name).await.unwrap().expect("the blob exists");
        let text = String::from_utf8(cast.to_vec()).unwrap();
        assert!(text.starts_with("{\"command\":\"echo in-a-blob"), "{text}");
        assert!(text.contains(&format!("in-a-blob-{version}\\n")), "{text}");
    }
    // doctor checks the store with the relay's identity.
    let check = doctor_store_row(&env).await;
    assert_eq!(
        check.outcome,
        kube_relay::cli::doctor::Outcome::Ok,
        "{}",
        check.detail
    );
    assert!(
        check.detail.contains("kube-relay-recordings"),
        "{}",
        check.detail
    );
    env.dev.stop().await;
}

/// `kube-relay doctor`'s `recording store` row for the dev environment's configuration.
async fn doctor_store_row(env: &Env) -> kube_relay::cli::doctor::Check {
    let report = kube_relay::cli::doctor::run_file(
        &env.dev.dir.join("relay.yaml"),
        &kube_relay::cli::doctor::Options::default(),
    )
    .await;
    report
        .find("recording", "store")
        .cloned()
        .unwrap_or_else(|| panic!("no recording row:\n{}", report.render()))
}

/// docs/security.md G: with recording required, a store that fails mid-session ends the
/// session, and its audit record says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_recording_whose_store_fails_mid_session_ends_the_session() {
    let env = dev_env().await;
    let (azurite, _te) = record_to_azurite(&env).await;
    let before = exec_records(&env).len();
    let mut child = env
        .kubectl("1.33", "alpha")
        .args(["exec", "-i", "-n", "default", "web-0", "--", "sh"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "echo before-the-outage").unwrap();
    // The session's first lines reach the store while it is up.
    let store = store_of(&env);
    eventually(
        "the first lines in the store",
        Duration::from_secs(30),
        || async {
            for l in store.list().await.map_err(|e| e.to_string())? {
                let text = store.read(&l.name).await.map_err(|e| e.to_string())?;
                if text.is_some_and(|t| String::from_utf8_lossy(&t).contains("before-the-outage")) {
                    return Ok(());
                }
            }
            Err("not yet".to_owned())
        },
    )
    .await;
    drop(azurite);
    writeln!(stdin, "echo during-the-outage").unwrap();
    let record = exec_record_after(&env, before).await;
    let notes = &record["annotations"];
    assert_eq!(
        notes["kube-relay.io/close-reason"], "recording_failed",
        "{notes}"
    );
    assert!(
        notes["kube-relay.io/recording-error"]
            .as_str()
            .is_some_and(|e| e.contains("appending to the recording")),
        "{notes}"
    );
    drop(stdin);
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    env.dev.stop().await;
}

/// docs/security.md G3: what kubectl's token rides on (the upgrade request) is never part of a
/// recording; only the terminal's channels are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_hold_what_the_terminal_showed_and_no_token() {
    let env = dev_env().await;
    for version in ["1.27", "1.33"] {
        let out = exec(&env, version, &["env"]);
        assert!(out.status.success(), "kubectl {version}");
    }
    // Each session's record is written once its recording is complete.
    exec_record_after(&env, 1).await;
    let dir = env.dev.dir.join("recordings");
    let names = eventually("two recordings", Duration::from_secs(20), || async {
        let names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if names.len() >= 2 {
            Ok(names)
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    for name in names {
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        assert!(
            text.contains("HOSTNAME"),
            "{name}: the command's output is there"
        );
        // Neither the user's token (a JWT) nor the relay's own (alpha is in impersonate mode).
        let relay_token = std::fs::read_to_string(env.dev.dir.join("relay-token")).unwrap();
        for secret in [
            "eyJ",
            "Bearer",
            "authorization",
            "Authorization",
            relay_token.trim(),
        ] {
            assert!(!text.contains(secret), "{name} holds {secret:?}");
        }
    }
    env.dev.stop().await;
}

/// The same through the test bed's real kube-apiserver (v1.34) and its kubelet stand-in:
/// kubectl 1.27 (SPDY end to end) and 1.33 (WebSocket, which the API server turns into SPDY
/// to the kubelet), with stdin, and a TTY session whose terminal size the recording carries.
#[test]
fn exec_through_the_real_api_server_is_recorded() {
    use crate::support::real::*;
    let t = Duration::from_secs(60);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idp = rt.block_on(EntraIdp::start());
    let cluster = RealCluster::start(&rt, Options::new("rec"));
    let token_file = cluster.dir.path().join("relay-sa-token");
    std::fs::write(&token_file, cluster.relay_sa_token()).unwrap();
    let front = Front::start(
        &rt,
        &idp,
        &[Upstream {
            cluster: &cluster,
            alias: None,
            connect_port: None,
            upstream_auth: format!(
                "{{mode: impersonate, token_file: \"{}\"}}",
                token_file.display()
            ),
            access: format!("[{{groups: [{GROUP_OPS}]}}]\nrecording: required"),
        }],
        &[("alice", idp.user_token(OID_ALICE, &[GROUP_OPS]))],
        "recording: {store: {kind: file, dir: recordings}}",
    );
    for version in ["1.27", "1.33"] {
        let mut c = front.kubectl(version, "rec");
        c.args(["exec", "-i", "web-0", "--", "cat"]);
        let payload = format!("through the API server with {version}\n");
        let out = ok(&run(c, Some(payload.as_bytes()), t), "exec -i");
        assert!(out.contains(&payload), "{out}");
    }
    // A TTY session under a real pseudo-terminal of 100x30. kubectl sends the terminal's size
    // beside the command's start, so a command that ended at once could close the session
    // before that message reached the relay: this one prints, then waits on its input, and the
    // test ends the session only once the recording holds both the output and the size.
    let cmdline = format!(
        "stty cols 100 rows 30; {} --kubeconfig {} --context rec exec -it web-0 -- sh -c 'echo tty-recorded; cat'",
        kubectl("1.33").display(),
        front.kubeconfig.display()
    );
    let mut s = crate::support::under_pty(&cmdline);
    s.env("HOME", &front.home)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut tty_session = s.spawn().expect("kubectl exec -it under a pty");
    let dir = front.audit.parent().unwrap().join("recordings");
    let casts = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    // The terminal's size: the header's when it came before any output, else a resize event.
    let sized = |tty: &str| {
        let header: serde_json::Value =
            serde_json::from_str(tty.lines().next().unwrap_or("{}")).unwrap_or_default();
        (header["width"].as_u64(), header["height"].as_u64()) == (Some(100), Some(30))
            || tty.contains("\"r\",\"100x30\"")
    };
    rt.block_on(eventually(
        "the TTY session's output and size recorded",
        t,
        || async {
            let all = casts();
            match all.iter().find(|c| c.contains("tty-recorded")) {
                Some(tty) if sized(tty) => Ok(()),
                other => Err(other.cloned()),
            }
        },
    ));
    // Closing the session's input ends `cat`, and the session with it.
    drop(tty_session.stdin.take());
    let _ = tty_session.kill();
    let _ = tty_session.wait();

    // A session's record is written once its recording is complete.
    let sessions = || {
        front
            .audit_records()
            .into_iter()
            .filter(|r| r["stage"] == "ResponseComplete" && r["objectRef"]["subresource"] == "exec")
            .collect::<Vec<_>>()
    };
    rt.block_on(eventually("three session records", t, || async {
        let n = sessions().len();
        if n >= 3 {
            Ok(())
        } else {
            Err(n)
        }
    }));
    let casts = casts();
    assert_eq!(casts.len(), 3, "one recording per session");
    for version in ["1.27", "1.33"] {
        let want = format!("through the API server with {version}");
        assert!(
            casts.iter().any(|c| c.contains(&want)),
            "no recording shows {want:?}"
        );
    }
    let tty = casts
        .iter()
        .find(|c| c.contains("tty-recorded"))
        .expect("the TTY session's recording");
    assert!(sized(tty), "{tty}");
    // Every session's record names its recording.
    let named = sessions()
        .iter()
        .filter(|r| r["annotations"]["kube-relay.io/recording"].is_string())
        .count();
    assert_eq!(named, 3);
}
