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

use serde_yaml_ng::{Mapping, Value};

pub use crate::wire::clusters::{ClusterEntry, ClusterList, ListUser, RelayInfo};
use crate::wire::kubeconfig::s;
pub use crate::wire::kubeconfig::{build, ca_data, token_args, Options, Plugin, Style, EXTENSION};
use crate::wire::login::LoginParams;

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
    /// How the written contexts (and this command) sign in. Default: browser.
    #[arg(long, value_enum, env = "KUBE_RELAY_LOGIN")]
    pub login: Option<crate::cli::login::LoginMode>,
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
    let mode = args.login;
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

fn join_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests;
