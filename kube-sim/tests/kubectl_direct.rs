//! Real kubectl (1.27 … 1.33) straight against kube-sim over TLS: the simulator must be
//! faithful enough on the wire that unmodified kubectl works (discovery, Table output, apply,
//! watch, logs, whoami, version).
//!
//! kubectl binaries are looked up as `kubectl.<version>` on PATH, then in the Google Cloud SDK
//! directory where our machines have them. Every wait is bounded: commands run under a timeout
//! and are killed when it expires.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use kube_sim::pki::TestCa;
use kube_sim::record::UserInfo;
use kube_sim::server::{self, SimAuth, SimConfig, SimHandle, StaticToken};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

const TOKEN: &str = "direct-test-token";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const SDK_BIN: &str = "/usr/lib/google-cloud-sdk/bin";

fn kubectl_binary(version: &str) -> PathBuf {
    let name = format!("kubectl.{version}");
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(std::iter::once(PathBuf::from(SDK_BIN)))
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found on PATH or in {SDK_BIN}"))
}

/// One simulator plus a kubeconfig (and HOME, caches) in a temporary directory.
struct Env {
    sim: SimHandle,
    dir: tempfile::TempDir,
    kubectl: PathBuf,
}

impl Env {
    async fn start(version: &str) -> Env {
        kube_sim::install_crypto_provider();
        let ca = TestCa::new("kubectl-direct CA").unwrap();
        let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = SimConfig::new("direct");
        cfg.auth = SimAuth {
            static_tokens: vec![StaticToken {
                token: TOKEN.into(),
                user: UserInfo {
                    username: "alice@example.com".into(),
                    groups: vec!["devs".into()],
                    ..UserInfo::default()
                },
                can_impersonate: false,
            }],
            jwt: Vec::new(),
        };
        let sim = server::start(listener, Some(server::tls_config(&leaf).unwrap()), cfg)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_data = base64::engine::general_purpose::STANDARD.encode(ca.cert_pem());
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca_data}\nusers:\n- name: alice\n  user:\n    token: {TOKEN}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: alice\n    namespace: default\ncurrent-context: sim\n",
            sim.addr
        );
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig).unwrap();
        Env {
            sim,
            dir,
            kubectl: kubectl_binary(version),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let home = self.dir.path();
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(home.join("kubeconfig"))
            .arg("--cache-dir")
            .arg(home.join("cache"))
            .args(args)
            .env("HOME", home)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl to completion (bounded); returns stdout, panicking with stderr on failure.
    async fn run(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.try_run(args).await;
        assert!(ok, "kubectl {args:?} failed:\n{stderr}\n{stdout}");
        stdout
    }

    async fn try_run(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::time::timeout(COMMAND_TIMEOUT, self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish in {COMMAND_TIMEOUT:?}"))
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first row of a `kubectl get` table whose NAME is `name`, split on whitespace.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

async fn get_tables(version: &str) {
    let env = Env::start(version).await;
    let pods = env.run(&["get", "pods"]).await;
    assert!(pods.starts_with("NAME"), "{pods}");
    assert_eq!(row(&pods, "web-0")[..3], ["web-0", "1/1", "Running"]);
    assert_eq!(row(&pods, "db-0")[2], "Running");

    let list: Value = serde_json::from_str(&env.run(&["get", "pods", "-o", "json"]).await).unwrap();
    assert_eq!(list["kind"], "List");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db-0", "web-0", "web-1"]);

    let ns = env.run(&["get", "ns"]).await;
    assert_eq!(row(&ns, "default")[1], "Active");
    assert_eq!(row(&ns, "kube-system")[1], "Active");

    let all = env.run(&["get", "pods", "-A", "-o", "wide"]).await;
    assert_eq!(row(&all, "kube-system")[2], "1/1");

    let one = env.run(&["get", "pod", "web-1", "-o", "name"]).await;
    assert_eq!(one.trim(), "pod/web-1");

    let (ok, _, stderr) = env.try_run(&["get", "pod", "nope"]).await;
    assert!(!ok);
    assert!(
        stderr.contains(r#"Error from server (NotFound): pods "nope" not found"#),
        "{stderr}"
    );

    // kubectl used aggregated discovery and HTTP/2 (ALPN), and asked for Tables.
    let record = env.sim.record.all();
    assert!(record.iter().all(|r| r
        .user
        .as_ref()
        .is_some_and(|u| u.username == "alice@example.com")));
    assert!(record.iter().any(|r| r.version == http::Version::HTTP_2));
    let apis = record
        .iter()
        .find(|r| r.path_and_query.starts_with("/apis"))
        .expect("no /apis request");
    assert!(apis
        .header("accept")
        .unwrap_or_default()
        .contains("as=APIGroupDiscoveryList"));
    let list = record
        .iter()
        .find(|r| {
            r.path_and_query
                .starts_with("/api/v1/namespaces/default/pods?")
        })
        .unwrap();
    assert!(list
        .header("accept")
        .unwrap_or_default()
        .starts_with("application/json;as=Table;v=v1;g=meta.k8s.io"));
    env.sim.shutdown();
}

async fn apply_get_delete_configmap(version: &str) {
    let env = Env::start(version).await;
    let manifest = |value: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\n  labels:\n    app: demo\ndata:\n  key: {value}\n")
    };
    let file = env.write("cm.yaml", &manifest("one"));
    let out = env.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(out.trim(), "configmap/demo created");
    let cms = env.run(&["get", "cm"]).await;
    assert_eq!(row(&cms, "demo")[1], "1");

    env.write("cm.yaml", &manifest("two"));
    let (ok, out, stderr) = env.try_run(&["apply", "-f", path_str(&file)]).await;
    assert!(ok, "{stderr}");
    assert_eq!(out.trim(), "configmap/demo configured");
    assert!(!stderr.contains("warning"), "{stderr}");
    let cm: Value =
        serde_json::from_str(&env.run(&["get", "cm", "demo", "-o", "json"]).await).unwrap();
    assert_eq!(cm["data"]["key"], "two");
    let applied: Value = serde_json::from_str(
        cm["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(applied["data"], json!({"key": "two"}));
    // Client-side apply: create, then a strategic merge patch with server-side validation.
    let patch = env
        .sim
        .record
        .all()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .expect("no PATCH");
    assert_eq!(
        patch.header("content-type"),
        Some("application/strategic-merge-patch+json")
    );
    assert!(
        patch.path_and_query.contains("fieldValidation=Strict"),
        "{}",
        patch.path_and_query
    );

    let out = env.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(out.trim(), "configmap/demo unchanged");
    let out = env.run(&["delete", "cm", "demo"]).await;
    assert_eq!(out.trim(), r#"configmap "demo" deleted"#);
    let (_, out, stderr) = env.try_run(&["get", "cm"]).await;
    assert!(
        !out.contains("demo") && stderr.contains("No resources found"),
        "{out}{stderr}"
    );
    env.sim.shutdown();
}

async fn whoami_logs_version(version: &str) {
    let env = Env::start(version).await;
    let review: Value =
        serde_json::from_str(&env.run(&["auth", "whoami", "-o", "json"]).await).unwrap();
    assert_eq!(review["kind"], "SelfSubjectReview");
    assert_eq!(
        review["status"]["userInfo"]["username"],
        "alice@example.com"
    );
    assert_eq!(
        review["status"]["userInfo"]["groups"],
        json!(["devs", "system:authenticated"])
    );

    let logs = env.run(&["logs", "web-0"]).await;
    assert_eq!(logs.lines().next(), Some("web-0 line 1"));
    let tail = env.run(&["logs", "web-0", "--tail=2"]).await;
    assert_eq!(
        tail.lines().collect::<Vec<_>>(),
        ["web-0 line 4", "web-0 line 5"]
    );

    let version_out = env.run(&["version", "-o", "json"]).await;
    let info: Value = serde_json::from_str(&version_out).unwrap();
    assert_eq!(info["serverVersion"]["gitVersion"], "v1.31.2");
    assert_eq!(info["serverVersion"]["minor"], "31");
    env.sim.shutdown();
}

async fn watch_sees_created_pod(version: &str) {
    let env = Env::start(version).await;
    let mut child = env
        .command(&["get", "pods", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Bounded waits: the initial table, then the event for a pod created meanwhile.
    let mut next_line = async || {
        tokio::time::timeout(COMMAND_TIMEOUT, lines.next_line())
            .await
            .expect("kubectl get -w printed nothing in time")
            .unwrap()
            .expect("kubectl get -w ended early")
    };
    while !seen.iter().any(|l: &String| l.starts_with("web-1")) {
        seen.push(next_line().await);
    }
    // The watch request follows the list; wait until it reached the simulator.
    tokio::time::timeout(COMMAND_TIMEOUT, async {
        while !env
            .sim
            .record
            .all()
            .iter()
            .any(|r| r.path_and_query.contains("watch=true"))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("kubectl never started watching");
    let pod = json!({"metadata": {"name": "late-0"}, "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}});
    env.sim
        .store()
        .create(kube_sim::store::Resource::Pods, Some("default"), pod, false)
        .unwrap();
    let line = loop {
        let line = next_line().await;
        if line.starts_with("late-0") {
            break line;
        }
    };
    assert_eq!(
        line.split_whitespace().take(3).collect::<Vec<_>>(),
        ["late-0", "1/1", "Running"]
    );
    child.kill().await.unwrap();
    let watch = env
        .sim
        .record
        .all()
        .into_iter()
        .find(|r| r.path_and_query.contains("watch=true"))
        .unwrap();
    assert!(
        watch
            .header("accept")
            .unwrap_or_default()
            .contains("as=Table"),
        "{:?}",
        watch.header("accept")
    );
    env.sim.shutdown();
}

macro_rules! for_versions {
    ($($module:ident => $version:literal),*) => {$(
        mod $module {
            #[tokio::test(flavor = "multi_thread")]
            async fn get_tables() { super::get_tables($version).await }
            #[tokio::test(flavor = "multi_thread")]
            async fn apply_get_delete_configmap() { super::apply_get_delete_configmap($version).await }
            #[tokio::test(flavor = "multi_thread")]
            async fn whoami_logs_version() { super::whoami_logs_version($version).await }
            #[tokio::test(flavor = "multi_thread")]
            async fn watch_sees_created_pod() { super::watch_sees_created_pod($version).await }
        }
    )*};
}

for_versions!(
    kubectl_1_27 => "1.27",
    kubectl_1_28 => "1.28",
    kubectl_1_29 => "1.29",
    kubectl_1_30 => "1.30",
    kubectl_1_31 => "1.31",
    kubectl_1_32 => "1.32",
    kubectl_1_33 => "1.33"
);
