//! Kubeconfigs for the clusters a caller may use: the `/-/clusters` document both the relay and
//! the CLI speak, the kubeconfig built from it (the portal's download and
//! `kube-relay kubeconfig`), and the merge into an existing file that never clobbers entries the
//! relay did not write.
//!
//! Entries the relay writes carry a `kube-relay.io/relay` extension naming the relay's public
//! URL. A merge replaces or prunes only such entries for the same relay; a same-named entry
//! without it belongs to someone else and is left alone (the merge refuses unless `--force`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};

use crate::cli::login::LoginParams;

/// The extension marking kubeconfig entries written for a relay.
pub const EXTENSION: &str = "kube-relay.io/relay";
const EXEC_API: &str = "client.authentication.k8s.io/v1";

/// `GET /-/clusters`: who the caller is and the clusters they may use.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterList {
    pub api_version: String,
    pub kind: String,
    pub user: ListUser,
    pub relay: RelayInfo,
    /// How to sign in (absent when the relay has no `login` section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<LoginParams>,
    pub clusters: Vec<ClusterEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListUser {
    pub username: String,
    pub issuer: String,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayInfo {
    pub public_url: String,
    /// Base64 of the PEM CA behind the relay's certificate, when it is private.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority_data: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEntry {
    pub name: String,
    /// Path style: `<public_url><path_prefix>/<name>`.
    pub server: String,
    /// SNI style: `https://<name>.<host_suffix>[:port]` (when the relay has a host suffix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni_server: Option<String>,
    /// `<name>.<host_suffix>`: set with the path-style server so SNI still names the cluster
    /// when `kubectl get --raw` drops the path (design.md §4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// `passthrough`, `impersonate` or `on_behalf_of`: passthrough clusters need a token for
    /// their own audience.
    pub upstream_auth: String,
    /// Verbs the relay admits (`None`: all).
    pub verbs: Option<Vec<String>>,
    /// Namespaces the relay admits (`None`: all).
    pub namespaces: Option<Vec<String>>,
    /// The relay's last health probe reached the cluster.
    pub healthy: bool,
}

/// Which URL form the contexts use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Style {
    /// `https://relay/clusters/<name>` (+ `tls-server-name`): one DNS name and certificate.
    #[default]
    Path,
    /// `https://<name>.<host_suffix>`: needs wildcard DNS and certificate.
    Sni,
}

/// Which credential plugin the users run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Plugin {
    /// `kube-relay token` for every cluster.
    #[default]
    KubeRelay,
    /// Azure `kubelogin get-token` for passthrough clusters (AKS server id); `kube-relay token`
    /// for the others. Entra issuers only.
    Kubelogin,
}

/// How to build the kubeconfig.
#[derive(Clone, Debug)]
pub struct Options {
    pub style: Style,
    pub plugin: Plugin,
    /// The command the exec entries run (`kube-relay` from PATH by default).
    pub exec_command: String,
    /// Prepended to cluster, context and user names (e.g. `contoso-`).
    pub name_prefix: String,
    /// Exec args for a login (`args after "token"`), for relay-audience and passthrough users.
    /// `None`: the relay has no login section; the user entry then says how to get a token.
    pub relay_args: Option<Vec<String>>,
    pub passthrough_args: Option<Vec<String>>,
}

/// The relay's host, for naming users.
fn relay_label(public_url: &str) -> String {
    url::Url::parse(public_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "kube-relay".into())
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn marker(public_url: &str) -> Value {
    Value::Sequence(vec![map(vec![
        ("name", s(EXTENSION)),
        (
            "extension",
            map(vec![
                ("apiVersion", s("kube-relay.io/v1")),
                ("kind", s("RelayEntry")),
                ("publicUrl", s(public_url)),
            ]),
        ),
    ])])
}

fn exec_user(cmd: &str, args: &[String], public_url: &str) -> Value {
    map(vec![(
        "exec",
        map(vec![
            ("apiVersion", s(EXEC_API)),
            ("command", s(cmd)),
            (
                "args",
                Value::Sequence(args.iter().map(|a| s(a)).collect()),
            ),
            // Browser and device sign-in need a person; kubectl tells the plugin whether one is
            // there, and the plugin fails fast (with what to run) when not.
            ("interactiveMode", s("IfAvailable")),
            ("provideClusterInfo", Value::Bool(false)),
            (
                "installHint",
                s(&format!(
                    "kubectl needs `{cmd}` to sign in to kube-relay. Install the kube-relay CLI (see {public_url}/ for instructions) and put it on PATH."
                )),
            ),
        ]),
    )])
}

/// The kubeconfig for `list`, as a YAML value with `clusters`, `contexts`, `users` and a
/// `current-context` (the first cluster).
pub fn build(list: &ClusterList, opts: &Options) -> anyhow::Result<Value> {
    let public_url = list.relay.public_url.trim_end_matches('/');
    let host = relay_label(public_url);
    let relay_user = format!("{}{host}", opts.name_prefix);
    let passthrough_user = format!("{}{host}-passthrough", opts.name_prefix);
    let mut clusters = Vec::new();
    let mut contexts = Vec::new();
    let mut needs_relay_user = false;
    let mut needs_passthrough_user = false;
    for c in &list.clusters {
        let name = format!("{}{}", opts.name_prefix, c.name);
        let mut cluster = Vec::new();
        match (opts.style, &c.sni_server) {
            (Style::Sni, Some(sni)) => cluster.push(("server", s(sni))),
            (Style::Sni, None) => bail!(
                "the relay has no host suffix, so SNI-style contexts cannot be built; use --style path"
            ),
            (Style::Path, _) => {
                cluster.push(("server", s(&c.server)));
                if let Some(t) = &c.tls_server_name {
                    cluster.push(("tls-server-name", s(t)));
                }
            }
        }
        if let Some(ca) = &list.relay.certificate_authority_data {
            cluster.push(("certificate-authority-data", s(ca)));
        }
        cluster.push(("extensions", marker(public_url)));
        clusters.push(map(vec![("name", s(&name)), ("cluster", map(cluster))]));
        let passthrough = c.upstream_auth == "passthrough";
        let user = if passthrough {
            needs_passthrough_user = true;
            &passthrough_user
        } else {
            needs_relay_user = true;
            &relay_user
        };
        contexts.push(map(vec![
            ("name", s(&name)),
            (
                "context",
                map(vec![
                    ("cluster", s(&name)),
                    ("user", s(user)),
                    ("extensions", marker(public_url)),
                ]),
            ),
        ]));
    }
    let mut users = Vec::new();
    let mut add_user = |name: &str,
                        args: Option<&Vec<String>>,
                        passthrough: bool|
     -> anyhow::Result<()> {
        let user = match (opts.plugin, passthrough, args) {
            (Plugin::Kubelogin, true, _) => kubelogin_user(list)?,
            (_, _, Some(args)) => exec_user(&opts.exec_command, args, public_url),
            (_, _, None) => bail!(
                "the relay at {public_url} has no `login` section, so it cannot say how to sign in; ask its operators, or use a token you already have with `kubectl --token`"
            ),
        };
        let mut u = match user {
            Value::Mapping(m) => m,
            _ => Mapping::new(),
        };
        u.insert(s("extensions"), marker(public_url));
        users.push(map(vec![("name", s(name)), ("user", Value::Mapping(u))]));
        Ok(())
    };
    if needs_relay_user {
        add_user(&relay_user, opts.relay_args.as_ref(), false)?;
    }
    if needs_passthrough_user {
        add_user(&passthrough_user, opts.passthrough_args.as_ref(), true)?;
    }
    let current = contexts
        .first()
        .and_then(|c| c.get("name"))
        .cloned()
        .unwrap_or(s(""));
    Ok(map(vec![
        ("apiVersion", s("v1")),
        ("kind", s("Config")),
        ("clusters", Value::Sequence(clusters)),
        ("contexts", Value::Sequence(contexts)),
        ("users", Value::Sequence(users)),
        ("current-context", current),
        ("preferences", Value::Mapping(Mapping::new())),
    ]))
}

/// Azure kubelogin for passthrough clusters: a token for the AKS server app, as
/// `az aks get-credentials` + `kubelogin convert-kubeconfig` would write.
fn kubelogin_user(list: &ClusterList) -> anyhow::Result<Value> {
    let Some(login) = &list.login else {
        bail!("--plugin kubelogin needs the relay's login settings (it has no `login` section)");
    };
    let (Some(tenant), "entra") = (&login.tenant_id, login.kind.as_str()) else {
        bail!("--plugin kubelogin works with Entra issuers only; this relay signs in with a generic OIDC issuer");
    };
    let server_id = login
        .passthrough_scopes
        .first()
        .map(|s| s.trim_end_matches("/.default").to_owned())
        .unwrap_or_else(|| crate::config::AKS_SERVER_APP.to_owned());
    let mut args = vec![
        "get-token".to_owned(),
        "--login".into(),
        "devicecode".into(),
        "--server-id".into(),
        server_id,
        "--client-id".into(),
        login.client_id.clone(),
        "--tenant-id".into(),
        tenant.clone(),
    ];
    if let Some(h) = &login.authority_host {
        args.push("--authority-host".into());
        args.push(format!("{}/", h.trim_end_matches('/')));
    } else {
        args.extend(["--environment".into(), "AzurePublicCloud".into()]);
    }
    Ok(map(vec![(
        "exec",
        map(vec![
            ("apiVersion", s(EXEC_API)),
            ("command", s("kubelogin")),
            (
                "args",
                Value::Sequence(args.iter().map(|a| s(a)).collect()),
            ),
            ("interactiveMode", s("IfAvailable")),
            ("provideClusterInfo", Value::Bool(false)),
            (
                "installHint",
                s("kubelogin is not installed: see https://azure.github.io/kubelogin/install.html"),
            ),
        ]),
    )]))
}

/// The relay public URL an entry was written for, if it was written by kube-relay at all.
fn entry_relay(entry: &Value, inner: &str) -> Option<String> {
    let exts = entry.get(inner)?.get("extensions")?.as_sequence()?;
    exts.iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(EXTENSION))?
        .get("extension")?
        .get("publicUrl")?
        .as_str()
        .map(str::to_owned)
}

/// What a merge did, for the command's summary.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    /// Contexts this relay wrote earlier that the caller may no longer use.
    pub removed: Vec<String>,
}

/// Merges `new` (from [`build`]) into `existing`, in place. Entries of the same relay are
/// replaced, ones it no longer lists are pruned; everything else is kept as it was, including
/// unknown keys. A same-named entry that kube-relay did not write is an error unless `force`.
pub fn merge(
    existing: &mut Value,
    new: &Value,
    public_url: &str,
    force: bool,
) -> anyhow::Result<MergeReport> {
    let public_url = public_url.trim_end_matches('/');
    if existing.is_null() {
        *existing = Value::Mapping(Mapping::new());
    }
    let Value::Mapping(root) = existing else {
        bail!("the existing kubeconfig is not a YAML mapping");
    };
    root.entry(s("apiVersion")).or_insert(s("v1"));
    root.entry(s("kind")).or_insert(s("Config"));
    let mut report = MergeReport::default();
    for (section, inner) in [
        ("clusters", "cluster"),
        ("contexts", "context"),
        ("users", "user"),
    ] {
        let incoming = new
            .get(section)
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        let incoming_names: BTreeSet<String> = incoming
            .iter()
            .filter_map(|e| e.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let list = root
            .entry(s(section))
            .or_insert(Value::Sequence(Vec::new()));
        if list.is_null() {
            *list = Value::Sequence(Vec::new());
        }
        let Value::Sequence(list) = list else {
            bail!("`{section}` in the existing kubeconfig is not a list");
        };
        // Someone else's entry under a name we want: stop before changing anything.
        for e in list.iter() {
            let Some(name) = e.get("name").and_then(Value::as_str) else {
                continue;
            };
            let ours = entry_relay(e, inner).as_deref() == Some(public_url);
            if incoming_names.contains(name) && !ours && !force {
                bail!(
                    "the kubeconfig already has a {inner} named {name:?} that kube-relay did not write for {public_url}; rerun with --context-prefix (e.g. --context-prefix relay-) or --force to replace it"
                );
            }
        }
        let before: BTreeSet<String> = list
            .iter()
            .filter_map(|e| e.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        list.retain(|e| {
            let name = e.get("name").and_then(Value::as_str).unwrap_or_default();
            let ours = entry_relay(e, inner).as_deref() == Some(public_url);
            if incoming_names.contains(name) {
                return false; // replaced below
            }
            if ours {
                if section == "contexts" {
                    report.removed.push(name.to_owned());
                }
                return false;
            }
            true
        });
        for e in incoming {
            if section == "contexts" {
                let name = e
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if before.contains(&name) {
                    report.updated.push(name);
                } else {
                    report.added.push(name);
                }
            }
            list.push(e);
        }
    }
    // Keep the user's current context unless it is gone or there is none.
    let current = root
        .get("current-context")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let still_there = root
        .get("contexts")
        .and_then(Value::as_sequence)
        .is_some_and(|l| {
            l.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(current.as_str()))
        });
    if current.is_empty() || !still_there {
        if let Some(first) = new.get("current-context") {
            root.insert(s("current-context"), first.clone());
        }
    }
    Ok(report)
}

/// Writes `doc` to `path` with mode 0600 (it names credential commands, and kubeconfigs often
/// hold secrets), via a temporary file and rename so a crash never leaves half a file. The file
/// it replaces is kept as `<path>.bak` first. A symlinked kubeconfig (dotfiles) is written
/// where the link points, as kubectl does, rather than replaced by a plain file.
pub fn write_with_backup(path: &Path, doc: &Value) -> anyhow::Result<Option<PathBuf>> {
    let text = serde_yaml_ng::to_string(doc)?;
    let resolved = resolve_symlink(path);
    let path = resolved.as_path();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let backup = if path.exists() {
        let mut b = path.as_os_str().to_owned();
        b.push(".bak");
        let b = PathBuf::from(b);
        let old = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        crate::private_file::replace(&b, &old)?;
        Some(b)
    } else {
        None
    };
    crate::private_file::replace(path, text.as_bytes())?;
    Ok(backup)
}

/// Where `path` really is: the target of a symlink (chains included; a dangling link's own
/// target, so the file is created there), else `path` itself.
fn resolve_symlink(path: &Path) -> PathBuf {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return path.to_owned();
    }
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match std::fs::read_link(path) {
        Ok(t) if t.is_absolute() => t,
        Ok(t) => path.parent().unwrap_or(Path::new(".")).join(t),
        Err(_) => path.to_owned(),
    }
}

// === the command ===

/// `kube-relay kubeconfig` arguments. Debug never prints the bearer token.
#[derive(clap::Args, Clone)]
#[command(after_help = "Examples:\n  \
    kube-relay kubeconfig --relay https://relay.example.com\n  \
    kube-relay kubeconfig --relay https://relay.example.com --style sni --context-prefix contoso-\n  \
    kube-relay kubeconfig --relay https://relay.example.com --login workloadidentity   # in CI")]
pub struct KubeconfigArgs {
    /// The relay's public URL.
    #[arg(long, env = "KUBE_RELAY_URL")]
    pub relay: url::Url,
    /// The kubeconfig to merge into (default: the first path in $KUBECONFIG, else ~/.kube/config).
    /// `-` prints the kubeconfig on stdout instead.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Context URL form: path (`/clusters/<name>`, one certificate name) or sni
    /// (`<name>.<suffix>`).
    #[arg(long, value_enum, default_value_t = Style::Path)]
    pub style: Style,
    /// Credential plugin in the user entries: kube-relay (`kube-relay token`) or kubelogin (Azure
    /// kubelogin for passthrough clusters).
    #[arg(long, value_enum, default_value_t = Plugin::KubeRelay)]
    pub plugin: Plugin,
    /// Prefix for cluster, context and user names.
    #[arg(long, default_value = "")]
    pub context_prefix: String,
    /// Replace same-named entries kube-relay did not write.
    #[arg(long)]
    pub force: bool,
    /// The command kubeconfig users run to get tokens.
    #[arg(long, default_value = "kube-relay")]
    pub exec_command: String,
    /// How the written contexts (and this command) sign in: browser, devicecode, azurecli,
    /// secret, workloadidentity, msi, github. Default: browser.
    #[arg(long, env = "KUBE_RELAY_LOGIN")]
    pub login: Option<String>,
    /// Audience of the GitHub Actions OIDC token (with --login github).
    #[arg(long)]
    pub audience: Option<String>,
    /// Use this bearer token to list clusters instead of signing in (e.g. in CI).
    #[arg(long, env = "KUBE_RELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Extra CA for the relay's certificate (PEM), when it is private and you have it; else the
    /// CA the relay publishes is not trusted before it is fetched over a verified connection.
    #[arg(long)]
    pub relay_ca_file: Option<PathBuf>,
    /// Extra CA for the identity provider (PEM), passed on to `kube-relay token`.
    #[arg(long, env = "KUBE_RELAY_IDP_CA_FILE")]
    pub idp_ca_file: Option<PathBuf>,
    /// Where `kube-relay token` caches tokens (passed on).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

impl std::fmt::Debug for KubeconfigArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeconfigArgs")
            .field("relay", &self.relay.as_str())
            .field("kubeconfig", &self.kubeconfig)
            .field("style", &self.style)
            .field("plugin", &self.plugin)
            .field("context_prefix", &self.context_prefix)
            .field("force", &self.force)
            .field("exec_command", &self.exec_command)
            .field("login", &self.login)
            .field("audience", &self.audience)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("relay_ca_file", &self.relay_ca_file)
            .field("idp_ca_file", &self.idp_ca_file)
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

/// Runs `kube-relay kubeconfig`.
pub fn main(args: KubeconfigArgs) -> ExitCode {
    crate::install_crypto_provider();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kube-relay kubeconfig: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kube-relay kubeconfig: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_kubeconfig() -> anyhow::Result<PathBuf> {
    if let Some(v) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        if let Some(first) = std::env::split_paths(&v).next() {
            return Ok(first);
        }
    }
    let home = std::env::var_os("HOME").context("HOME is not set; pass --kubeconfig")?;
    Ok(PathBuf::from(home).join(".kube").join("config"))
}

async fn run(args: KubeconfigArgs) -> anyhow::Result<()> {
    let base = args.relay.as_str().trim_end_matches('/').to_owned();
    let mut extra_ca = Vec::new();
    if let Some(f) = &args.relay_ca_file {
        use rustls_pki_types::pem::PemObject as _;
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(&bytes) {
            extra_ca.push(c.with_context(|| format!("{}: not PEM certificates", f.display()))?);
        }
    }
    let http = crate::net::idp::IdpHttp::new(&extra_ca)?;
    let login_params: Option<LoginParams> = match http
        .get_json::<LoginParams>(&format!("{base}/-/login-config"))
        .await
    {
        Ok(p) => Some(p),
        Err(e) if args.token.is_some() => {
            tracing::debug!("no login settings from the relay: {e:#}");
            None
        }
        Err(e) => {
            return Err(e.context(format!(
                "asking {base} how to sign in (is it a kube-relay, and is its certificate trusted? a private CA needs --relay-ca-file)"
            )))
        }
    };
    let mode = match &args.login {
        Some(m) => Some(crate::cli::login::LoginMode::from_name(m).with_context(|| {
            format!("--login {m}: expected browser, devicecode, azurecli, secret, workloadidentity, msi or github")
        })?),
        None => None,
    };
    let login_args = |passthrough: bool| {
        login_params.as_ref().map(|p| {
            let mut l = crate::cli::login::LoginArgs::from_params(p, passthrough);
            if let Some(m) = mode {
                l.login = m;
                if !m.needs_human() {
                    // The published client id is the relay's public sign-in app; unattended
                    // logins are their own app (AZURE_CLIENT_ID and friends at run time), and
                    // app-only tokens are asked for with `<resource>/.default`.
                    l.client_id = None;
                    if p.kind == "entra" {
                        l.scopes = l.scopes.iter().map(|s| default_scope(s)).collect();
                    }
                }
            }
            if let Some(a) = &args.audience {
                l.audience = Some(a.clone());
            }
            if let Some(ca) = &args.idp_ca_file {
                l.ca_file = Some(ca.clone());
            }
            if let Some(d) = &args.cache_dir {
                l.cache_dir = Some(d.clone());
            }
            l
        })
    };
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let l = with_environment(login_args(false).context(
                "the relay publishes no login settings; pass a token with --token (or KUBE_RELAY_TOKEN)",
            )?);
            crate::cli::login::get_token(&l, std::io::IsTerminal::is_terminal(&std::io::stdin()))
                .await?
                .access_token
        }
    };
    let req = http::Request::builder()
        .uri(format!("{base}/-/clusters"))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::ACCEPT, "application/json")
        .body(Vec::new())?;
    let resp = http.send(req).await.context("listing clusters")?;
    match resp.status().as_u16() {
        200 => {}
        401 => bail!("the relay refused the token (401): sign in again (`kube-relay token --logout` clears the cache)"),
        code => bail!(
            "the relay answered {code} to /-/clusters: {}",
            String::from_utf8_lossy(resp.body()).chars().take(300).collect::<String>()
        ),
    }
    let mut list: ClusterList =
        serde_json::from_slice(resp.body()).context("the relay's cluster list is not valid")?;
    // Entries are owned by the relay URL they were written for; a relay naming another URL
    // than the one asked for could otherwise replace or prune that relay's contexts.
    if list.relay.public_url.trim_end_matches('/') != base {
        bail!(
            "the relay at {base} says its URL is {}; rerun with --relay {}",
            list.relay.public_url,
            list.relay.public_url
        );
    }
    // The CA that just verified the relay is the one kubectl needs too, when the relay does not
    // publish its own.
    if list.relay.certificate_authority_data.is_none() {
        if let Some(f) = &args.relay_ca_file {
            let pem =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            list.relay.certificate_authority_data = Some(ca_data(&pem));
        }
    }
    if list.clusters.is_empty() {
        bail!(
            "{} may not use any cluster on this relay; ask its operators for access",
            list.user.username
        );
    }
    let opts = Options {
        style: args.style,
        plugin: args.plugin,
        exec_command: args.exec_command.clone(),
        name_prefix: args.context_prefix.clone(),
        relay_args: login_args(false).map(|l| token_args(&l)),
        passthrough_args: login_args(true).map(|l| token_args(&l)),
    };
    let doc = build(&list, &opts)?;
    let target = match &args.kubeconfig {
        Some(p) if p.as_os_str() == "-" => {
            print!("{}", serde_yaml_ng::to_string(&doc)?);
            return Ok(());
        }
        Some(p) => p.clone(),
        None => default_kubeconfig()?,
    };
    let mut existing: Value = match std::fs::read_to_string(&target) {
        Ok(text) if text.trim().is_empty() => Value::Null,
        Ok(text) => serde_yaml_ng::from_str(&text).with_context(|| {
            format!(
                "{} is not valid YAML; fix or move it first",
                target.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
        Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
    };
    let report = merge(&mut existing, &doc, &list.relay.public_url, args.force)?;
    let backup = write_with_backup(&target, &existing)?;
    eprintln!(
        "{}: {} context(s) for {} as {} (added: {}; updated: {}; removed: {})",
        target.display(),
        list.clusters.len(),
        base,
        list.user.username,
        join_or_none(&report.added),
        join_or_none(&report.updated),
        join_or_none(&report.removed),
    );
    if let Some(b) = backup {
        eprintln!("previous file kept as {}", b.display());
    }
    if let Some(first) = list.clusters.first() {
        eprintln!(
            "try: kubectl --context {}{} get pods",
            args.context_prefix, first.name
        );
    }
    Ok(())
}

/// What `kube-relay token` would read from the environment (AZURE_CLIENT_SECRET,
/// AZURE_FEDERATED_TOKEN_FILE, AZURESUBSCRIPTION_SERVICE_CONNECTION_ID), for this command's own
/// sign-in. Kept out of the written kubeconfig: the plugin reads them again at run time.
fn with_environment(mut l: crate::cli::login::LoginArgs) -> crate::cli::login::LoginArgs {
    #[derive(clap::Parser)]
    struct FromEnv {
        #[command(flatten)]
        login: crate::cli::login::LoginArgs,
    }
    if let Ok(e) = <FromEnv as clap::Parser>::try_parse_from(["kube-relay"]) {
        let e = e.login;
        l.client_secret = l.client_secret.or(e.client_secret);
        l.federated_token_file = l.federated_token_file.or(e.federated_token_file);
        l.azure_pipelines_service_connection_id = l
            .azure_pipelines_service_connection_id
            .or(e.azure_pipelines_service_connection_id);
    }
    l
}

/// `api://kube-relay/user_impersonation` → `api://kube-relay/.default`: app-only tokens (client
/// credentials, federated, managed identity) can only ask for an application's `.default`.
fn default_scope(scope: &str) -> String {
    match scope.rsplit_once('/') {
        Some((resource, _)) => format!("{resource}/.default"),
        None => format!("{scope}/.default"),
    }
}

/// The exec `args` for a login: `token` and its flags.
pub fn token_args(l: &crate::cli::login::LoginArgs) -> Vec<String> {
    std::iter::once("token".to_owned())
        .chain(l.to_exec_args())
        .collect()
}

fn join_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Base64 of PEM text, as kubeconfig `certificate-authority-data` wants it.
pub fn ca_data(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem.as_bytes())
}

#[cfg(test)]
mod tests;
