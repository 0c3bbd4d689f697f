//! The relay's own APIs on the public host: `/-/clusters`, `/-/kubeconfig`, `/-/login-config`,
//! and `kube-relay kubeconfig` merging the result into a real kubeconfig that kubectl uses.

use std::time::Duration;

use crate::support::{dev_env, kubectl, ok, request, run, CustomRelay, FakeUpstream};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_lists_only_what_the_caller_may_use() {
    let env = dev_env().await;
    let alice = format!("Bearer {}", env.dev.token("alice"));
    let bob = format!("Bearer {}", env.dev.token("bob"));

    let (code, head, body) = request(
        &env,
        "localhost",
        "GET",
        "/-/clusters",
        &[("Authorization", &alice)],
    )
    .await;
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("cache-control: no-store"),
        "{head}"
    );
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["kind"], "ClusterList");
    assert_eq!(list["user"]["username"], "alice");
    let names: Vec<&str> = list["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    let alpha = &list["clusters"][0];
    let port = env.dev.relay_addr.port();
    assert_eq!(
        alpha["server"],
        format!("https://localhost:{port}/clusters/alpha")
    );
    assert_eq!(alpha["tlsServerName"], "alpha.relay.localhost");
    assert_eq!(
        alpha["sniServer"],
        format!("https://alpha.relay.localhost:{port}")
    );
    assert_eq!(
        alpha["verbs"],
        Value::Null,
        "alice's rule has no verb limit"
    );
    assert_eq!(alpha["healthy"], true);
    // The relay's private CA is published, so a kubeconfig can verify the relay.
    let ca = list["relay"]["certificateAuthorityData"].as_str().unwrap();
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(ca)
        .unwrap();
    assert!(String::from_utf8(pem)
        .unwrap()
        .contains("BEGIN CERTIFICATE"));

    // bob: read-only on beta, nothing on alpha.
    let (code, _, body) = request(
        &env,
        "localhost",
        "GET",
        "/-/clusters",
        &[("Authorization", &bob)],
    )
    .await;
    assert_eq!(code, 200);
    let list: Value = serde_json::from_str(&body).unwrap();
    let clusters = list["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 1, "{body}");
    assert_eq!(clusters[0]["name"], "beta");
    assert_eq!(
        clusters[0]["verbs"],
        serde_json::json!(["get", "list", "watch"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_apis_refuse_what_they_should() {
    let env = dev_env().await;
    // No token: 401 as a Status kubectl understands, with the bearer challenge.
    let (code, head, body) = request(&env, "localhost", "GET", "/-/clusters", &[]).await;
    assert_eq!(code, 401, "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer"));
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Unauthorized");
    // A bad token too (and the kubeconfig download likewise).
    let (code, _, _) = request(
        &env,
        "localhost",
        "GET",
        "/-/kubeconfig",
        &[("Authorization", "Bearer not.a.token")],
    )
    .await;
    assert_eq!(code, 401);
    // Only GET.
    let alice = format!("Bearer {}", env.dev.token("alice"));
    let (code, _, body) = request(
        &env,
        "localhost",
        "POST",
        "/-/clusters",
        &[("Authorization", &alice), ("Content-Length", "0")],
    )
    .await;
    assert_eq!(code, 405, "{body}");
    // Relay pages live on the public host only: a cluster's SNI cannot reach them.
    let (code, _, _) = request(
        &env,
        "alpha.relay.localhost",
        "GET",
        "/-/clusters",
        &[("Authorization", &alice)],
    )
    .await;
    assert_eq!(code, 421);
    // A relay without a login section: the CLI gets a clear 404 Status.
    let up = FakeUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
    let bare = CustomRelay::start(&[("alpha", &up)]).await;
    let (code, _, body) = crate::support::parse_response(
        &bare
            .exchange(
                "localhost",
                b"GET /-/login-config HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await,
    );
    assert_eq!(code, 404);
    assert!(body.contains("no `login` section"), "{body}");
    // Nothing under /-/ is forwarded: an unknown page is a relay 404, and no cluster saw it.
    let (code, _, _) = request(
        &env,
        "localhost",
        "GET",
        "/-/api/v1/secrets",
        &[("Authorization", &alice)],
    )
    .await;
    assert_eq!(code, 404);
}

/// A relay with a `login` section (the dev issuer as the sign-in issuer) in front of a fake
/// cluster, for the kubeconfig command.
async fn relay_with_login() -> (CustomRelay, FakeUpstream) {
    let up = FakeUpstream::start(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 41\r\n\r\n{\"kind\":\"APIVersions\",\"versions\":[\"v1\"]}\n",
    )
    .await;
    let relay = CustomRelay::start_with(
        &[("alpha", &up)],
        "login: {issuer: dev, client_id: kube-relay-cli, scopes: [kube-relay]}\n",
    )
    .await;
    (relay, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_config_and_kubeconfig_download() {
    let (relay, _up) = relay_with_login().await;
    let (code, _, body) = crate::support::parse_response(
        &relay
            .exchange(
                "localhost",
                b"GET /-/login-config HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await,
    );
    assert_eq!(code, 200, "{body}");
    let p: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["kind"], "oidc");
    assert_eq!(p["clientId"], "kube-relay-cli");
    assert_eq!(p["scopes"], serde_json::json!(["kube-relay"]));
    assert!(p["issuer"]
        .as_str()
        .unwrap()
        .starts_with("https://127.0.0.1:"));

    let token = relay.token("alice");
    let req = format!(
        "GET /-/kubeconfig?style=sni HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let (code, head, body) =
        crate::support::parse_response(&relay.exchange("localhost", req.as_bytes()).await);
    assert_eq!(code, 200, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-disposition: attachment; filename=\"localhost.kubeconfig\""),
        "{head}"
    );
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&body).unwrap();
    assert_eq!(
        doc["clusters"][0]["cluster"]["server"].as_str(),
        Some(format!("https://alpha.relay.test:{}", relay.addr.port()).as_str())
    );
    let exec = &doc["users"][0]["user"]["exec"];
    assert_eq!(exec["command"].as_str(), Some("kube-relay"));
    let args: Vec<&str> = exec["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args.first(), Some(&"token"), "{args:?}");
    assert!(
        !body.contains(&token),
        "the caller's token is never written into a kubeconfig"
    );

    let bad = format!(
        "GET /-/kubeconfig?style=weird HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let (code, _, body) =
        crate::support::parse_response(&relay.exchange("localhost", bad.as_bytes()).await);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("expected path or sni"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_command_merges_and_kubectl_uses_the_result() {
    let (relay, up) = relay_with_login().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("relay-ca.pem");
    let ca_pem: String = relay
        .ca
        .iter()
        .map(|c| {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
            let lines: Vec<String> = b64
                .as_bytes()
                .chunks(64)
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect();
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                lines.join("\n")
            )
        })
        .collect();
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: mine\nclusters:\n- name: mine\n  cluster: {server: \"https://mine.example.org\"}\ncontexts:\n- name: mine\n  context: {cluster: mine, user: me}\nusers:\n- name: me\n  user: {token: my-own-token}\n",
    )
    .unwrap();

    let token = relay.token("alice");
    let relay_url = format!("https://localhost:{}", relay.addr.port());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kube-relay"));
    cmd.args(["kubeconfig", "--relay", &relay_url, "--kubeconfig"])
        .arg(&kubeconfig)
        .arg("--relay-ca-file")
        .arg(&ca_file)
        .env("KUBE_RELAY_TOKEN", &token);
    let out = run(cmd, None, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("added: alpha"), "{stderr}");
    assert!(stderr.contains("kept as"), "a backup is kept: {stderr}");
    assert!(!stderr.contains(&token));

    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(doc["current-context"].as_str(), Some("mine"), "kept");
    assert!(text.contains("my-own-token"), "unrelated user kept");
    let backup = std::fs::read_to_string(dir.path().join("config.bak")).unwrap();
    assert!(!backup.contains("alpha"));

    // kubectl reads the merged file; with a token on the command line (the exec plugin would
    // sign in interactively) it reaches the cluster through the relay: server URL,
    // tls-server-name and the published CA are right.
    let mut k = std::process::Command::new(kubectl("1.33"));
    k.arg("--kubeconfig").arg(&kubeconfig).args([
        "--context",
        "alpha",
        "--token",
        &token,
        "get",
        "--raw",
        "/api",
    ]);
    let body = ok(
        &run(k, None, WAIT),
        "kubectl get --raw /api via the merged kubeconfig",
    );
    assert!(body.contains("APIVersions"), "{body}");
    assert!(
        up.received_text().contains("GET /api "),
        "the cluster saw the request"
    );

    // Running it again is idempotent: alpha is updated in place, nothing duplicated.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kube-relay"));
    cmd.args(["kubeconfig", "--relay", &relay_url, "--kubeconfig"])
        .arg(&kubeconfig)
        .arg("--relay-ca-file")
        .arg(&ca_file)
        .env("KUBE_RELAY_TOKEN", &token);
    let out = run(cmd, None, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("updated: alpha"), "{stderr}");
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&kubeconfig).unwrap()).unwrap();
    assert_eq!(doc["contexts"].as_sequence().unwrap().len(), 2);

    // A token the relay refuses: a clear message, the file untouched.
    let before = std::fs::read_to_string(&kubeconfig).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kube-relay"));
    cmd.args(["kubeconfig", "--relay", &relay_url, "--kubeconfig"])
        .arg(&kubeconfig)
        .arg("--relay-ca-file")
        .arg(&ca_file)
        .env("KUBE_RELAY_TOKEN", "expired.or.wrong");
    let out = run(cmd, None, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(stderr.contains("sign in again"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&kubeconfig).unwrap(), before);

    // Without the relay's CA the command says what to do.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kube-relay"));
    cmd.args(["kubeconfig", "--relay", &relay_url, "--kubeconfig", "-"])
        .env_remove("KUBE_RELAY_TOKEN");
    let out = run(cmd, None, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(stderr.contains("--relay-ca-file"), "{stderr}");
}
