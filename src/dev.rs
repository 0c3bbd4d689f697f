//! `kube-relay dev`: the embedded default. A throwaway CA and certificates, the dev OIDC issuer,
//! two simulated clusters (`alpha`, `beta`) and the relay in front, all in one process, with a
//! kubeconfig that works with plain kubectl.
//!
//! The relay runs on the very configuration file it writes (`relay.yaml`), parsed by the same
//! loader `serve` uses, so dev mode exercises the real configuration path.
//!
//! - `alpha`: upstream mode `impersonate` (the relay's token + `Impersonate-*`), reached by path
//!   (`/clusters/alpha`) or SNI (`alpha.relay.localhost`); its API server is dialed via
//!   `connect: 127.0.0.1:<port>` and verified as `alpha.kube-sim.localhost` against its own CA.
//! - `beta`: upstream mode `passthrough` (the caller's own token reaches the cluster).
//! - users: `alice` may do everything on both; `bob` may only read `beta`; `carol` may read
//!   `alpha`, and do more there only with a step-up token (authentication context `c1`, which
//!   the dev issuer grants when the sign-in asks for it with a `claims` request).
//! - sign-in: the dev issuer is also an authorization server (kube-sim's `oauth`) whose sign-in
//!   page offers exactly these users, with a public client for `kube-relay token` (browser and
//!   device code) and a confidential client for the relay's portal; `relay.yaml`'s `login`
//!   section names both, so the portal at `/` and `kube-relay kubeconfig` work with no external
//!   identity provider.

mod external;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use base64::Engine as _;
use kube_sim::issuer::oauth::{ClientKind, DevUser, OAuthClient, OAuthConfig};
use kube_sim::issuer::{DevIssuer, IssuerHandle, KeyAlg};
use kube_sim::pki::TestCa;
use kube_sim::record::UserInfo;
use kube_sim::server::{JwtIssuer, SimAuth, SimConfig, SimHandle, StaticToken};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The audience dev tokens carry and the relay requires.
pub const DEV_AUDIENCE: &str = "kube-relay";
/// `<cluster>.<HOST_SUFFIX>` names a cluster by SNI in dev mode.
pub const HOST_SUFFIX: &str = "relay.localhost";
/// The dev issuer's name in `relay.yaml` (so users are `dev/alice`, `dev/bob`).
pub const ISSUER_NAME: &str = "dev";
/// The public client `kube-relay token` signs in as (any loopback redirect, PKCE, device code).
pub const CLI_CLIENT_ID: &str = "kube-relay-dev-cli";
/// The portal's confidential client (secret in `DIR/portal-secret`).
pub const PORTAL_CLIENT_ID: &str = "kube-relay-dev-portal";
/// The scope that asks the dev issuer for a relay token. The relay requires no scope of dev
/// tokens (they carry none, like `kube-relay dev token`'s); the login section still names one so
/// clients ask for this API, as they would ask a real provider.
pub const DEV_SCOPE: &str = DEV_AUDIENCE;
/// The dev users and what they may do (the `access` rules in `relay.yaml` say the same).
pub const DEV_USERS: &[(&str, &str)] = &[
    ("alice", "may do everything on alpha and beta"),
    ("bob", "may only read beta"),
    (
        "carol",
        "may read alpha; exec and changes on alpha need a step-up sign-in (c1)",
    ),
];
/// Lifetime of dev access tokens, minted by `kube-relay dev token` and by the issuer alike.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Options for [`start`].
pub struct DevOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The `kube-relay` executable the kubeconfig's exec plugin runs.
    pub exe: PathBuf,
    /// Contexts of `contexts_from` to put behind the dev relay too (see `external`).
    pub add_contexts: Vec<String>,
    /// The kubeconfig those contexts come from (default: the one kubectl reads).
    pub contexts_from: Option<PathBuf>,
}

/// A running dev environment.
pub struct DevEnv {
    pub relay_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub issuer: DevIssuer,
    pub issuer_handle: IssuerHandle,
    pub alpha: SimHandle,
    pub beta: SimHandle,
    /// The relay's CA certificate (PEM), for clients that talk to it directly.
    pub relay_ca_pem: String,
    /// Reload and readiness handle of the running relay.
    pub relay_handle: std::sync::Arc<crate::server::Relay>,
    /// Real clusters added with `--add-context`: (relay cluster name, source context).
    pub external: Vec<(String, String)>,
    shutdown: CancellationToken,
    relay: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl DevEnv {
    /// Mints a dev token for `user` (what `kube-relay dev token` prints).
    pub fn token(&self, user: &str) -> String {
        mint_for(&self.issuer, user, &[], TOKEN_TTL)
    }

    /// Stops the relay, the simulated clusters and the issuer.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.relay.await;
        self.alpha.shutdown();
        self.beta.shutdown();
        self.issuer_handle.shutdown();
    }

    /// Runs until Ctrl-C or `shutdown` from elsewhere.
    pub async fn wait(self) -> anyhow::Result<()> {
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r?; }
            () = self.shutdown.cancelled() => {}
        }
        self.stop().await;
        Ok(())
    }
}

fn groups_of(user: &str) -> Vec<&'static str> {
    match user {
        "alice" => vec!["dev:admins"],
        "bob" => vec!["dev:viewers"],
        _ => vec![],
    }
}

/// A dev access token; `acrs`: the authentication contexts a step-up sign-in satisfied.
fn mint_for(issuer: &DevIssuer, user: &str, acrs: &[String], ttl: Duration) -> String {
    let now = crate::clock::unix_now();
    let mut claims = json!({
        "sub": user,
        "aud": DEV_AUDIENCE,
        "name": user,
        "groups": groups_of(user),
        "iat": now,
        "nbf": now,
        "exp": now + ttl.as_secs(),
    });
    if !acrs.is_empty() {
        claims["acrs"] = json!(acrs);
    }
    issuer.mint(claims)
}

/// The issuer's authorization server: the dev users, the CLI's public client and the portal's
/// confidential one, and access tokens minted exactly as `kube-relay dev token` mints them.
fn oauth_config(issuer: &DevIssuer, public_url: &str, portal_secret: String) -> OAuthConfig {
    let minter = issuer.clone();
    OAuthConfig {
        users: DEV_USERS
            .iter()
            .map(|(name, description)| DevUser {
                name: (*name).to_owned(),
                description: (*description).to_owned(),
            })
            .collect(),
        clients: vec![
            OAuthClient {
                client_id: CLI_CLIENT_ID.to_owned(),
                kind: ClientKind::PublicLoopback,
            },
            OAuthClient {
                client_id: PORTAL_CLIENT_ID.to_owned(),
                kind: ClientKind::Confidential {
                    secret: portal_secret,
                    redirect_uris: vec![format!("{public_url}/-/callback")],
                },
            },
        ],
        api_scopes: vec![DEV_SCOPE.to_owned()],
        audience: DEV_AUDIENCE.to_owned(),
        mint_access_token: std::sync::Arc::new(move |user, acrs| {
            mint_for(&minter, user, acrs, TOKEN_TTL)
        }),
        access_token_lifetime: TOKEN_TTL,
        // Shorter than RFC 8628's 5 s default: the person is right here, on the same machine.
        device_interval: Duration::from_secs(2),
        max_pending: 256,
    }
}

/// `len` random bytes, encoded: secrets written to the dev directory.
fn random_text(len: usize, engine: &impl base64::Engine) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; len];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the random number generator failed"))?;
    Ok(engine.encode(bytes))
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    crate::private_file::replace(path, contents.as_bytes())
}

async fn start_sim(
    name: &str,
    issuer: &DevIssuer,
    relay_token: &str,
) -> anyhow::Result<(SimHandle, String, String)> {
    let ca = TestCa::new(&format!("kube-sim {name} cluster CA"))?;
    let host = format!("{name}.kube-sim.localhost");
    let leaf = ca.issue(&[host.as_str(), "127.0.0.1"])?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let tls = kube_sim::server::tls_config(&leaf)?;
    let handle = kube_sim::server::start(
        listener,
        Some(tls),
        SimConfig {
            name: name.to_owned(),
            git_version: "v1.31.2".to_owned(),
            auth: SimAuth {
                static_tokens: vec![StaticToken {
                    token: relay_token.to_owned(),
                    user: UserInfo {
                        username: "system:serviceaccount:kube-system:kube-relay".to_owned(),
                        groups: vec![
                            "system:serviceaccounts".to_owned(),
                            "system:authenticated".to_owned(),
                        ],
                        ..UserInfo::default()
                    },
                    can_impersonate: true,
                }],
                jwt: vec![JwtIssuer {
                    issuer: issuer.issuer_url(),
                    audiences: vec![DEV_AUDIENCE.to_owned()],
                    jwks: issuer.jwks(),
                }],
            },
        },
    )
    .await?;
    Ok((handle, host, ca.cert_pem().to_owned()))
}

/// Starts everything and writes `kubeconfig`, `relay.yaml` and the certificates into `dir`.
pub async fn start(opts: DevOptions) -> anyhow::Result<DevEnv> {
    crate::install_crypto_provider();
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;

    // The relay's CA signs the relay's serving certificate and the dev issuer's.
    let relay_ca = TestCa::new("kube-relay dev CA")?;
    let wildcard = format!("*.{HOST_SUFFIX}");
    let relay_leaf = relay_ca.issue(&["localhost", HOST_SUFFIX, wildcard.as_str(), "127.0.0.1"])?;
    std::fs::write(dir.join("ca.crt"), relay_ca.cert_pem())?;
    std::fs::write(dir.join("relay.crt"), &relay_leaf.cert_pem)?;
    write_private(&dir.join("relay.key"), &relay_leaf.key_pem)?;

    // Bound first: the portal's redirect URI, registered with the issuer, names its port.
    let listener = TcpListener::bind(opts.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (is another kube-relay dev running? use --listen)",
            opts.listen
        )
    })?;
    let relay_addr = listener.local_addr()?;
    let public_url = format!("https://localhost:{}", relay_addr.port());

    // The portal's client secret and cookie key, fresh for every run like the CA.
    let portal_secret = random_text(32, &base64::engine::general_purpose::URL_SAFE_NO_PAD)?;
    write_private(&dir.join("portal-secret"), &portal_secret)?;
    write_private(
        &dir.join("cookie-key"),
        &random_text(48, &base64::engine::general_purpose::STANDARD)?,
    )?;

    let issuer_listener = TcpListener::bind("127.0.0.1:0").await?;
    let issuer_url = format!("https://127.0.0.1:{}", issuer_listener.local_addr()?.port());
    let issuer = DevIssuer::generate(&issuer_url, KeyAlg::Es256)?;
    let issuer_leaf = relay_ca.issue(&["127.0.0.1", "localhost"])?;
    let issuer_handle = kube_sim::issuer::serve_oauth(
        issuer_listener,
        Some(kube_sim::server::tls_config(&issuer_leaf)?),
        issuer.clone(),
        oauth_config(&issuer, &public_url, portal_secret),
    )
    .await?;
    write_private(&dir.join("issuer.key"), &issuer.signing_key_pem())?;
    std::fs::write(
        dir.join("issuer.json"),
        serde_json::to_string_pretty(&json!({ "issuer": issuer_url, "alg": "ES256" }))?,
    )?;

    let relay_token = uuid::Uuid::new_v4().simple().to_string();
    write_private(&dir.join("relay-token"), &relay_token)?;
    let (alpha, alpha_host, alpha_ca) = start_sim("alpha", &issuer, &relay_token).await?;
    let (beta, beta_host, beta_ca) = start_sim("beta", &issuer, &relay_token).await?;
    std::fs::write(dir.join("alpha-ca.crt"), &alpha_ca)?;
    std::fs::write(dir.join("beta-ca.crt"), &beta_ca)?;

    let external = if opts.add_contexts.is_empty() {
        Vec::new()
    } else {
        let from = opts
            .contexts_from
            .clone()
            .or_else(external::default_kubeconfig)
            .context("--add-context: no kubeconfig to read (set KUBECONFIG or --contexts-from)")?;
        external::load(&from, &opts.add_contexts, &dir)?
    };
    let external_yaml: String = external.iter().map(|e| e.yaml.as_str()).collect();

    let admin_listener = TcpListener::bind(opts.admin_listen).await?;
    let admin_addr = admin_listener.local_addr()?;

    let relay_yaml = format!(
        r#"# Written by `kube-relay dev`: a working example of every part of the configuration.
listen: {relay_addr}
public_url: {public_url}
tls:
  cert_file: relay.crt
  key_file: relay.key
  ca_file: ca.crt        # private CA: published in /-/clusters and downloaded kubeconfigs
admin:
  listen: {admin_addr}
audit:
  path: audit.jsonl
recording:
  # exec and attach sessions on alpha are recorded (asciicast v2), one file per session;
  # production would use kind: azure_blob. alice may play them back in the portal.
  store:
    kind: file
    dir: recordings
  auditors:
    users: [{ISSUER_NAME}/alice]
timeouts:
  # Dev mode stops quickly on Ctrl-C; production defaults are 5s / 20s.
  drain_delay: 200ms
  drain_window: 1s
  drain_timeout: 3s
routing:
  host_suffix: {HOST_SUFFIX}
  path_prefix: /clusters
identity:
  issuers:
    - name: {ISSUER_NAME}
      kind: oidc
      issuer: {issuer_url}
      audiences: [{DEV_AUDIENCE}]
      username_claim: sub
      ca_file: ca.crt
login:
  # `kube-relay token`, `kube-relay kubeconfig` and the portal at / sign in here: the dev issuer
  # shows a page to pick alice or bob (no passwords).
  issuer: {ISSUER_NAME}
  client_id: {CLI_CLIENT_ID}
  scopes: [{DEV_SCOPE}]
  portal:
    client_id: {PORTAL_CLIENT_ID}
    client_secret_file: portal-secret
    cookie_key_file: cookie-key
    session_lifetime: 1h
    terminal: true       # the web terminal and live logs at /-/terminal
clusters:
  - name: alpha
    server: https://{alpha_host}:{alpha_port}
    connect: 127.0.0.1:{alpha_port}
    ca_file: alpha-ca.crt
    upstream_auth:
      mode: impersonate
      token_file: relay-token
    recording: required
    access:
      - users: [{ISSUER_NAME}/alice]
      - users: [{ISSUER_NAME}/carol]
        verbs: [get, list, watch]
      - users: [{ISSUER_NAME}/carol]
        auth_context: [c1]
  - name: beta
    server: https://{beta_host}:{beta_port}
    connect: 127.0.0.1:{beta_port}
    ca_file: beta-ca.crt
    upstream_auth:
      mode: passthrough
    access:
      - users: [{ISSUER_NAME}/alice]
      - users: [{ISSUER_NAME}/bob]
        verbs: [get, list, watch]
{external_yaml}"#,
        alpha_port = alpha.addr.port(),
        beta_port = beta.addr.port(),
    );
    let config_path = dir.join("relay.yaml");
    std::fs::write(&config_path, relay_yaml)?;
    let cfg = crate::config::load(&config_path).map_err(|e| anyhow::anyhow!("dev config: {e}"))?;

    let kubeconfig = dir.join("kubeconfig");
    write_private(
        &kubeconfig,
        &render_kubeconfig(relay_addr, relay_ca.cert_pem(), &opts.exe, &dir, &external)?,
    )?;

    // Edit relay.yaml while dev mode runs: it reloads (or says why not).
    let app = crate::server::App::with_listeners(cfg, listener, Some(admin_listener))?
        .reload_from(config_path.clone());
    let relay_handle = app.relay();
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(app.run(shutdown.clone()));

    Ok(DevEnv {
        relay_addr,
        admin_addr: Some(admin_addr),
        dir: dir.clone(),
        kubeconfig,
        issuer,
        issuer_handle,
        alpha,
        beta,
        relay_ca_pem: relay_ca.cert_pem().to_owned(),
        relay_handle,
        external: external.into_iter().map(|e| (e.name, e.context)).collect(),
        shutdown,
        relay,
    })
}

/// The kubeconfig: path-routed contexts `alpha`/`beta` (with `tls-server-name` too, because
/// `kubectl get --raw` drops a server URL's path), SNI contexts `alpha-sni`/`beta-sni`, and
/// `bob@beta`, and a path-routed context per `--add-context` cluster (user alice). Tokens come
/// from `kube-relay dev token`.
fn render_kubeconfig(
    relay: SocketAddr,
    ca_pem: &str,
    exe: &Path,
    dir: &Path,
    external: &[external::External],
) -> anyhow::Result<String> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let base = format!("https://127.0.0.1:{}", relay.port());
    let cluster = |name: &str, server: String, c: &str| {
        json!({"name": name, "cluster": {
            "server": server,
            "tls-server-name": format!("{c}.{HOST_SUFFIX}"),
            "certificate-authority-data": ca,
        }})
    };
    let user = |name: &str| {
        json!({"name": name, "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": exe.display().to_string(),
            "args": ["dev", "token", "--dir", dir.display().to_string(), "--user", name],
            "interactiveMode": "Never",
            "provideClusterInfo": false,
            "installHint": "kube-relay dev token mints dev tokens; run `cargo run -- dev` first",
        }}})
    };
    let context = |name: &str, cluster: &str, user: &str| json!({"name": name, "context": {"cluster": cluster, "user": user, "namespace": "default"}});
    let mut clusters = vec![
        cluster("alpha", format!("{base}/clusters/alpha"), "alpha"),
        cluster("beta", format!("{base}/clusters/beta"), "beta"),
        cluster("alpha-sni", base.clone(), "alpha"),
        cluster("beta-sni", base.clone(), "beta"),
    ];
    let mut contexts = vec![
        context("alpha", "alpha", "alice"),
        context("beta", "beta", "alice"),
        context("alpha-sni", "alpha-sni", "alice"),
        context("beta-sni", "beta-sni", "alice"),
        context("bob@beta", "beta", "bob"),
    ];
    for e in external {
        clusters.push(cluster(
            &e.name,
            format!("{base}/clusters/{}", e.name),
            &e.name,
        ));
        contexts.push(context(&e.name, &e.name, "alice"));
    }
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "alpha",
        "clusters": clusters,
        "users": [user("alice"), user("bob")],
        "contexts": contexts,
    });
    Ok(serde_yaml_ng::to_string(&doc)?)
}

/// `kube-relay dev token`: prints an ExecCredential for `user` signed with the dev issuer's key
/// from `dir`, in the apiVersion client-go asked for.
pub fn token_credential(dir: &Path, user: &str, exec_info: Option<&str>) -> anyhow::Result<String> {
    crate::install_crypto_provider();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("issuer.json")).with_context(|| {
            format!(
                "no dev issuer in {} (is `kube-relay dev` running there?)",
                dir.display()
            )
        })?,
    )?;
    let url = meta["issuer"]
        .as_str()
        .context("issuer.json has no issuer")?;
    let pem = std::fs::read_to_string(dir.join("issuer.key"))?;
    let issuer = DevIssuer::from_pkcs8_pem(url, KeyAlg::Es256, &pem)?;
    let ttl = TOKEN_TTL;
    let token = mint_for(&issuer, user, &[], ttl);
    let api_version = exec_info
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|v| v["apiVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "client.authentication.k8s.io/v1".to_owned());
    // Expire the cached credential a little early so client-go never sends a stale token.
    let expiry = SystemTime::now() + ttl - Duration::from_secs(300);
    Ok(serde_json::to_string(&json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": {
            "token": token,
            "expirationTimestamp": humantime::format_rfc3339_seconds(expiry).to_string(),
        }
    }))?)
}

/// The text `kube-relay dev` prints once ready.
pub fn banner(env: &DevEnv) -> String {
    let k = env.kubeconfig.display();
    let admin = env.admin_addr.map_or_else(String::new, |a| {
        format!("\n  admin:      http://{a}/metrics  (/healthz, /readyz)")
    });
    format!(
        r#"kube-relay dev: ready
  relay:      https://{relay}  (SNI *.{HOST_SUFFIX}, path /clusters/<cluster>){admin}
  portal:     {public}/  (sign in as alice or bob; trust {ca} in the browser, or accept the warning)
  issuer:     {issuer}  (dev sign-in page: pick a user, no password)
  kubeconfig: {k}
  config:     {cfg}
  audit log:  {audit}

Try:
  export KUBECONFIG={k}
  kubectl get pods                            # alice on alpha, via /clusters/alpha (impersonated upstream)
  kubectl --context beta auth whoami          # passthrough: the token's own identity reaches beta
  kubectl --context alpha-sni get pods -w     # SNI routing; watch
  kubectl exec -it web-0 -- cat               # exec (SPDY or WebSocket, by kubectl version)
  kubectl logs -f web-0
  kubectl port-forward pod/web-0 8080:8080    # the simulated pod echoes what you send
  kubectl --context bob@beta get pods         # bob may read beta ...
  kubectl --context bob@beta delete pod web-0 # ... and nothing else (403)

{external}Sign in like production users do (browser or device code at the dev issuer, cached tokens):
  kube-relay kubeconfig --relay {public} --relay-ca-file {ca} --idp-ca-file {ca} --kubeconfig {sso}
  KUBECONFIG={sso} kubectl get pods
Ctrl-C stops everything."#,
        relay = env.relay_addr,
        public = format_args!("https://localhost:{}", env.relay_addr.port()),
        ca = env.dir.join("ca.crt").display(),
        issuer = env.issuer.issuer_url(),
        sso = env.dir.join("kubeconfig-sso").display(),
        cfg = env.dir.join("relay.yaml").display(),
        audit = env.dir.join("audit.jsonl").display(),
        external = external_banner(env),
    )
}

/// What the banner says about `--add-context` clusters: the context to use, and the RBAC the
/// impersonated dev user needs there.
fn external_banner(env: &DevEnv) -> String {
    if env.external.is_empty() {
        return String::new();
    }
    let mut s = String::from("Your own clusters, through the relay (alice, impersonated by your context's credential):\n");
    for (name, context) in &env.external {
        s.push_str(&format!(
            "  kubectl --context {name} auth whoami          # from your context {context:?}\n"
        ));
    }
    s.push_str(
        "  (the cluster sees user alice, groups dev:admins; grant what she may do there, e.g.\n",
    );
    s.push_str("   kubectl --context <yours> create clusterrolebinding kube-relay-dev-alice --clusterrole=view --user=alice)\n\n");
    s
}
