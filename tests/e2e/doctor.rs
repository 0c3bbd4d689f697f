//! `kube-relay doctor` against simulated clusters (kube-sim) and the dev OIDC issuer, in-process,
//! with one failure injected per test: each must show up as a failed row that names the
//! problem, and the report as a whole must fail. Every wait is bounded by the doctor's own
//! per-check timeout or an explicit deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube_relay::cli::doctor::{self, Options, Outcome, Report};
use kube_sim::issuer::{DevIssuer, IssuerHandle, KeyAlg};
use kube_sim::pki::TestCa;
use kube_sim::record::UserInfo;
use kube_sim::server::{SimAuth, SimConfig, SimHandle, StaticToken};
use tokio::net::TcpListener;

const RELAY_TOKEN: &str = "doctor-relay-token";
const GIT_VERSION: &str = "v1.30.7-doctor";

/// One simulated cluster, one dev issuer and a directory to write configurations into.
struct Lab {
    dir: tempfile::TempDir,
    sim: SimHandle,
    sim_port: u16,
    issuer_url: String,
    issuer_handle: IssuerHandle,
}

impl Lab {
    async fn start() -> Self {
        kube_relay::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();

        // The relay's own serving pair: doctor checks that it loads and pairs up.
        let relay_ca = TestCa::new("doctor relay CA").expect("ca");
        let relay_leaf = relay_ca
            .issue(&["localhost", "*.relay.test"])
            .expect("leaf");
        std::fs::write(p.join("relay.crt"), &relay_leaf.cert_pem).expect("write");
        std::fs::write(p.join("relay.key"), &relay_leaf.key_pem).expect("write");

        // The issuer, on its own CA (the config's ca_file).
        let issuer_ca = TestCa::new("doctor issuer CA").expect("ca");
        std::fs::write(p.join("issuer-ca.crt"), issuer_ca.cert_pem()).expect("write");
        let il = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let issuer_url = format!(
            "https://127.0.0.1:{}",
            il.local_addr().expect("addr").port()
        );
        let issuer = DevIssuer::generate(&issuer_url, KeyAlg::Es256).expect("issuer");
        let issuer_handle = kube_sim::issuer::serve(
            il,
            Some(
                kube_sim::server::tls_config(&issuer_ca.issue(&["127.0.0.1"]).expect("leaf"))
                    .expect("tls"),
            ),
            issuer.clone(),
        )
        .await
        .expect("issuer serves");

        // The cluster: its CA, a certificate for its private-looking FQDN, the relay's token.
        let cluster_ca = TestCa::new("doctor cluster CA").expect("ca");
        std::fs::write(p.join("cluster-ca.crt"), cluster_ca.cert_pem()).expect("write");
        let other_ca = TestCa::new("some other CA").expect("ca");
        std::fs::write(p.join("other-ca.crt"), other_ca.cert_pem()).expect("write");
        let leaf = cluster_ca
            .issue(&["alpha.kube-sim.localhost"])
            .expect("leaf");
        std::fs::write(p.join("relay-token"), RELAY_TOKEN).expect("write");
        std::fs::write(p.join("wrong-token"), "not-the-relay-token").expect("write");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut cfg = SimConfig::new("alpha");
        cfg.git_version = GIT_VERSION.to_owned();
        cfg.auth = SimAuth {
            static_tokens: vec![StaticToken {
                token: RELAY_TOKEN.to_owned(),
                user: UserInfo {
                    username: "system:serviceaccount:kube-system:kube-relay".to_owned(),
                    ..UserInfo::default()
                },
                can_impersonate: true,
            }],
            jwt: vec![],
        };
        let sim = kube_sim::server::start(
            listener,
            Some(kube_sim::server::tls_config(&leaf).expect("tls")),
            cfg,
        )
        .await
        .expect("sim serves");
        let sim_port = sim.addr.port();
        Lab {
            dir,
            sim,
            sim_port,
            issuer_url,
            issuer_handle,
        }
    }

    /// A cluster entry for the simulator, dialed by IP and verified by its FQDN.
    fn cluster(&self, name: &str, auth: &str) -> String {
        format!(
            "  - {{name: {name}, server: \"https://alpha.kube-sim.localhost:{port}\", connect: \"127.0.0.1:{port}\", ca_file: cluster-ca.crt, upstream_auth: {auth}, access: [{{users: [dev/alice]}}]}}\n",
            port = self.sim_port
        )
    }

    /// Writes relay.yaml with these cluster entries and returns its path.
    fn config(&self, clusters: &[String]) -> PathBuf {
        let mut yaml = format!(
            "listen: 127.0.0.1:0\npublic_url: https://localhost\ntls: {{cert_file: relay.crt, key_file: relay.key}}\n\
             routing: {{host_suffix: relay.test}}\nidentity:\n  issuers:\n    - {{name: dev, kind: oidc, issuer: \"{}\", audiences: [kube-relay], ca_file: issuer-ca.crt}}\nclusters:\n",
            self.issuer_url
        );
        for c in clusters {
            yaml.push_str(c);
        }
        let path = self.dir.path().join("relay.yaml");
        std::fs::write(&path, yaml).expect("write config");
        path
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.sim.shutdown();
        self.issuer_handle.shutdown();
    }
}

const IMPERSONATE: &str = "{mode: impersonate, token_file: relay-token}";
const PASSTHROUGH: &str = "{mode: passthrough}";

fn opts() -> Options {
    Options {
        timeout: Duration::from_secs(3),
    }
}

async fn doctor(path: &Path, opts: &Options) -> Report {
    // The doctor bounds each check; this only guards the test against a bug in that bound.
    tokio::time::timeout(Duration::from_secs(60), doctor::run_file(path, opts))
        .await
        .expect("doctor finishes")
}

/// Asserts one row's outcome and that its detail mentions `needle`.
fn row(report: &Report, target: &str, check: &str, outcome: Outcome, needle: &str) {
    let text = report.render();
    let c = report
        .find(target, check)
        .unwrap_or_else(|| panic!("no {target} {check} row in\n{text}"));
    assert_eq!(c.outcome, outcome, "{target} {check} in\n{text}");
    assert!(
        c.detail.contains(needle),
        "{target} {check}: {:?} lacks {needle:?} in\n{text}",
        c.detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_green_reports_versions_and_keys() {
    let lab = Lab::start().await;
    let path = lab.config(&[
        lab.cluster("alpha", IMPERSONATE),
        lab.cluster("beta", PASSTHROUGH),
    ]);
    let report = doctor(&path, &opts()).await;
    assert!(report.passed(), "{}", report.render());
    row(
        &report,
        "config",
        "load",
        Outcome::Ok,
        "2 cluster(s), 1 issuer(s)",
    );
    row(&report, "config", "serving-cert", Outcome::Ok, "pair");
    row(&report, "cluster/alpha", "dns", Outcome::Ok, "no lookup");
    row(&report, "cluster/alpha", "tcp", Outcome::Ok, "connected");
    row(
        &report,
        "cluster/alpha",
        "tls",
        Outcome::Ok,
        "alpha.kube-sim.localhost",
    );
    row(
        &report,
        "cluster/alpha",
        "credential",
        Outcome::Ok,
        "relay-token readable",
    );
    row(
        &report,
        "cluster/alpha",
        "version",
        Outcome::Ok,
        GIT_VERSION,
    );
    row(
        &report,
        "cluster/beta",
        "credential",
        Outcome::Ok,
        "uses the caller's token",
    );
    // Passthrough has no relay credential: the anonymous 401 still proves the HTTP path.
    row(
        &report,
        "cluster/beta",
        "version",
        Outcome::Skip,
        "HTTP 401",
    );
    row(
        &report,
        "issuer/dev",
        "discovery",
        Outcome::Ok,
        &lab.issuer_url,
    );
    row(&report, "issuer/dev", "keys", Outcome::Ok, "1 usable");
    let text = report.render();
    assert!(text.starts_with("TARGET"), "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_port_fails_tcp_and_skips_what_needs_it() {
    let lab = Lab::start().await;
    // A port held bound but never listening: connections are refused, and no other socket
    // can take it while the test runs.
    let held = tokio::net::TcpSocket::new_v4().expect("socket");
    held.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let closed = held.local_addr().expect("addr").port();
    let entry = format!(
        "  - {{name: gone, server: \"https://alpha.kube-sim.localhost:{closed}\", connect: \"127.0.0.1:{closed}\", ca_file: cluster-ca.crt, upstream_auth: {IMPERSONATE}}}\n"
    );
    let report = doctor(&lab.config(&[entry]), &opts()).await;
    assert!(!report.passed(), "{}", report.render());
    row(
        &report,
        "cluster/gone",
        "tcp",
        Outcome::Fail,
        "cannot connect to 127.0.0.1",
    );
    row(
        &report,
        "cluster/gone",
        "tls",
        Outcome::Skip,
        "no TCP connection",
    );
    row(
        &report,
        "cluster/gone",
        "version",
        Outcome::Skip,
        "no TLS connection",
    );
    // Independent checks still run.
    row(
        &report,
        "cluster/gone",
        "credential",
        Outcome::Ok,
        "readable",
    );
    row(&report, "issuer/dev", "keys", Outcome::Ok, "usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_reported_as_unknown_ca() {
    let lab = Lab::start().await;
    let entry = lab
        .cluster("alpha", IMPERSONATE)
        .replace("ca_file: cluster-ca.crt", "ca_file: other-ca.crt");
    let report = doctor(&lab.config(&[entry]), &opts()).await;
    assert!(!report.passed(), "{}", report.render());
    row(&report, "cluster/alpha", "tcp", Outcome::Ok, "connected");
    row(&report, "cluster/alpha", "tls", Outcome::Fail, "unknown CA");
    row(&report, "cluster/alpha", "version", Outcome::Skip, "no TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_name_is_reported_with_the_name() {
    let lab = Lab::start().await;
    let entry = lab.cluster("alpha", IMPERSONATE).replace(
        "https://alpha.kube-sim.localhost:",
        "https://wrong-name.example.test:",
    );
    let report = doctor(&lab.config(&[entry]), &opts()).await;
    assert!(!report.passed(), "{}", report.render());
    row(
        &report,
        "cluster/alpha",
        "tls",
        Outcome::Fail,
        "certificate not valid for name wrong-name.example.test",
    );
    // And it says which names the certificate does carry.
    row(
        &report,
        "cluster/alpha",
        "tls",
        Outcome::Fail,
        "alpha.kube-sim.localhost",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_file_is_a_config_error() {
    let lab = Lab::start().await;
    let entry = lab
        .cluster("alpha", IMPERSONATE)
        .replace("token_file: relay-token", "token_file: no-such-token");
    let report = doctor(&lab.config(&[entry]), &opts()).await;
    assert!(!report.passed(), "{}", report.render());
    // The loader's message, with its key path; nothing else runs on a config that does not load.
    row(
        &report,
        "config",
        "load",
        Outcome::Fail,
        "clusters[0].upstream_auth",
    );
    row(&report, "config", "load", Outcome::Fail, "no-such-token");
    assert!(
        report.find("cluster/alpha", "dns").is_none(),
        "{}",
        report.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_removed_after_load_fails_the_credential() {
    let lab = Lab::start().await;
    let path = lab.config(&[lab.cluster("alpha", IMPERSONATE)]);
    let cfg = kube_relay::config::load(&path).expect("config loads");
    // Rotation gone wrong: the file disappears while the relay runs.
    std::fs::remove_file(lab.path().join("relay-token")).expect("remove");
    let report = tokio::time::timeout(Duration::from_secs(60), doctor::run(&cfg, &opts()))
        .await
        .expect("doctor finishes");
    assert!(!report.passed(), "{}", report.render());
    row(
        &report,
        "cluster/alpha",
        "credential",
        Outcome::Fail,
        "cannot read token file",
    );
    row(
        &report,
        "cluster/alpha",
        "version",
        Outcome::Skip,
        "credential unusable",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credential_fails_version_with_401() {
    let lab = Lab::start().await;
    let entry = lab
        .cluster("alpha", IMPERSONATE)
        .replace("token_file: relay-token", "token_file: wrong-token");
    let report = doctor(&lab.config(&[entry]), &opts()).await;
    assert!(!report.passed(), "{}", report.render());
    row(&report, "cluster/alpha", "tls", Outcome::Ok, "valid");
    row(
        &report,
        "cluster/alpha",
        "version",
        Outcome::Fail,
        "HTTP 401",
    );
    row(
        &report,
        "cluster/alpha",
        "version",
        Outcome::Fail,
        "rejects the relay's credential",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_down_fails_discovery() {
    let lab = Lab::start().await;
    lab.issuer_handle.set_failing(true);
    let report = doctor(&lab.config(&[lab.cluster("alpha", IMPERSONATE)]), &opts()).await;
    assert!(!report.passed(), "{}", report.render());
    row(
        &report,
        "issuer/dev",
        "discovery",
        Outcome::Fail,
        "HTTP 500",
    );
    row(
        &report,
        "issuer/dev",
        "keys",
        Outcome::Skip,
        "discovery failed",
    );
    // The cluster is fine and says so.
    row(
        &report,
        "cluster/alpha",
        "version",
        Outcome::Ok,
        GIT_VERSION,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_host_fails_dns() {
    let lab = Lab::start().await;
    // No `connect`: the relay would dial the server host itself. `.invalid` never resolves.
    let entry = format!(
        "  - {{name: nodns, server: \"https://doctor-test.invalid:{}\", ca_file: cluster-ca.crt, upstream_auth: {PASSTHROUGH}}}\n",
        lab.sim_port
    );
    let report = doctor(&lab.config(&[entry]), &opts()).await;
    assert!(!report.passed(), "{}", report.render());
    let dns = report.find("cluster/nodns", "dns").expect("dns row");
    assert_eq!(dns.outcome, Outcome::Fail, "{}", report.render());
    // Either the resolver says no at once or the bounded wait ends it; both name the problem.
    assert!(
        dns.detail.contains("doctor-test.invalid") || dns.detail.contains("timed out"),
        "{}",
        report.render()
    );
    row(&report, "cluster/nodns", "tcp", Outcome::Skip, "DNS failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_cut_by_the_check_timeout() {
    let lab = Lab::start().await;
    // Accepts TCP and never answers the TLS ClientHello.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let entry = format!(
        "  - {{name: silent, server: \"https://alpha.kube-sim.localhost:{port}\", connect: \"127.0.0.1:{port}\", ca_file: cluster-ca.crt, upstream_auth: {PASSTHROUGH}}}\n"
    );
    let short = Options {
        timeout: Duration::from_millis(500),
    };
    let report = doctor(&lab.config(&[entry]), &short).await;
    hold.abort();
    assert!(!report.passed(), "{}", report.render());
    row(&report, "cluster/silent", "tcp", Outcome::Ok, "connected");
    row(
        &report,
        "cluster/silent",
        "tls",
        Outcome::Fail,
        "timed out after 500ms",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_exits_by_the_result() {
    let lab = Lab::start().await;
    let good = lab.config(&[lab.cluster("alpha", IMPERSONATE)]);
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_kube-relay"));
    let run = |path: PathBuf| {
        let exe = exe.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(exe);
            cmd.args(["doctor", "--timeout", "3s", "--config"])
                .arg(path);
            crate::support::run(cmd, None, Duration::from_secs(60))
        })
    };
    let out = run(good).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(GIT_VERSION), "{stdout}");

    lab.issuer_handle.set_failing(true);
    let out = run(lab.path().join("relay.yaml")).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_environment_is_all_green() {
    let env = crate::support::dev_env().await;
    let report = doctor(&env.dev.dir.join("relay.yaml"), &opts()).await;
    assert!(report.passed(), "{}", report.render());
    row(&report, "cluster/alpha", "version", Outcome::Ok, "v1.31.2");
    row(
        &report,
        "cluster/beta",
        "credential",
        Outcome::Ok,
        "uses the caller's token",
    );
    row(&report, "issuer/dev", "keys", Outcome::Ok, "usable");
    env.dev.stop().await;
}
