//! `kube-relay token` as kubectl's exec credential plugin, end to end: real kubectl runs the
//! built binary, which gets a token from a loopback Entra stand-in (kube-sim's token endpoint,
//! over TLS with a private CA passed by `--ca-file`), and kubectl uses it against a relay in
//! front of kube-sim. Every unattended login mode, the disk cache (reuse across processes, file
//! modes, one sign-in for many processes, expiry, logout), the exec protocol (v1 / v1beta1,
//! interactiveMode) and that no token text reaches stderr.
//!
//! Browser and device code sign-ins need a browser and are tested elsewhere (node
//! oidc-provider); here only their non-interactive refusal. Everything listens on 127.0.0.1.
//! Each test starts its own world, so the endpoints' request counters are the test's own.

use crate::support::tenant::{now, TID};
use crate::support::yaml::{aks_stand_in, contoso, RelayYaml};
use std::collections::HashMap;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use kube_sim::issuer::{DevIssuer, IssuerHandle, KeyAlg};
use kube_sim::server::SimHandle;
use kube_sim::token_endpoint::{TokenEndpointConfig, TokenEndpointHandle};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The app-only principal the token endpoint mints (`TokenEndpointConfig::app_oid`).
const APP_OID: &str = "99999999-9999-9999-9999-999999999999";
const OID_AZ_USER: &str = "a1a1a1a1-0000-0000-0000-000000000001";
const SP_APP: &str = "e5e5e5e5-0000-0000-0000-000000000005";
const MI_CLIENT: &str = "f6f6f6f6-0000-0000-0000-000000000006";
/// The relay's public sign-in app (`login.client_id`): never used by unattended logins.
const CLI_APP: &str = "c1c1c1c1-0000-0000-0000-00000000000c";
const SP_SECRET: &str = "sp-s3cr3t-value-do-not-print";
const SCOPE: &str = "api://kube-relay/.default";
const GH_REQUEST_TOKEN: &str = "gh-request-bearer";
const ADO_ACCESS_TOKEN: &str = "ado-system-access-token";
const ADO_CONNECTION: &str = "3c3c3c3c-0000-0000-0000-00000000000c";
const KUBECTL: &str = "1.33";

// === the world ===

struct World {
    dir: tempfile::TempDir,
    /// Entra's token endpoint (TLS), the authority host `kube-relay token` is given.
    te: TokenEndpointHandle,
    te_authority: String,
    te_signer: DevIssuer,
    /// The managed identity endpoint (plain HTTP, as in Azure).
    mi: TokenEndpointHandle,
    mi_header: String,
    /// Signs projected service account tokens (federated token file).
    k8s: DevIssuer,
    /// GitHub Actions' and Azure DevOps' OIDC request endpoints.
    ci: CiStandIn,
    relay: std::net::SocketAddr,
    idp: IssuerHandle,
    gh_idp: IssuerHandle,
    sim: SimHandle,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.te.shutdown();
        self.mi.shutdown();
        self.idp.shutdown();
        self.gh_idp.shutdown();
        self.sim.shutdown();
        self.ci.shutdown.cancel();
    }
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, tls) = crate::support::tenant::test_pki(dir.path(), "token test CA");

    // What the token endpoint trusts as federated assertions.
    let k8s = DevIssuer::generate("https://oidc.aks.test/cluster", KeyAlg::Rs256).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gh_url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let github = DevIssuer::generate(&gh_url, KeyAlg::Rs256).unwrap();
    let gh_idp = kube_sim::issuer::serve(l, Some(tls.clone()), github.clone())
        .await
        .unwrap();
    let ado = DevIssuer::generate(
        "https://vstoken.dev.azure.com/00000000-0000-0000-0000-00000000a0a0",
        KeyAlg::Rs256,
    )
    .unwrap();

    // Entra: the token endpoint, and the authority the relay reads keys from.
    let te_signer =
        DevIssuer::generate(&format!("https://sts.windows.net/{TID}/"), KeyAlg::Rs256).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let te_authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let mut tcfg = TokenEndpointConfig::new(TID, te_signer.clone());
    // One authority for the relay's key fetches and the CLI's token requests, as with Entra
    // (the recipes run `kube-relay kubeconfig`, which takes the authority from the relay).
    tcfg.metadata_authority = Some(te_authority.clone());
    tcfg.assertion_issuers = vec![k8s.clone(), github.clone(), ado.clone()];
    tcfg.client_secrets.insert(SP_APP.into(), SP_SECRET.into());
    let te = kube_sim::token_endpoint::serve(l, Some(tls.clone()), tcfg)
        .await
        .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mi_cfg = TokenEndpointConfig::new(TID, te_signer.clone());
    let mi_header = mi_cfg.identity_header.clone();
    let mi = kube_sim::token_endpoint::serve(l, None, mi_cfg)
        .await
        .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_authority = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let idp =
        kube_sim::issuer::serve_entra(l, Some(tls.clone()), &idp_authority, TID, te_signer.clone())
            .await
            .unwrap();

    let ci = CiStandIn::start(github.clone(), ado.clone()).await;

    // The cluster behind the relay.
    let sim = crate::support::tenant::aks_stand_in(dir.path()).await;

    // Bound first so public_url (and the kubeconfigs the relay hands out) carry the real port.
    let relay_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay_listener.local_addr().unwrap().port();
    let port = sim.addr.port();
    let yaml = RelayYaml::new(&format!("https://localhost:{relay_port}"))
        .top(format!(
            "login:\n  issuer: contoso\n  client_id: {CLI_APP}\n  scopes: [api://kube-relay/user_impersonation]"
        ))
        .tls("tls: {cert_file: relay.crt, key_file: relay.key, ca_file: ca.crt}")
        .top("admin: {listen: 127.0.0.1:0}")
        .top("audit: {path: audit.jsonl}")
        .top("routing: {host_suffix: relay.test}")
        .issuer(contoso(&te_authority, "ca.crt", "api://kube-relay", ""))
        .issuer(format!(
            "name: github\nkind: oidc\nissuer: {gh_url}\naudiences: [api://kube-relay]\nusername_claim: sub\nca_file: ca.crt"
        ))
        .cluster(aks_stand_in(
            port,
            &format!(
                "  - users: [contoso/{APP_OID}, contoso/{OID_AZ_USER}]
  - issuer: github
    claims: {{repository: contoso/infra}}"
            ),
        ))
        .build();
    let path = dir.path().join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    let cfg = kube_relay::config::load(&path).unwrap();
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app =
        kube_relay::server::App::with_listeners(cfg, relay_listener, Some(admin_listener)).unwrap();
    let relay = app.local_addr().unwrap();
    let admin = app.admin_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    crate::support::wait_ready(admin).await;
    World {
        dir,
        te,
        te_authority,
        te_signer,
        mi,
        mi_header,
        k8s,
        ci,
        relay,
        idp,
        gh_idp,
        sim,
        shutdown,
    }
}

/// One kubectl (or plugin) invocation's setup: plugin args, exec apiVersion, interactiveMode
/// and process environment (the plugin inherits kubectl's).
struct Run {
    args: Vec<String>,
    api_version: &'static str,
    interactive_mode: &'static str,
    env: Vec<(String, String)>,
}

impl World {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cache(&self, name: &str) -> PathBuf {
        self.path(&format!("cache-{name}"))
    }

    /// Plugin args for an Entra login at the stand-in.
    fn entra_args(&self, mode: &str, cache: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "--login",
            mode,
            "--tenant-id",
            TID,
            "--authority-host",
            &self.te_authority,
            "--scope",
            SCOPE,
            "--ca-file",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(self.path("ca.crt").display().to_string());
        a.push("--cache-dir".into());
        a.push(self.cache(cache).display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn run(&self, args: Vec<String>) -> Run {
        Run {
            args,
            api_version: "client.authentication.k8s.io/v1",
            interactive_mode: "IfAvailable",
            env: Vec::new(),
        }
    }

    /// A kubeconfig whose user runs `kube-relay token ARGS`.
    fn kubeconfig(&self, r: &Run) -> PathBuf {
        use base64::Engine as _;
        let ca = std::fs::read_to_string(self.path("ca.crt")).unwrap();
        let mut args = vec!["token".to_owned()];
        args.extend(r.args.iter().cloned());
        let doc = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "aks",
            "clusters": [{"name": "aks", "cluster": {
                "server": format!("https://127.0.0.1:{}/clusters/aks", self.relay.port()),
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca)}}],
            "users": [{"name": "u", "user": {"exec": {
                "apiVersion": r.api_version,
                "command": env!("CARGO_BIN_EXE_kube-relay"),
                "args": args,
                "interactiveMode": r.interactive_mode,
                "provideClusterInfo": false,
            }}}],
            "contexts": [{"name": "aks", "context": {"cluster": "aks", "user": "u", "namespace": "default"}}],
        });
        let p = self.path(&format!("kubeconfig-{}", uuid::Uuid::new_v4()));
        std::fs::write(&p, serde_json::to_string(&doc).unwrap()).unwrap();
        p
    }

    /// A clean environment: nothing from the test runner (no stray AZURE_* or ACTIONS_*).
    fn base_env(&self, cmd: &mut Command, r: &Run) {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.path("home"))
            .stdin(Stdio::null());
        for (k, v) in &r.env {
            cmd.env(k, v);
        }
    }

    fn kubectl_cmd(&self, r: &Run) -> Command {
        let mut c = Command::new(crate::support::kubectl(KUBECTL));
        c.arg("--kubeconfig").arg(self.kubeconfig(r)).args([
            "get",
            "pods",
            "-o",
            "name",
            "--request-timeout=30s",
        ]);
        self.base_env(&mut c, r);
        c
    }

    async fn kubectl(&self, r: &Run) -> Output {
        let c = self.kubectl_cmd(r);
        tokio::task::spawn_blocking(move || crate::support::run(c, None, Duration::from_secs(60)))
            .await
            .unwrap()
    }

    /// The plugin alone, as kubectl would start it (`exec_info` as KUBERNETES_EXEC_INFO).
    async fn plugin(&self, r: &Run, exec_info: Option<Value>) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
        c.arg("token").args(&r.args);
        self.base_env(&mut c, r);
        if let Some(i) = exec_info {
            c.env("KUBERNETES_EXEC_INFO", i.to_string());
        }
        tokio::task::spawn_blocking(move || crate::support::run(c, None, Duration::from_secs(60)))
            .await
            .unwrap()
    }

    fn token_requests(&self) -> u64 {
        self.te.requests.load(Ordering::SeqCst)
    }
}

/// kubectl listed the simulated cluster's pods.
fn assert_listed(out: &Output, what: &str) {
    let stdout = crate::support::ok(out, what);
    assert!(stdout.contains("pod/"), "{what}: no pods listed:\n{stdout}");
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The cache entries (JSON files) in `dir`.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect()
}

fn cached(dir: &Path) -> Value {
    let e = entries(dir);
    assert_eq!(e.len(), 1, "one cache entry expected in {}", dir.display());
    serde_json::from_slice(&std::fs::read(&e[0]).unwrap()).unwrap()
}

fn claims(jwt: &str) -> Value {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// The token the cache holds never appears on stderr (kubectl's or the plugin's).
fn assert_no_token_in(out: &Output, cache_dir: &Path) {
    let token = cached(cache_dir)["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let err = stderr(out);
    assert!(!err.contains(&token), "token on stderr:\n{err}");
    // Not even its signature part (a truncated token is still a leak).
    let sig = token.rsplit('.').next().unwrap();
    assert!(!err.contains(sig), "token signature on stderr");
}

// === GitHub Actions / Azure DevOps OIDC request endpoints ===

struct CiStandIn {
    /// `ACTIONS_ID_TOKEN_REQUEST_URL`.
    github_url: String,
    /// `SYSTEM_OIDCREQUESTURI`.
    ado_url: String,
    /// Audiences GitHub was asked for, in order.
    github_audiences: Arc<Mutex<Vec<String>>>,
    ado_requests: Arc<AtomicU64>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl CiStandIn {
    async fn start(github: DevIssuer, ado: DevIssuer) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let audiences = Arc::new(Mutex::new(Vec::new()));
        let ado_requests = Arc::new(AtomicU64::new(0));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (aud, adoc, stop) = (audiences.clone(), ado_requests.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let s = tokio::select! {
                    () = stop.cancelled() => return,
                    a = l.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                let (github, ado, aud, adoc) =
                    (github.clone(), ado.clone(), aud.clone(), adoc.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let r = ci_answer(&req, &github, &ado, &aud, &adoc);
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Self {
            github_url: format!("http://127.0.0.1:{port}/_apis/oidc/token?api-version=2.0"),
            ado_url: format!("http://127.0.0.1:{port}/proj/_apis/distributedtask/hubs/build/plans/p1/jobs/j1/oidctoken"),
            github_audiences: audiences,
            ado_requests,
            shutdown,
        }
    }

    fn github_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "ACTIONS_ID_TOKEN_REQUEST_URL".into(),
                self.github_url.clone(),
            ),
            (
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN".into(),
                GH_REQUEST_TOKEN.into(),
            ),
        ]
    }
}

fn ci_answer<B>(
    req: &http::Request<B>,
    github: &DevIssuer,
    ado: &DevIssuer,
    audiences: &Mutex<Vec<String>>,
    ado_requests: &AtomicU64,
) -> http::Response<Full<Bytes>> {
    let reply = |status: u16, body: Value| {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let q: HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/_apis/oidc/token") => {
            if bearer != GH_REQUEST_TOKEN || q.get("api-version").map(String::as_str) != Some("2.0")
            {
                return reply(401, json!({"message": "bad request token"}));
            }
            let Some(aud) = q.get("audience") else {
                return reply(400, json!({"message": "audience missing"}));
            };
            audiences.lock().unwrap().push(aud.clone());
            let jwt = github.mint(json!({
                "aud": aud,
                "sub": "repo:contoso/infra:ref:refs/heads/main",
                "repository": "contoso/infra",
                "ref": "refs/heads/main",
                "exp": now() + 600,
            }));
            reply(200, json!({"count": 1, "value": jwt}))
        }
        ("POST", p) if p.ends_with("/oidctoken") => {
            let ok = bearer == ADO_ACCESS_TOKEN
                && q.get("api-version").map(String::as_str) == Some("7.1")
                && q.get("serviceConnectionId").map(String::as_str) == Some(ADO_CONNECTION);
            if !ok {
                return reply(401, json!({"message": "bad access token or connection"}));
            }
            ado_requests.fetch_add(1, Ordering::SeqCst);
            let jwt = ado.mint(json!({
                "aud": "api://AzureADTokenExchange",
                "sub": format!("sc://contoso/proj/{ADO_CONNECTION}"),
                "exp": now() + 600,
            }));
            reply(200, json!({"oidcToken": jwt}))
        }
        _ => reply(404, json!({})),
    }
}

// === client secret, and the cache ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_token_is_cached_across_processes_in_private_files() {
    let w = world().await;
    let mut r = w.run(w.entra_args("secret", "s", &["--client-id", SP_APP]));
    r.env.push(("AZURE_CLIENT_SECRET".into(), SP_SECRET.into()));
    let out = w.kubectl(&r).await;
    assert_listed(&out, "kubectl with --login secret");
    assert_eq!(w.token_requests(), 1);
    let form = w.te.last_form();
    assert_eq!(form["client_secret"], SP_SECRET);
    assert_eq!(form["client_id"], SP_APP);
    assert_eq!(form["scope"], SCOPE);
    let entry = cached(&w.cache("s"));
    let c = claims(entry["access_token"].as_str().unwrap());
    assert_eq!(c["aud"], "api://kube-relay");
    assert_eq!(c["appid"], SP_APP);
    assert!(entry.get("refresh_token").is_none());
    assert_no_token_in(&out, &w.cache("s"));
    assert!(!stderr(&out).contains(SP_SECRET));

    // Private: directory 0700, entry and lock 0600.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&w.cache("s")), 0o700);
    for f in std::fs::read_dir(w.cache("s")).unwrap() {
        let p = f.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }

    // A second kubectl process: the cached token, no request to Entra.
    let out = w.kubectl(&r).await;
    assert_listed(&out, "second kubectl");
    assert_eq!(w.token_requests(), 1, "the second run asked Entra again");

    // The plugin's own output: v1 by default, the cached token, its expiry.
    let out = w.plugin(&r, None).await;
    let cred: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(cred["kind"], "ExecCredential");
    assert_eq!(cred["status"]["token"], entry["access_token"]);
    let exp =
        humantime::parse_rfc3339(cred["status"]["expirationTimestamp"].as_str().unwrap()).unwrap();
    assert_eq!(
        exp.duration_since(UNIX_EPOCH).unwrap().as_secs(),
        entry["expires_at"].as_u64().unwrap()
    );
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
    assert_eq!(w.token_requests(), 1);

    // A wrong secret: Entra's error and what to do about it; no secret echoed.
    let mut bad = w.run(w.entra_args("secret", "s-bad", &["--client-id", SP_APP]));
    bad.env
        .push(("AZURE_CLIENT_SECRET".into(), "wrong-secret".into()));
    let out = w.plugin(&bad, None).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("AADSTS7000215"), "{err}");
    assert!(err.contains("AZURE_CLIENT_SECRET"), "{err}");
    assert!(!err.contains("wrong-secret"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_kubectl_processes_at_once_make_one_token_request() {
    let w = world().await;
    let mut r = w.run(w.entra_args("secret", "many", &["--client-id", SP_APP]));
    r.env.push(("AZURE_CLIENT_SECRET".into(), SP_SECRET.into()));
    let cmds: Vec<Command> = (0..6).map(|_| w.kubectl_cmd(&r)).collect();
    let outs = tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            let hs: Vec<_> = cmds
                .into_iter()
                .map(|c| s.spawn(move || crate::support::run(c, None, Duration::from_secs(60))))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    })
    .await
    .unwrap();
    for (i, o) in outs.iter().enumerate() {
        assert_listed(o, &format!("kubectl #{i}"));
    }
    assert_eq!(
        w.token_requests(),
        1,
        "concurrent plugins signed in more than once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_close_to_expiry_is_replaced_and_logout_forgets_it() {
    let w = world().await;
    let mut r = w.run(w.entra_args("secret", "exp", &["--client-id", SP_APP]));
    r.env.push(("AZURE_CLIENT_SECRET".into(), SP_SECRET.into()));
    // 60 s left is inside the 2-minute margin: every run fetches anew.
    w.te.set_token_lifetime(Duration::from_secs(60));
    assert_listed(&w.kubectl(&r).await, "first");
    assert_eq!(w.token_requests(), 1);
    assert_listed(&w.kubectl(&r).await, "second, token expiring");
    assert_eq!(w.token_requests(), 2);
    // An already expired entry, as left by yesterday's run.
    let e = entries(&w.cache("exp")).remove(0);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&e).unwrap()).unwrap();
    v["expires_at"] = json!(now() - 10);
    std::fs::write(&e, v.to_string()).unwrap();
    w.te.set_token_lifetime(Duration::from_secs(3600));
    assert_listed(&w.kubectl(&r).await, "third, token expired");
    assert_eq!(w.token_requests(), 3);
    assert_listed(&w.kubectl(&r).await, "fourth, token fresh");
    assert_eq!(w.token_requests(), 3);

    // --logout removes this login's entry only.
    let mut other = w.run(w.entra_args(
        "secret",
        "exp",
        &["--client-id", SP_APP, "--scope", "api://other/.default"],
    ));
    other.env = r.env.clone();
    crate::support::ok(
        &w.plugin(&other, None).await,
        "a second login in the same cache",
    );
    assert_eq!(entries(&w.cache("exp")).len(), 2);
    let mut logout = w.run(r.args.clone());
    logout.args.push("--logout".into());
    let out = w.plugin(&logout, None).await;
    crate::support::ok(&out, "--logout");
    assert!(stderr(&out).contains("removed"), "{}", stderr(&out));
    assert_eq!(entries(&w.cache("exp")).len(), 1);
    assert_listed(&w.kubectl(&r).await, "after logout");
    assert_eq!(w.token_requests(), 5);
    // --logout --all removes every entry.
    logout.args.push("--all".into());
    crate::support::ok(&w.plugin(&logout, None).await, "--logout --all");
    assert!(entries(&w.cache("exp")).is_empty());
}

// === workload identity ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_with_a_federated_token_file() {
    let w = world().await;
    let sa = w.k8s.mint(json!({
        "aud": "api://AzureADTokenExchange",
        "sub": "system:serviceaccount:ci:deployer",
        "exp": now() + 3600,
    }));
    std::fs::write(w.path("sa-token"), &sa).unwrap();
    let mut r = w.run(w.entra_args("workloadidentity", "wi", &[]));
    r.env = vec![
        ("AZURE_CLIENT_ID".into(), SP_APP.into()),
        (
            "AZURE_FEDERATED_TOKEN_FILE".into(),
            w.path("sa-token").display().to_string(),
        ),
    ];
    let out = w.kubectl(&r).await;
    assert_listed(&out, "kubectl with a federated token file");
    let form = w.te.last_form();
    assert_eq!(form["client_assertion"], sa);
    assert_eq!(form["client_id"], SP_APP);
    assert!(!stderr(&out).contains(&sa));
    assert_no_token_in(&out, &w.cache("wi"));
    assert_listed(&w.kubectl(&r).await, "cached");
    assert_eq!(w.token_requests(), 1);

    // Nowhere to get an assertion from: says where one comes from.
    let mut r = w.run(w.entra_args("workloadidentity", "wi-none", &["--client-id", SP_APP]));
    r.env.clear();
    let out = w.kubectl(&r).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no federated token"), "{err}");
    assert!(err.contains("id-token: write"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_in_github_actions() {
    let w = world().await;
    let mut r = w.run(w.entra_args("workloadidentity", "gh", &["--client-id", SP_APP]));
    r.env = w.ci.github_env();
    assert_listed(&w.kubectl(&r).await, "kubectl with GitHub's OIDC token");
    assert_eq!(
        *w.ci.github_audiences.lock().unwrap(),
        ["api://AzureADTokenExchange"]
    );
    let assertion = w.te.last_form()["client_assertion"].clone();
    assert_eq!(claims(&assertion)["repository"], "contoso/infra");
    assert_eq!(w.token_requests(), 1);

    // A request token GitHub refuses (no `id-token: write`).
    let mut r = w.run(w.entra_args("workloadidentity", "gh-bad", &["--client-id", SP_APP]));
    r.env = w.ci.github_env();
    r.env[1].1 = "stale".into();
    let out = w.plugin(&r, None).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(err.contains("id-token: write"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_in_azure_pipelines() {
    let w = world().await;
    let mut r = w.run(w.entra_args("workloadidentity", "ado", &[]));
    r.env = vec![
        ("AZURESUBSCRIPTION_CLIENT_ID".into(), SP_APP.into()),
        (
            "AZURESUBSCRIPTION_SERVICE_CONNECTION_ID".into(),
            ADO_CONNECTION.into(),
        ),
        ("SYSTEM_OIDCREQUESTURI".into(), w.ci.ado_url.clone()),
        ("SYSTEM_ACCESSTOKEN".into(), ADO_ACCESS_TOKEN.into()),
    ];
    assert_listed(
        &w.kubectl(&r).await,
        "kubectl with Azure DevOps' OIDC token",
    );
    assert_eq!(w.ci.ado_requests.load(Ordering::SeqCst), 1);
    let assertion = w.te.last_form()["client_assertion"].clone();
    assert_eq!(
        claims(&assertion)["sub"],
        format!("sc://contoso/proj/{ADO_CONNECTION}")
    );
    assert_eq!(w.te.last_form()["client_id"], SP_APP);

    // Without the service connection id.
    let mut r2 = w.run(w.entra_args("workloadidentity", "ado-2", &["--client-id", SP_APP]));
    r2.env = r.env.clone();
    r2.env
        .retain(|(k, _)| k != "AZURESUBSCRIPTION_SERVICE_CONNECTION_ID");
    let out = w.plugin(&r2, None).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--azure-pipelines-service-connection-id"),
        "{}",
        stderr(&out)
    );
}

// === managed identity, Azure CLI, GitHub directly ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_from_the_identity_endpoint() {
    let w = world().await;
    let args = vec![
        "--login".to_owned(),
        "msi".into(),
        "--scope".into(),
        SCOPE.into(),
        "--identity-client-id".into(),
        MI_CLIENT.into(),
        "--cache-dir".into(),
        w.cache("mi").display().to_string(),
    ];
    let mut r = w.run(args);
    r.env = vec![
        (
            "IDENTITY_ENDPOINT".into(),
            format!("http://127.0.0.1:{}/msi/token", w.mi.addr.port()),
        ),
        ("IDENTITY_HEADER".into(), w.mi_header.clone()),
    ];
    let out = w.kubectl(&r).await;
    assert_listed(&out, "kubectl with a managed identity");
    let c = claims(cached(&w.cache("mi"))["access_token"].as_str().unwrap());
    assert_eq!(c["aud"], "api://kube-relay");
    assert_eq!(c["appid"], MI_CLIENT);
    assert_no_token_in(&out, &w.cache("mi"));
    assert_listed(&w.kubectl(&r).await, "cached");
    assert_eq!(w.mi.managed_identity_grants.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_cli_token_and_the_az_login_hint() {
    let w = world().await;
    let exp = now() + 3600;
    let token = w.te_signer.mint(json!({
        "iss": format!("https://sts.windows.net/{TID}/"), "aud": "api://kube-relay", "tid": TID,
        "oid": OID_AZ_USER, "upn": "az-user@contoso.test", "scp": "user_impersonation",
        "ver": "1.0", "exp": exp,
    }));
    let ok_bin = w.path("az-ok");
    let out_bin = w.path("az-out");
    for d in [&ok_bin, &out_bin] {
        std::fs::create_dir_all(d).unwrap();
    }
    let answer = json!({
        "accessToken": token, "expiresOn": "2030-01-01 00:00:00.000000", "expires_on": exp,
        "subscription": "00000000-0000-0000-0000-00000000000s", "tenant": TID, "tokenType": "Bearer",
    });
    let args_log = w.path("az-args");
    let script = |body: String| {
        format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\n{body}\n",
            args_log.display()
        )
    };
    std::fs::write(
        ok_bin.join("az"),
        script(format!("cat <<'EOF'\n{answer}\nEOF")),
    )
    .unwrap();
    std::fs::write(
        out_bin.join("az"),
        script("echo \"ERROR: Please run 'az login' to setup account.\" >&2\nexit 1".into()),
    )
    .unwrap();
    for d in [&ok_bin, &out_bin] {
        std::fs::set_permissions(d.join("az"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path_with = |d: &Path| format!("{}:{}", d.display(), std::env::var("PATH").unwrap());
    let args = vec![
        "--login".to_owned(),
        "azurecli".into(),
        "--scope".into(),
        SCOPE.into(),
        "--cache-dir".into(),
        w.cache("az").display().to_string(),
    ];
    let mut r = w.run(args.clone());
    r.env = vec![("PATH".into(), path_with(&ok_bin))];
    let out = w.kubectl(&r).await;
    assert_listed(&out, "kubectl with the Azure CLI's token");
    assert_no_token_in(&out, &w.cache("az"));
    let logged = std::fs::read_to_string(&args_log).unwrap();
    assert!(
        logged.contains("account get-access-token -o json --scope api://kube-relay/.default"),
        "{logged}"
    );

    let mut r = w.run(args);
    r.args[5] = w.cache("az-out").display().to_string();
    r.env = vec![("PATH".into(), path_with(&out_bin))];
    let out = w.kubectl(&r).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("run `az login`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_oidc_token_used_directly() {
    let w = world().await;
    let args = vec![
        "--login".to_owned(),
        "github".into(),
        "--audience".into(),
        "api://kube-relay".into(),
        "--cache-dir".into(),
        w.cache("ghd").display().to_string(),
    ];
    let mut r = w.run(args);
    r.env = w.ci.github_env();
    let out = w.kubectl(&r).await;
    assert_listed(&out, "kubectl with GitHub's token");
    assert_eq!(*w.ci.github_audiences.lock().unwrap(), ["api://kube-relay"]);
    assert_no_token_in(&out, &w.cache("ghd"));
    assert_eq!(w.token_requests(), 0, "github mode never talks to Entra");
    assert_listed(&w.kubectl(&r).await, "cached");
    assert_eq!(w.ci.github_audiences.lock().unwrap().len(), 1);
}

// === the exec protocol ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_human_login_without_a_terminal_fails_fast_with_the_command_to_run() {
    let w = world().await;
    let mut r = w.run(w.entra_args("browser", "human", &["--client-id", SP_APP]));
    r.interactive_mode = "Never";
    let started = Instant::now();
    let out = w.kubectl(&r).await;
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let err = stderr(&out);
    assert!(err.contains("no terminal"), "{err}");
    assert!(err.contains("Run this once in a terminal"), "{err}");
    assert!(err.contains(" token --login browser --tenant-id"), "{err}");
    assert_eq!(w.token_requests(), 0);

    // The plugin told so directly (v1beta1, interactive false), device code too.
    for mode in ["browser", "devicecode"] {
        let r = w.run(w.entra_args(mode, "human", &["--client-id", SP_APP]));
        let out = w
            .plugin(
                &r,
                Some(json!({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "spec": {"interactive": false}})),
            )
            .await;
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        assert!(
            stderr(&out).contains(&format!("--login {mode}")),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1beta1_in_v1beta1_out() {
    let w = world().await;
    let mut r = w.run(w.entra_args("secret", "beta", &["--client-id", SP_APP]));
    r.env.push(("AZURE_CLIENT_SECRET".into(), SP_SECRET.into()));
    r.api_version = "client.authentication.k8s.io/v1beta1";
    assert_listed(&w.kubectl(&r).await, "kubectl with a v1beta1 exec entry");
    let out = w
        .plugin(
            &r,
            Some(json!({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "spec": {"interactive": false}})),
        )
        .await;
    let cred: Value =
        serde_json::from_slice(&crate::support::ok(&out, "plugin").into_bytes()).unwrap();
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1beta1");
    assert_eq!(cred["kind"], "ExecCredential");
    let out = w
        .plugin(
            &r,
            Some(json!({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "spec": {"interactive": false}})),
        )
        .await;
    let cred: Value =
        serde_json::from_slice(&crate::support::ok(&out, "plugin").into_bytes()).unwrap();
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(w.token_requests(), 1);
}

#[test]
fn help_explains_every_mode_and_the_cache() {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-relay"))
        .args(["token", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for mode in [
        "browser",
        "devicecode",
        "azurecli",
        "secret",
        "workloadidentity",
        "msi",
        "github",
        "~/.kube/cache/kube-relay",
        "--logout",
    ] {
        assert!(help.contains(mode), "--help lacks {mode}:\n{help}");
    }
}

// === the CI recipes in docs/ci.md, step by step ===

impl World {
    /// Step 1 of every CI recipe: `kube-relay kubeconfig --relay URL --login MODE`, with the CI
    /// system's environment. Returns the kubeconfig it wrote.
    async fn recipe_kubeconfig(&self, extra: &[&str], env: &[(String, String)]) -> PathBuf {
        let kubeconfig = self.path(&format!("recipe-{}", uuid::Uuid::new_v4()));
        let mut c = Command::new(env!("CARGO_BIN_EXE_kube-relay"));
        c.arg("kubeconfig")
            .args([
                "--relay",
                &format!("https://localhost:{}", self.relay.port()),
            ])
            .args(extra)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            // Loopback stand-ins only: the relay and Entra stand-in are on a private CA, and
            // kubeconfigs must name this test binary instead of `kube-relay` on PATH.
            .arg("--relay-ca-file")
            .arg(self.path("ca.crt"))
            .arg("--idp-ca-file")
            .arg(self.path("ca.crt"))
            .arg("--exec-command")
            .arg(env!("CARGO_BIN_EXE_kube-relay"));
        let r = Run {
            args: vec![],
            api_version: "client.authentication.k8s.io/v1",
            interactive_mode: "Never",
            env: env.to_vec(),
        };
        self.base_env(&mut c, &r);
        let out = tokio::task::spawn_blocking(move || {
            crate::support::run(c, None, Duration::from_secs(60))
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "kube-relay kubeconfig: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("aks"), "{}", stderr(&out));
        kubeconfig
    }

    /// Step 2: `kubectl --context aks get pods` with that kubeconfig, same environment.
    async fn recipe_kubectl(&self, kubeconfig: &Path, env: &[(String, String)]) -> Output {
        let mut c = Command::new(crate::support::kubectl(KUBECTL));
        c.arg("--kubeconfig").arg(kubeconfig).args([
            "--context",
            "aks",
            "get",
            "pods",
            "-o",
            "name",
        ]);
        let r = Run {
            args: vec![],
            api_version: "client.authentication.k8s.io/v1",
            interactive_mode: "Never",
            env: env.to_vec(),
        };
        self.base_env(&mut c, &r);
        tokio::task::spawn_blocking(move || crate::support::run(c, None, Duration::from_secs(60)))
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_github_actions_with_entra_federation() {
    let w = world().await;
    // What a job with `permissions: id-token: write` and the two non-secret variables has.
    let mut env = w.ci.github_env();
    env.push(("AZURE_CLIENT_ID".into(), SP_APP.into()));
    env.push(("AZURE_TENANT_ID".into(), TID.into()));
    let kc = w
        .recipe_kubeconfig(&["--login", "workloadidentity"], &env)
        .await;
    let text = std::fs::read_to_string(&kc).unwrap();
    assert!(
        !text.contains(CLI_APP),
        "unattended logins never use the relay's public sign-in app: {text}"
    );
    assert!(text.contains("api://kube-relay/.default"), "{text}");
    assert_listed(
        &w.recipe_kubectl(&kc, &env).await,
        "recipe: GitHub Actions + Entra",
    );
    assert_eq!(w.te.last_form()["client_id"], SP_APP);
    assert_eq!(w.te.last_form()["scope"], "api://kube-relay/.default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_github_actions_trusted_directly() {
    let w = world().await;
    let env = w.ci.github_env();
    let kc = w
        .recipe_kubeconfig(
            &["--login", "github", "--audience", "api://kube-relay"],
            &env,
        )
        .await;
    assert_listed(
        &w.recipe_kubectl(&kc, &env).await,
        "recipe: GitHub OIDC directly",
    );
    assert_eq!(w.token_requests(), 0, "no Entra involved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_azure_pipelines_workload_identity_connection() {
    let w = world().await;
    // What an AzureCLI@2 step with a workload-identity service connection exposes, plus
    // SYSTEM_ACCESSTOKEN mapped in explicitly.
    let env = vec![
        ("AZURESUBSCRIPTION_CLIENT_ID".to_owned(), SP_APP.to_owned()),
        ("AZURESUBSCRIPTION_TENANT_ID".into(), TID.into()),
        (
            "AZURESUBSCRIPTION_SERVICE_CONNECTION_ID".into(),
            ADO_CONNECTION.into(),
        ),
        ("SYSTEM_OIDCREQUESTURI".into(), w.ci.ado_url.clone()),
        ("SYSTEM_ACCESSTOKEN".into(), ADO_ACCESS_TOKEN.into()),
    ];
    let kc = w
        .recipe_kubeconfig(&["--login", "workloadidentity"], &env)
        .await;
    assert_listed(
        &w.recipe_kubectl(&kc, &env).await,
        "recipe: Azure Pipelines",
    );
    assert!(w.ci.ado_requests.load(Ordering::SeqCst) >= 1);
    assert_eq!(w.te.last_form()["client_id"], SP_APP);
}
