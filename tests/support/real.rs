//! The real control plane behind the relay: etcd and kube-apiserver built from their Go modules
//! by `testbed/build.sh`, started on loopback the way a cluster runs them, with a kubelet
//! stand-in (kube-sim's kubelet mode) behind a registered Node, so exec, attach, port-forward
//! and logs pass through the API server's own upgrade proxy and WebSocket translator.
//!
//! Every wait is bounded. Each process runs under a small shell watchdog holding a pipe from the
//! test process: dropping the [`RealCluster`] closes it and the process stops; a test process
//! that dies any other way closes it too, so nothing outlives the test run.
//!
//! The API server trusts the tests' Entra-shaped issuer the way AKS trusts Entra: v1 tokens
//! (`iss` = `https://sts.windows.net/{tenant}/`) for the AKS server application, user name
//! `upn` else `oid`, groups from `groups`, uid from `oid`, keys discovered at the loopback
//! authority (`discoveryURL`).

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use tokio::time::Instant;

use kube_sim::issuer::{DevIssuer, IssuerHandle, KeyAlg};
use kube_sim::pki::{LeafCert, TestCa};
use kube_sim::server::{SimConfig, SimHandle};
use serde_json::{json, Value};

pub use super::tenant::{now, AKS_APP, GROUP_OPS, OID_ALICE, OID_BOB, RELAY_APP, TID};
/// The one Node, whose kubelet is the stand-in.
pub const NODE: &str = "testbed-node";
/// Pods every cluster starts with (namespace `default`, container `main`, Running on [`NODE`]).
pub const PODS: &[&str] = &["web-0", "db-0"];

const READY_LIMIT: Duration = Duration::from_secs(90);
const STOP_LIMIT: Duration = Duration::from_secs(15);
const KUBECTL_LIMIT: Duration = Duration::from_secs(60);

pub fn upn(oid: &str) -> String {
    format!("{}@contoso.test", &oid[..8])
}

/// The directory holding `kube-apiserver` and `etcd`, built once per test process by
/// `testbed/build.sh` (a no-op when its stamp says they are current; it locks against other
/// test processes building at the same time).
pub fn testbed_bin() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash")
            .arg(root.join("testbed/build.sh"))
            .stdin(Stdio::null())
            .output()
            .expect("running testbed/build.sh (needs bash and go)");
        assert!(
            out.status.success(),
            "testbed/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("build.sh prints the binary directory")
            .to_owned();
        PathBuf::from(dir)
    })
}

// === Processes ===

/// Runs `"$@"` and stops it (TERM) when standard input ends: the test holds the other end.
/// (A background job's standard input is /dev/null unless redirected, hence descriptor 3.)
const WATCHDOG: &str = r#"exec 3<&0
"$@" </dev/null 3<&- & child=$!
( cat <&3 >/dev/null; kill -TERM "$child" 2>/dev/null ) &
watch=$!
wait "$child"; status=$?
kill "$watch" 2>/dev/null
exit "$status""#;

/// A child process under the watchdog, in a process group of its own, output to a log file.
pub struct Supervised {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    pub log: PathBuf,
}

impl Supervised {
    pub fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let stdin = child.stdin.take();
        Self {
            name: name.to_owned(),
            child,
            stdin,
            log,
        }
    }

    /// The process group the program runs in (the watchdog leads it).
    #[allow(dead_code)] // benches/real_apiserver.rs
    pub fn group(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has ended (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Stops the process: TERM through the watchdog, then KILL to the group if it lingers.
    pub fn stop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_LIMIT;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(format!("-{}", self.child.id()))
            .status();
        let _ = self.child.wait();
        eprintln!("{} did not stop within {STOP_LIMIT:?}: killed", self.name);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits (bounded) for a line of `log` containing `marker`; returns the line.
fn wait_for_line(proc: &mut Supervised, marker: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(f) = std::fs::File::open(&proc.log) {
            if let Some(line) = BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .find(|l| l.contains(marker))
            {
                return line;
            }
        }
        if let Some(status) = proc.exited() {
            panic!(
                "{} exited ({status}) before printing {marker:?}:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not print {marker:?} within {limit:?}:\n{}",
            proc.name,
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// === The Entra-shaped identity provider ===

/// A loopback authority laid out like Entra's (v1 and v2 metadata and keys for [`TID`]), which
/// both the relay and the test bed API servers trust.
pub struct EntraIdp {
    pub authority: String,
    pub issuer: DevIssuer,
    pub ca: TestCa,
    pub tls: Arc<rustls::ServerConfig>,
    handle: IssuerHandle,
}

impl EntraIdp {
    /// Starts on the current tokio runtime.
    pub async fn start() -> Self {
        kube_relay::install_crypto_provider();
        let ca = TestCa::new("testbed CA").unwrap();
        let leaf = ca
            .issue(&["127.0.0.1", "localhost", "*.relay.test"])
            .unwrap();
        let tls = kube_sim::server::tls_config(&leaf).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
        let issuer =
            DevIssuer::generate(&format!("{authority}/{TID}/v2.0"), KeyAlg::Rs256).unwrap();
        let handle =
            kube_sim::issuer::serve_entra(l, Some(tls.clone()), &authority, TID, issuer.clone())
                .await
                .unwrap();
        Self {
            authority,
            issuer,
            ca,
            tls,
            handle,
        }
    }

    /// What an API server needs to trust this authority like AKS trusts Entra.
    pub fn trust(&self) -> EntraTrust {
        EntraTrust {
            issuer: format!("https://sts.windows.net/{TID}/"),
            discovery_url: format!("{}/{TID}/.well-known/openid-configuration", self.authority),
            ca_pem: self.ca.cert_pem().to_owned(),
            audience: AKS_APP.to_owned(),
        }
    }

    /// A v1 user token for the AKS server app, as `az aks get-credentials` users hold.
    pub fn user_token(&self, oid: &str, groups: &[&str]) -> String {
        self.issuer.mint(json!({
            "iss": format!("https://sts.windows.net/{TID}/"), "aud": AKS_APP, "tid": TID,
            "oid": oid, "upn": upn(oid), "scp": "user_impersonation", "groups": groups,
            "ver": "1.0", "appid": "04b07795-8ddb-461a-bbee-02f9e1bf7b46", "appidacr": "0",
            "iat": now(), "nbf": now(), "exp": now() + 3600,
        }))
    }

    /// A v2 user token for the relay's own application (the on_behalf_of input), with the
    /// optional `upn` claim so the exchanged v1 token carries it as Entra's does.
    pub fn relay_token(&self, oid: &str, groups: &[&str]) -> String {
        self.issuer.mint(json!({
            "iss": format!("{}/{TID}/v2.0", self.authority), "aud": RELAY_APP, "tid": TID,
            "oid": oid, "preferred_username": upn(oid), "upn": upn(oid),
            "scp": "user_impersonation", "groups": groups, "ver": "2.0", "azp": "04b07795-8ddb-461a-bbee-02f9e1bf7b46",
            "iat": now(), "nbf": now(), "exp": now() + 3600,
        }))
    }
}

impl Drop for EntraIdp {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// A JWT issuer an API server trusts through structured authentication configuration.
#[derive(Clone, Debug)]
pub struct EntraTrust {
    pub issuer: String,
    pub discovery_url: String,
    pub ca_pem: String,
    pub audience: String,
}

// === The cluster ===

/// How to start one test bed cluster.
#[derive(Clone, Debug)]
pub struct Options {
    pub name: String,
    pub entra: Option<EntraTrust>,
    /// `--goaway-chance`: the probability an HTTP/2 request gets a GOAWAY.
    pub goaway_chance: Option<f64>,
    /// `--min-request-timeout` (seconds): watches end after a random time in [t, 2t).
    pub min_request_timeout: Option<u32>,
    /// `--max-requests-inflight` and `--max-mutating-requests-inflight` (API Priority and
    /// Fairness derives its seats from them).
    pub max_inflight: Option<(u32, u32)>,
    /// `--http2-max-streams-per-connection`.
    pub http2_max_streams: Option<u32>,
    /// The relay's `upstream_protocol` for this cluster (default: the relay's own).
    pub upstream_protocol: Option<&'static str>,
}

impl Options {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            entra: None,
            goaway_chance: None,
            min_request_timeout: None,
            max_inflight: None,
            http2_max_streams: None,
            upstream_protocol: None,
        }
    }

    pub fn entra(mut self, idp: &EntraIdp) -> Self {
        self.entra = Some(idp.trust());
        self
    }
}

/// etcd, kube-apiserver and the kubelet stand-in for one cluster.
pub struct RealCluster {
    pub name: String,
    /// The API server's port on 127.0.0.1.
    pub port: u16,
    /// The cluster CA (serving certificates, client certificates, kubelet).
    pub ca_pem: String,
    /// The name in the API server's certificate the relay verifies (it dials 127.0.0.1).
    pub server_name: String,
    pub audit_log: PathBuf,
    /// A kubeconfig for `system:masters` (setup and checks, never through the relay).
    pub admin_kubeconfig: PathBuf,
    /// A client certificate for user `kube-relay`, which may impersonate.
    pub relay_client: LeafCert,
    pub kubelet: SimHandle,
    /// The relay's `upstream_protocol` for this cluster, if the test chose one.
    pub upstream_protocol: Option<&'static str>,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    apiserver: Option<Supervised>,
    _etcd: Supervised,
}

impl RealCluster {
    /// Starts etcd, the kubelet stand-in (on `rt`) and kube-apiserver, waits until the API
    /// server is ready, then registers the Node, RBAC for the test identities and the pods in
    /// [`PODS`], Running on the Node.
    pub fn start(rt: &tokio::runtime::Runtime, opts: Options) -> Self {
        kube_relay::install_crypto_provider();
        let bin = testbed_bin();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = TestCa::new(&format!("{} cluster CA", opts.name)).unwrap();
        let server_name = format!("{}.privatelink.test", opts.name);
        let serving = ca
            .issue(&[
                &server_name,
                "127.0.0.1",
                "localhost",
                "kubernetes.default.svc",
            ])
            .unwrap();
        let admin = ca
            .issue_client("testbed-admin", Some("system:masters"))
            .unwrap();
        let to_kubelet = ca
            .issue_client("kube-apiserver-kubelet-client", Some("system:masters"))
            .unwrap();
        let relay_client = ca.issue_client("kube-relay", None).unwrap();
        let kubelet_cert = ca.issue(&["127.0.0.1", NODE]).unwrap();
        let (sa_private, sa_public) = kube_sim::pki::key_pair_pem().unwrap();
        let write = |name: &str, text: &str| std::fs::write(d.join(name), text).unwrap();
        write("ca.crt", ca.cert_pem());
        write("apiserver.crt", &serving.cert_pem);
        write("apiserver.key", &serving.key_pem);
        write("kubelet-client.crt", &to_kubelet.cert_pem);
        write("kubelet-client.key", &to_kubelet.key_pem);
        write("admin.crt", &admin.cert_pem);
        write("admin.key", &admin.key_pem);
        write("sa.key", &sa_private);
        write("sa.pub", &sa_public);
        write(
            "audit-policy.yaml",
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n",
        );

        // The kubelet stand-in, on the test's runtime.
        let mut kubelet_tls = (*kube_sim::server::tls_config(&kubelet_cert).unwrap()).clone();
        kubelet_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let kubelet = rt
            .block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                kube_sim::server::start_kubelet(
                    l,
                    Some(Arc::new(kubelet_tls)),
                    SimConfig::new(NODE),
                )
                .await
            })
            .unwrap();

        let mut etcd = Supervised::spawn(
            &format!("{} etcd", opts.name),
            &bin.join("etcd"),
            &[format!("--data-dir={}", d.join("etcd").display())],
            d.join("etcd.log"),
        );
        let line = wait_for_line(&mut etcd, "etcd ready on ", READY_LIMIT);
        let etcd_url = line
            .split("etcd ready on ")
            .nth(1)
            .unwrap()
            .trim()
            .to_owned();

        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--tls-cert-file={}", d.join("apiserver.crt").display()),
            format!(
                "--tls-private-key-file={}",
                d.join("apiserver.key").display()
            ),
            format!("--client-ca-file={}", d.join("ca.crt").display()),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", d.join("sa.pub").display()),
            format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            format!(
                "--audit-policy-file={}",
                d.join("audit-policy.yaml").display()
            ),
            format!("--audit-log-path={}", d.join("audit.log").display()),
            format!(
                "--kubelet-certificate-authority={}",
                d.join("ca.crt").display()
            ),
            format!(
                "--kubelet-client-certificate={}",
                d.join("kubelet-client.crt").display()
            ),
            format!(
                "--kubelet-client-key={}",
                d.join("kubelet-client.key").display()
            ),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--cert-dir={}", d.join("certs").display()),
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
        ];
        if let Some(trust) = &opts.entra {
            write("authentication.yaml", &authentication_config(trust));
            args.push(format!(
                "--authentication-config={}",
                d.join("authentication.yaml").display()
            ));
        }
        if let Some(p) = opts.goaway_chance {
            args.push(format!("--goaway-chance={p}"));
        }
        if let Some(t) = opts.min_request_timeout {
            args.push(format!("--min-request-timeout={t}"));
        }
        if let Some((all, mutating)) = opts.max_inflight {
            args.push(format!("--max-requests-inflight={all}"));
            args.push(format!("--max-mutating-requests-inflight={mutating}"));
        }
        if let Some(n) = opts.http2_max_streams {
            args.push(format!("--http2-max-streams-per-connection={n}"));
        }

        let port = free_port();
        let mut cluster = Self {
            name: opts.name.clone(),
            port,
            ca_pem: ca.cert_pem().to_owned(),
            server_name,
            audit_log: d.join("audit.log"),
            admin_kubeconfig: d.join("admin.kubeconfig"),
            relay_client,
            kubelet,
            upstream_protocol: opts.upstream_protocol,
            args,
            apiserver: None,
            _etcd: etcd,
            dir,
        };
        // The port is free when picked but not held, so another test's listener may take it
        // before kube-apiserver binds; bounded retries with a fresh port cover that race.
        for attempt in 1.. {
            cluster.write_admin_kubeconfig();
            match cluster.try_start_apiserver() {
                Ok(()) => break,
                Err(log) if attempt < 3 && log.contains("address already in use") => {
                    cluster.port = free_port();
                }
                Err(log) => panic!("{} kube-apiserver exited:\n{log}", cluster.name),
            }
        }
        cluster.bootstrap();
        cluster
    }

    fn write_admin_kubeconfig(&self) {
        let d = self.dir.path();
        let kc = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "admin",
            "clusters": [{"name": "testbed", "cluster": {
                "server": format!("https://127.0.0.1:{}", self.port),
                "certificate-authority": d.join("ca.crt"),
            }}],
            "users": [{"name": "admin", "user": {
                "client-certificate": d.join("admin.crt"),
                "client-key": d.join("admin.key"),
            }}],
            "contexts": [{"name": "admin", "context": {"cluster": "testbed", "user": "admin"}}],
        });
        std::fs::write(&self.admin_kubeconfig, kc.to_string()).unwrap();
    }

    /// Starts kube-apiserver on [`Self::port`] and waits until `/readyz` says ok.
    pub fn start_apiserver(&mut self) {
        if let Err(log) = self.try_start_apiserver() {
            panic!("{} kube-apiserver exited:\n{log}", self.name);
        }
    }

    /// Like [`Self::start_apiserver`], but an API server that exits before it is ready is an
    /// `Err` carrying its log, so that [`Self::start`] can take another port when the one
    /// [`free_port`] picked was bound by someone else in between.
    fn try_start_apiserver(&mut self) -> Result<(), String> {
        assert!(
            self.apiserver.is_none(),
            "the API server is already running"
        );
        let mut args = self.args.clone();
        args.push(format!("--secure-port={}", self.port));
        let mut proc = Supervised::spawn(
            &format!("{} kube-apiserver", self.name),
            &testbed_bin().join("kube-apiserver"),
            &args,
            self.dir.path().join("apiserver.log"),
        );
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let mut c = self.admin();
            c.args(["get", "--raw", "/readyz"]);
            let out = super::run(c, None, Duration::from_secs(10));
            if out.status.success() {
                break;
            }
            if let Some(status) = proc.exited() {
                return Err(format!("({status})\n{}", proc.log_tail()));
            }
            assert!(
                Instant::now() < deadline,
                "{} kube-apiserver not ready within {READY_LIMIT:?}:\n{}",
                self.name,
                proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.apiserver = Some(proc);
        Ok(())
    }

    /// The process groups of kube-apiserver and etcd (for CPU accounting in benchmarks).
    #[allow(dead_code)] // benches/real_apiserver.rs
    pub fn control_plane_groups(&self) -> Vec<u32> {
        let mut out = vec![self._etcd.group()];
        out.extend(self.apiserver.as_ref().map(Supervised::group));
        out
    }

    /// Stops kube-apiserver (etcd and the kubelet keep running), as `az aks stop` would.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.stop();
        }
    }

    /// A kubectl (the newest) as `system:masters`, straight to the API server.
    pub fn admin(&self) -> Command {
        let mut c = Command::new(super::kubectl("1.33"));
        c.arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .arg("--request-timeout=30s")
            .env("HOME", self.dir.path())
            .env_remove("KUBECONFIG");
        c
    }

    /// Runs an admin kubectl command and returns its stdout, panicking on failure.
    pub fn admin_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut c = self.admin();
        c.args(args);
        let out = super::run(c, stdin.map(str::as_bytes), KUBECTL_LIMIT);
        super::ok(&out, &format!("admin kubectl {args:?}"))
    }

    fn bootstrap(&self) {
        let kubelet_port = self.kubelet.addr.port();
        let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "default", "namespace": "default"}},
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "kube-relay", "namespace": "kube-system"}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "kube-relay-impersonator"},
             "rules": [
                {"apiGroups": [""], "resources": ["users", "groups", "serviceaccounts"],
                 "verbs": ["impersonate"]},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["userextras/oid", "uids"],
                 "verbs": ["impersonate"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "kube-relay-impersonator"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": "kube-relay-impersonator"},
             "subjects": [
                {"kind": "ServiceAccount", "name": "kube-relay", "namespace": "kube-system"},
                {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "kube-relay"}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "ops-cluster-admin"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": "cluster-admin"},
             "subjects": [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
                           "name": GROUP_OPS}]},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE,
                "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}}},
        ]});
        self.admin_ok(&["apply", "-f", "-"], Some(&objects.to_string()));
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": NODE}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kubelet stand-in is serving",
                            "lastHeartbeatTime": rfc3339(now()),
                            "lastTransitionTime": rfc3339(now())}],
            "nodeInfo": {"kubeletVersion": "v1.34.4", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "kube-sim://1", "kernelVersion": "",
                         "osImage": "kube-sim", "bootID": "", "machineID": "", "systemUUID": ""},
        }});
        self.admin_ok(
            &[
                "patch",
                "node",
                NODE,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
            None,
        );
        for pod in PODS {
            self.run_pod("default", pod);
        }
    }

    /// Creates a pod bound to [`NODE`] with one container `main` and marks it Running and
    /// Ready, as the kubelet would once its container started.
    pub fn run_pod(&self, namespace: &str, name: &str) {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "busybox:1.36",
                "command": ["sh"], "stdin": true, "tty": false}]}});
        self.admin_ok(&["apply", "-f", "-"], Some(&pod.to_string()));
        let t = rfc3339(now());
        let ready = |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": t});
        let status = json!({"status": {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": "10.244.0.10",
            "podIPs": [{"ip": "10.244.0.10"}], "startTime": t,
            "conditions": [ready("PodScheduled"), ready("Initialized"),
                           ready("ContainersReady"), ready("Ready")],
            "containerStatuses": [{"name": "main", "ready": true, "started": true,
                "restartCount": 0, "image": "docker.io/library/busybox:1.36",
                "imageID": "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "containerID": format!("containerd://{}", "0".repeat(64)),
                "state": {"running": {"startedAt": t}}}],
        }});
        self.admin_ok(
            &[
                "patch",
                "pod",
                name,
                "-n",
                namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
            None,
        );
    }

    /// A ServiceAccount token for `kube-system/kube-relay` from the TokenRequest API.
    pub fn relay_sa_token(&self) -> String {
        self.admin_ok(
            &[
                "create",
                "token",
                "kube-relay",
                "-n",
                "kube-system",
                "--duration=2h",
            ],
            None,
        )
        .trim()
        .to_owned()
    }

    /// The API server's audit events (`audit.k8s.io/v1`), in order.
    pub fn audit_events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (bounded) until the API server authenticates `token` (its JWT authenticator
    /// fetches the issuer's keys in the background after start-up).
    pub fn wait_for_jwt(&self, token: &str) {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let mut c = Command::new(super::kubectl("1.33"));
            c.arg(format!("--server=https://127.0.0.1:{}", self.port))
                .arg(format!(
                    "--certificate-authority={}",
                    self.dir.path().join("ca.crt").display()
                ))
                .arg(format!("--token={token}"))
                .args(["--kubeconfig=/dev/null", "auth", "whoami"])
                .env("HOME", self.dir.path());
            let out = super::run(c, None, Duration::from_secs(10));
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the API server never accepted the issuer's token: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        self.stop_apiserver();
        self.kubelet.shutdown();
    }
}

/// `apiserver.config.k8s.io/v1` `AuthenticationConfiguration` trusting `trust` as AKS trusts
/// Entra.
fn authentication_config(trust: &EntraTrust) -> String {
    let ca = trust
        .ca_pem
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect::<String>();
    format!(
        r#"apiVersion: apiserver.config.k8s.io/v1
kind: AuthenticationConfiguration
jwt:
  - issuer:
      url: "{issuer}"
      discoveryURL: "{discovery}"
      audiences: ["{audience}"]
      certificateAuthority: |
{ca}    claimMappings:
      username:
        expression: "has(claims.upn) ? claims.upn : claims.oid"
      groups:
        claim: groups
        prefix: ""
      uid:
        claim: oid
"#,
        issuer = trust.issuer,
        discovery = trust.discovery_url,
        audience = trust.audience,
    )
}

/// RFC 3339 in whole seconds, as Kubernetes writes `metav1.Time`.
fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

// === The relay in front ===

/// The usual arrangement: one test bed cluster trusting the Entra stand-in, and a relay in front
/// in passthrough mode admitting alice (ops: cluster-admin by RBAC) and bob (unknown to RBAC).
/// Fields drop in order: the relay, the cluster, the identity provider, the runtime.
pub struct Bed {
    pub front: Front,
    pub cluster: RealCluster,
    pub alice: String,
    pub idp: EntraIdp,
    pub rt: tokio::runtime::Runtime,
}

impl Bed {
    pub fn passthrough(opts: Options) -> Self {
        Self::passthrough_with(opts, |_, _| None)
    }

    /// Like [`Bed::passthrough`]; `connect` may start something between the relay and the API
    /// server and return the loopback port the relay should dial instead.
    pub fn passthrough_with(
        opts: Options,
        connect: impl FnOnce(&tokio::runtime::Runtime, &RealCluster) -> Option<u16>,
    ) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let idp = rt.block_on(EntraIdp::start());
        let cluster = RealCluster::start(&rt, opts.entra(&idp));
        let alice = idp.user_token(OID_ALICE, &[GROUP_OPS]);
        let bob = idp.user_token(OID_BOB, &[]);
        cluster.wait_for_jwt(&alice);
        let connect_port = connect(&rt, &cluster);
        let front = Front::start(
            &rt,
            &idp,
            &[Upstream {
                cluster: &cluster,
                alias: None,
                connect_port,
                upstream_auth: "{mode: passthrough}".into(),
                access: format!("[{{groups: [{GROUP_OPS}]}}, {{users: [contoso/{OID_BOB}]}}]"),
            }],
            &[("alice", alice.clone()), ("bob", bob)],
            "",
        );
        Self {
            front,
            cluster,
            alice,
            idp,
            rt,
        }
    }
}

/// How the relay reaches one test bed cluster.
pub struct Upstream<'a> {
    pub cluster: &'a RealCluster,
    /// The relay's name for it (default: the cluster's own name); two entries may name one
    /// cluster with different credentials.
    pub alias: Option<String>,
    /// Dial this loopback port instead of the API server's (a test's forwarder in between).
    pub connect_port: Option<u16>,
    /// The `upstream_auth` YAML flow mapping, e.g. `{mode: passthrough}`.
    pub upstream_auth: String,
    /// The `access` YAML flow sequence.
    pub access: String,
}

impl Upstream<'_> {
    pub fn name(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.cluster.name)
    }
}

/// A relay (in-process, on the test's runtime) in front of test bed clusters, trusting the
/// Entra stand-in, with a kubeconfig whose users carry fixed tokens.
pub struct Front {
    pub relay: std::net::SocketAddr,
    /// Holds the relay's files (configuration, certificates, kubeconfig) until the test ends.
    _dir: tempfile::TempDir,
    pub audit: PathBuf,
    pub kubeconfig: PathBuf,
    pub home: PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
    /// The in-process relay, so reads of its audit log can wait for what it queued.
    handle: Arc<kube_relay::server::Relay>,
    rt: tokio::runtime::Handle,
}

impl Front {
    /// `users`: (kubeconfig user name, bearer token). Contexts: `<cluster>` (path routing with
    /// `tls-server-name`) and `<cluster>-sni` (SNI routing) for the first user, and
    /// `<user>@<cluster>` (path routing) for every user.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        idp: &EntraIdp,
        upstreams: &[Upstream<'_>],
        users: &[(&str, String)],
        extra_yaml: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let leaf = idp
            .ca
            .issue(&["localhost", "127.0.0.1", "*.relay.test"])
            .unwrap();
        std::fs::write(d.join("relay.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(d.join("relay.key"), &leaf.key_pem).unwrap();
        std::fs::write(d.join("idp-ca.crt"), idp.ca.cert_pem()).unwrap();
        let relay_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_port = relay_listener.local_addr().unwrap().port();
        let mut yaml = super::yaml::RelayYaml::new(&format!("https://localhost:{relay_port}"))
            .top("routing: {host_suffix: relay.test}")
            .top("audit: {path: audit.jsonl}")
            .top("limits: {per_identity_requests_per_second: 100000, per_identity_burst: 100000, per_identity_streams: 10000}");
        if !extra_yaml.trim().is_empty() {
            yaml = yaml.top(extra_yaml);
        }
        yaml = yaml.issuer(super::yaml::contoso(
            &idp.authority,
            "idp-ca.crt",
            &format!("api://kube-relay, {AKS_APP}, {RELAY_APP}"),
            "required_scopes: [user_impersonation]",
        ));
        for u in upstreams {
            let c = u.cluster;
            std::fs::write(d.join(format!("{}-ca.crt", c.name)), &c.ca_pem).unwrap();
            std::fs::write(
                d.join(format!("{}-relay.crt", c.name)),
                &c.relay_client.cert_pem,
            )
            .unwrap();
            std::fs::write(
                d.join(format!("{}-relay.key", c.name)),
                &c.relay_client.key_pem,
            )
            .unwrap();
            let protocol = c
                .upstream_protocol
                .map(|p| format!("\nupstream_protocol: {p}"))
                .unwrap_or_default();
            yaml = yaml.cluster(format!(
                "name: {alias}\nserver: https://{sn}:{port}\nconnect: 127.0.0.1:{port}\nca_file: {name}-ca.crt\nupstream_auth: {auth}\naccess: {access}{protocol}",
                alias = u.name(),
                name = c.name,
                sn = c.server_name,
                port = u.connect_port.unwrap_or(c.port),
                auth = u.upstream_auth,
                access = u.access,
            ));
        }
        let yaml = yaml.build();
        std::fs::write(d.join("relay.yaml"), &yaml).unwrap();
        let cfg = kube_relay::config::load(&d.join("relay.yaml"))
            .unwrap_or_else(|e| panic!("relay config: {e:#}\n{yaml}"));
        let admin_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (relay, handle) = rt.block_on(async {
            relay_listener.set_nonblocking(true).unwrap();
            admin_listener.set_nonblocking(true).unwrap();
            let app = kube_relay::server::App::with_listeners(
                cfg,
                tokio::net::TcpListener::from_std(relay_listener).unwrap(),
                Some(tokio::net::TcpListener::from_std(admin_listener).unwrap()),
            )
            .unwrap();
            let addr = app.local_addr().unwrap();
            let handle = app.relay();
            tokio::spawn(app.run(shutdown.clone()));
            super::wait_ready(admin).await;
            (addr, handle)
        });
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_doc(relay, idp.ca.cert_pem(), upstreams, users).to_string(),
        )
        .unwrap();
        let home = d.join("home");
        std::fs::create_dir_all(&home).unwrap();
        Self {
            relay,
            audit: d.join("audit.jsonl"),
            kubeconfig,
            home,
            _dir: dir,
            shutdown,
            handle,
            rt: rt.handle().clone(),
        }
    }

    /// kubectl `version` on `context` through the relay.
    pub fn kubectl(&self, version: &str, context: &str) -> Command {
        let mut c = Command::new(super::kubectl(version));
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--context")
            .arg(context)
            .arg("--request-timeout=30s")
            .env("HOME", &self.home)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        c
    }

    /// The directory holding the relay's configuration (`relay.yaml`) and certificates.
    #[allow(dead_code)] // benches/real_apiserver.rs
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// The relay's last audit record that `pred` accepts; panics naming `what` when none does.
    pub fn last_audit_record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.audit_records()
            .into_iter()
            .rev()
            .find(|r| pred(r))
            .unwrap_or_else(|| panic!("no relay audit record for {what}"))
    }

    /// The relay's audit records, in order.
    pub fn audit_records(&self) -> Vec<Value> {
        // The relay queues a record before it answers and writes it a moment later
        // (src/lines.rs): flush first, so every record of an answered request is read. On a
        // thread of its own, as callers may be inside the runtime.
        let (rt, relay) = (&self.rt, &self.handle);
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(relay.state().audit.flush()))
                .join()
                .unwrap()
        });
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn kubeconfig_doc(
    relay: std::net::SocketAddr,
    ca_pem: &str,
    upstreams: &[Upstream<'_>],
    users: &[(&str, String)],
) -> Value {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let port = relay.port();
    let mut clusters = Vec::new();
    let mut contexts = Vec::new();
    for u in upstreams {
        let name = u.name();
        clusters.push(json!({"name": name, "cluster": {
            "server": format!("https://localhost:{port}/clusters/{name}"),
            "tls-server-name": format!("{name}.relay.test"),
            "certificate-authority-data": ca}}));
        clusters.push(json!({"name": format!("{name}-sni"), "cluster": {
            "server": format!("https://127.0.0.1:{port}"),
            "tls-server-name": format!("{name}.relay.test"),
            "certificate-authority-data": ca}}));
        let first = users.first().map(|(n, _)| *n).unwrap_or("alice");
        contexts.push(json!({"name": name, "context": {"cluster": name, "user": first}}));
        contexts.push(json!({"name": format!("{name}-sni"),
            "context": {"cluster": format!("{name}-sni"), "user": first}}));
        for (user, _) in users {
            contexts.push(json!({"name": format!("{user}@{name}"),
                "context": {"cluster": name, "user": user}}));
        }
    }
    let users: Vec<Value> = users
        .iter()
        .map(|(n, t)| json!({"name": n, "user": {"token": t}}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Config", "clusters": clusters, "users": users,
           "contexts": contexts,
           "current-context": upstreams.first().map(|u| u.name().to_owned())})
}
