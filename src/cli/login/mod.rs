//! `kube-relay token`: a client-go exec credential plugin (`client.authentication.k8s.io/v1`),
//! and the sign-in code `kube-relay kubeconfig` shares with it.
//!
//! Layout:
//! - this file: the flags ([`LoginArgs`], [`TokenArgs`]), what they resolve to ([`Plan`]),
//!   [`get_token`] (cache first, then one refresh or sign-in under the entry's lock) and the
//!   plugin's [`main`].
//! - [`cache`]: the on-disk cache (0700 directory, 0600 files, atomic writes, lock per entry).
//! - [`exec`]: `KUBERNETES_EXEC_INFO` in, `ExecCredential` out.
//! - [`interactive`]: the human flows through the `oauth2` crate: browser (authorization code +
//!   PKCE with a loopback redirect) and device code, plus refresh.
//! - [`azure`]: the non-human modes: Azure CLI, client secret, workload identity (file, GitHub
//!   Actions, Azure DevOps), managed identity through azure_identity; GitHub's OIDC token as is.
//! - [`http`]: HTTP to identity providers over our hyper + rustls stack.
//!
//! Invariants:
//! - stdout carries the ExecCredential and nothing else; messages go to stderr.
//! - Access tokens, refresh tokens, client secrets and assertions never reach stderr, logs or
//!   Debug output (the cache file, 0600, is their only place on disk).
//! - A process that cannot ask a human (kubectl without a terminal) never starts a human flow:
//!   it fails at once with the command to run in a terminal, instead of hanging kubectl.
//! - Per cache entry, at most one process talks to the identity provider at a time; processes
//!   started together wait for it and use its token.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

mod azure;
mod cache;
mod exec;
mod interactive;

/// The public Entra authority.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// Human sign-ins give up after this by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// A cached token is used until this long before it expires.
const REUSE_MARGIN: Duration = Duration::from_secs(120);
/// Waiting for another process's sign-in may take its whole timeout plus this.
const LOCK_SLACK: Duration = Duration::from_secs(30);
/// Entra's audience for federated credentials (GitHub / Azure DevOps / Kubernetes tokens).
const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

/// What a client needs to sign in to a relay; served publicly at `/-/login-config` and built
/// from the `login` section of the relay's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LoginParams {
    /// `entra` or `oidc`.
    pub kind: String,
    /// OIDC: the issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Entra: the tenant and authority host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_host: Option<String>,
    /// The public client `kube-relay token` signs in as (browser, device code).
    pub client_id: String,
    /// Scopes for a token this relay accepts.
    pub scopes: Vec<String>,
    /// RFC 8707 resource indicator, when the provider picks the audience by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Scopes for clusters in passthrough mode (their own audience).
    pub passthrough_scopes: Vec<String>,
}

// === flags ===

/// How to get a token.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoginMode {
    /// Sign in with the browser (authorization code + PKCE, redirect to 127.0.0.1); for people.
    #[default]
    Browser,
    /// Sign in on another device with a code (RFC 8628); for people on SSH or headless hosts.
    Devicecode,
    /// Ask the Azure CLI for a token for the signed-in `az` account (`az login` first).
    Azurecli,
    /// A service principal with a client secret (--client-secret[-file] or AZURE_CLIENT_SECRET).
    Secret,
    /// Federated workload identity: a token file (AZURE_FEDERATED_TOKEN_FILE), else GitHub
    /// Actions OIDC, else an Azure DevOps service connection, exchanged at Entra.
    Workloadidentity,
    /// The Azure managed identity of this host (IDENTITY_ENDPOINT, else IMDS).
    Msi,
    /// GitHub Actions' own OIDC token for --audience, for relays that trust GitHub directly.
    Github,
}

impl LoginMode {
    /// Browser and device code need a person; the others run unattended.
    pub fn needs_human(self) -> bool {
        matches!(self, Self::Browser | Self::Devicecode)
    }

    /// The mode for a `--login` value (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(name.trim(), true).ok()
    }

    /// The `--login` value of this mode.
    pub fn name(self) -> &'static str {
        match self {
            Self::Browser => "browser",
            Self::Devicecode => "devicecode",
            Self::Azurecli => "azurecli",
            Self::Secret => "secret",
            Self::Workloadidentity => "workloadidentity",
            Self::Msi => "msi",
            Self::Github => "github",
        }
    }
}

/// Every flag that says how to sign in. Shared by `kube-relay token` and `kube-relay kubeconfig`.
/// Debug never prints the client secret.
#[derive(clap::Args, Clone, PartialEq, Eq)]
pub struct LoginArgs {
    /// How to get a token (see the modes below).
    #[arg(long, value_enum, env = "KUBE_RELAY_LOGIN", default_value_t = LoginMode::Browser)]
    pub login: LoginMode,
    /// Generic OIDC: the issuer URL; endpoints come from its discovery document.
    #[arg(long, conflicts_with_all = ["tenant_id", "authority_host"])]
    pub issuer: Option<String>,
    /// Entra: the tenant (GUID or domain). For secret and workloadidentity also AZURE_TENANT_ID
    /// or AZURESUBSCRIPTION_TENANT_ID.
    #[arg(long)]
    pub tenant_id: Option<String>,
    /// Entra: the authority host [default: https://login.microsoftonline.com].
    #[arg(long)]
    pub authority_host: Option<String>,
    /// The application (client) id to sign in as. For secret and workloadidentity also
    /// AZURE_CLIENT_ID or AZURESUBSCRIPTION_CLIENT_ID.
    #[arg(long)]
    pub client_id: Option<String>,
    /// A scope to request (repeatable), e.g. `api://kube-relay/.default`.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Resource indicator (RFC 8707). With --issuer it is sent on the authorization and token
    /// requests; with Entra it only sets the default scope `<resource>/.default`.
    #[arg(long)]
    pub resource: Option<String>,
    /// Client secret (secret mode). Prefer --client-secret-file or AZURE_CLIENT_SECRET: command
    /// lines are visible to other users.
    #[arg(long, env = "AZURE_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// File holding the client secret (secret mode).
    #[arg(long)]
    pub client_secret_file: Option<PathBuf>,
    /// Federated token file (workloadidentity mode), e.g. a projected service account token.
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE")]
    pub federated_token_file: Option<PathBuf>,
    /// Azure DevOps service connection id (workloadidentity mode in Azure Pipelines).
    #[arg(long, env = "AZURESUBSCRIPTION_SERVICE_CONNECTION_ID")]
    pub azure_pipelines_service_connection_id: Option<String>,
    /// Client id of a user-assigned managed identity (msi mode); default: system-assigned.
    #[arg(long)]
    pub identity_client_id: Option<String>,
    /// Audience of the GitHub Actions OIDC token (github mode), e.g. `api://kube-relay`.
    #[arg(long)]
    pub audience: Option<String>,
    /// Token cache directory [default: $KUBECACHEDIR, else ~/.kube/cache/kube-relay].
    #[arg(long, env = "KUBECACHEDIR")]
    pub cache_dir: Option<PathBuf>,
    /// An extra CA (PEM) to trust for the identity provider, beside the public ones.
    #[arg(long, env = "KUBE_RELAY_IDP_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// How long a browser or device code sign-in may take.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub timeout: Duration,
    /// Print the sign-in URL instead of opening a browser.
    #[arg(long)]
    pub no_browser: bool,
}

impl std::fmt::Debug for LoginArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginArgs")
            .field("login", &self.login)
            .field("issuer", &self.issuer)
            .field("tenant_id", &self.tenant_id)
            .field("authority_host", &self.authority_host)
            .field("client_id", &self.client_id)
            .field("scopes", &self.scopes)
            .field("resource", &self.resource)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("federated_token_file", &self.federated_token_file)
            .field(
                "azure_pipelines_service_connection_id",
                &self.azure_pipelines_service_connection_id,
            )
            .field("identity_client_id", &self.identity_client_id)
            .field("audience", &self.audience)
            .field("cache_dir", &self.cache_dir)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("no_browser", &self.no_browser)
            .finish()
    }
}

impl Default for LoginArgs {
    fn default() -> Self {
        Self {
            login: LoginMode::Browser,
            issuer: None,
            tenant_id: None,
            authority_host: None,
            client_id: None,
            scopes: Vec::new(),
            resource: None,
            client_secret: None,
            client_secret_file: None,
            federated_token_file: None,
            azure_pipelines_service_connection_id: None,
            identity_client_id: None,
            audience: None,
            cache_dir: None,
            ca_file: None,
            timeout: DEFAULT_TIMEOUT,
            no_browser: false,
        }
    }
}

/// `kube-relay token` arguments.
#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = TOKEN_HELP)]
pub struct TokenArgs {
    #[command(flatten)]
    pub login: LoginArgs,
    /// Delete this login's cached token (and refresh token) instead of printing one.
    #[arg(long)]
    pub logout: bool,
    /// With --logout: delete every cached kube-relay token.
    #[arg(long, requires = "logout")]
    pub all: bool,
}

const TOKEN_HELP: &str = "\
Login modes (--login):
  browser           sign in with the browser (auth code + PKCE, redirect to 127.0.0.1); default
  devicecode        sign in on another device with a code shown here
  azurecli          use the Azure CLI's signed-in account (`az login` first)
  secret            service principal + client secret (--client-secret-file or AZURE_CLIENT_SECRET)
  workloadidentity  federated token: AZURE_FEDERATED_TOKEN_FILE, GitHub Actions or Azure DevOps
  msi               this host's Azure managed identity (--identity-client-id for user-assigned)
  github            GitHub Actions' OIDC token for --audience, for relays that trust GitHub

Tokens are cached (0600 files) in $KUBECACHEDIR or ~/.kube/cache/kube-relay (--cache-dir) and
reused until 2 minutes before they expire; browser and device code logins are refreshed with
their refresh token. `--logout` forgets this login, `--logout --all` every one.

kubectl runs this as an exec credential plugin (client.authentication.k8s.io/v1 or v1beta1).
Without a terminal (interactiveMode Never, or stdin not a TTY) a browser or device code login
that is not cached fails at once: run the printed command in a terminal first.";

impl LoginArgs {
    /// A browser login for a relay's `/-/login-config`; `passthrough` asks for the scopes of
    /// clusters in passthrough mode (their own audience) instead of the relay's.
    pub fn from_params(p: &LoginParams, passthrough: bool) -> Self {
        let entra = p.kind == "entra";
        Self {
            login: LoginMode::Browser,
            issuer: if entra { None } else { p.issuer.clone() },
            tenant_id: if entra { p.tenant_id.clone() } else { None },
            authority_host: if entra {
                p.authority_host
                    .clone()
                    .filter(|h| h.trim_end_matches('/') != DEFAULT_AUTHORITY_HOST)
            } else {
                None
            },
            client_id: Some(p.client_id.clone()),
            scopes: if passthrough {
                p.passthrough_scopes.clone()
            } else {
                p.scopes.clone()
            },
            // The resource names the relay's audience; passthrough clusters have their own.
            resource: if passthrough {
                None
            } else {
                p.resource.clone()
            },
            ..Self::default()
        }
    }

    /// Switches to the mode named `mode` (`browser`, `devicecode`, `azurecli`, `secret`,
    /// `workloadidentity`, `msi`, `github`). Returns false, and changes nothing, for another
    /// name; [`LoginMode::from_name`] checks a name up front.
    pub fn set_mode(&mut self, mode: &str) -> bool {
        match LoginMode::from_name(mode) {
            Some(m) => {
                self.login = m;
                true
            }
            None => false,
        }
    }

    /// The arguments after `token` that reproduce this login in a kubeconfig exec entry. Never
    /// a secret: `--client-secret` is left out (secret mode reads AZURE_CLIENT_SECRET or a file).
    pub fn to_exec_args(&self) -> Vec<String> {
        let mut a = vec!["--login".to_owned(), self.login.name().to_owned()];
        let mut push = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(format!("--{flag}"));
                a.push(v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        push("issuer", self.issuer.clone());
        push("tenant-id", self.tenant_id.clone());
        push("authority-host", self.authority_host.clone());
        push("client-id", self.client_id.clone());
        for s in &self.scopes {
            push("scope", Some(s.clone()));
        }
        push("resource", self.resource.clone());
        push("client-secret-file", path(&self.client_secret_file));
        push("federated-token-file", path(&self.federated_token_file));
        push(
            "azure-pipelines-service-connection-id",
            self.azure_pipelines_service_connection_id.clone(),
        );
        push("identity-client-id", self.identity_client_id.clone());
        push("audience", self.audience.clone());
        push("cache-dir", path(&self.cache_dir));
        push("ca-file", path(&self.ca_file));
        if self.timeout != DEFAULT_TIMEOUT {
            push(
                "timeout",
                Some(humantime::format_duration(self.timeout).to_string()),
            );
        }
        if self.no_browser {
            a.push("--no-browser".to_owned());
        }
        a
    }

    fn cache_dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.cache_dir {
            return Ok(d.clone());
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .context("no cache directory: set HOME, KUBECACHEDIR or --cache-dir")?;
        Ok(PathBuf::from(home).join(".kube/cache/kube-relay"))
    }

    fn extra_ca(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        use rustls_pki_types::pem::PemObject as _;
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let pem =
            std::fs::read(path).with_context(|| format!("reading --ca-file {}", path.display()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--ca-file {}: not PEM certificates", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "--ca-file {}: no certificate in it",
            path.display()
        );
        Ok(certs)
    }

    /// The command a person runs in a terminal to sign in for this login.
    fn terminal_command(&self) -> String {
        let exe = std::env::current_exe()
            .ok()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "kube-relay".to_owned());
        std::iter::once(exe)
            .chain(std::iter::once("token".to_owned()))
            .chain(self.to_exec_args())
            .map(|s| shell_quote(&s))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// === what the flags resolve to ===

/// Where tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Authority {
    /// Entra: `{host}/{tenant}`.
    Entra { host: String, tenant: String },
    /// A generic OIDC issuer.
    Oidc { issuer: String },
    /// Modes that do not name one (msi, azurecli without a tenant, github).
    Implicit,
}

impl Authority {
    fn id(&self) -> String {
        match self {
            Self::Entra { host, tenant } => format!("{host}/{tenant}"),
            Self::Oidc { issuer } => issuer.clone(),
            Self::Implicit => String::new(),
        }
    }

    /// The OpenID configuration URL, for the human flows.
    fn discovery_url(&self) -> Option<String> {
        match self {
            Self::Entra { host, tenant } => Some(format!(
                "{host}/{tenant}/v2.0/.well-known/openid-configuration"
            )),
            Self::Oidc { issuer } => Some(format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            )),
            Self::Implicit => None,
        }
    }
}

/// A login, checked: everything [`get_token`] needs besides secrets.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub mode: LoginMode,
    pub authority: Authority,
    pub client_id: String,
    /// As requested (the flows add `openid` / `offline_access` themselves).
    pub scopes: Vec<String>,
    /// RFC 8707 resource, sent only to generic OIDC providers (Entra v2 refuses it).
    pub resource: Option<String>,
}

fn env_first(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

impl Plan {
    pub fn new(a: &LoginArgs) -> anyhow::Result<Self> {
        let mode = a.login;
        let service_principal = matches!(mode, LoginMode::Secret | LoginMode::Workloadidentity);
        let tenant = a.tenant_id.clone().or_else(|| {
            service_principal
                .then(|| env_first(&["AZURE_TENANT_ID", "AZURESUBSCRIPTION_TENANT_ID"]))
                .flatten()
        });
        let client_id = a.client_id.clone().or_else(|| {
            service_principal
                .then(|| env_first(&["AZURE_CLIENT_ID", "AZURESUBSCRIPTION_CLIENT_ID"]))
                .flatten()
        });
        let host = a
            .authority_host
            .as_deref()
            .unwrap_or(DEFAULT_AUTHORITY_HOST)
            .trim_end_matches('/')
            .to_owned();
        let authority = match (&a.issuer, tenant) {
            (Some(i), _) => Authority::Oidc {
                issuer: i.trim_end_matches('/').to_owned(),
            },
            (None, Some(t)) => Authority::Entra { host, tenant: t },
            (None, None) => Authority::Implicit,
        };
        let mut scopes = a.scopes.clone();
        let entra_like = !matches!(authority, Authority::Oidc { .. });
        if scopes.is_empty() && entra_like {
            if let Some(r) = &a.resource {
                scopes.push(format!("{}/.default", r.trim_end_matches('/')));
            }
        }
        let need_client = || {
            client_id.clone().with_context(|| {
                format!(
                    "--login {} needs --client-id (the app to sign in as)",
                    mode.name()
                )
            })
        };
        let (client_id, scopes) = match mode {
            LoginMode::Browser | LoginMode::Devicecode => {
                anyhow::ensure!(
                    authority != Authority::Implicit,
                    "--login {} needs --tenant-id (Entra) or --issuer (OIDC)",
                    mode.name()
                );
                anyhow::ensure!(
                    !scopes.is_empty() || a.resource.is_some(),
                    "--login {} needs --scope (e.g. api://kube-relay/.default) or --resource",
                    mode.name()
                );
                (need_client()?, scopes)
            }
            LoginMode::Secret | LoginMode::Workloadidentity => {
                anyhow::ensure!(
                    matches!(authority, Authority::Entra { .. }),
                    "--login {} exchanges credentials at Entra ID: it needs --tenant-id (or AZURE_TENANT_ID), not --issuer",
                    mode.name()
                );
                anyhow::ensure!(
                    !scopes.is_empty(),
                    "--login {} needs --scope (e.g. api://kube-relay/.default) or --resource",
                    mode.name()
                );
                (need_client()?, scopes)
            }
            LoginMode::Azurecli | LoginMode::Msi => {
                anyhow::ensure!(
                    a.issuer.is_none(),
                    "--login {} gets Entra ID tokens: --issuer does not apply",
                    mode.name()
                );
                anyhow::ensure!(
                    scopes.len() == 1,
                    "--login {} needs exactly one --scope (e.g. api://kube-relay/.default) or --resource",
                    mode.name()
                );
                let id = if mode == LoginMode::Msi {
                    a.identity_client_id.clone().unwrap_or_default()
                } else {
                    String::new()
                };
                (id, scopes)
            }
            LoginMode::Github => {
                let aud = a.audience.clone().context(
                    "--login github needs --audience (the audience the relay's github issuer accepts, e.g. api://kube-relay)",
                )?;
                (String::new(), vec![aud])
            }
        };
        let resource = match authority {
            Authority::Oidc { .. } => a.resource.clone(),
            _ => None,
        };
        Ok(Self {
            mode,
            authority,
            client_id,
            scopes,
            resource,
        })
    }

    /// SHA-256 of what makes two logins different (hex): authority, client, sorted scopes,
    /// resource and mode.
    pub fn cache_key(&self) -> String {
        let mut scopes = self.scopes.clone();
        scopes.sort();
        scopes.dedup();
        // JSON keeps the fields unambiguous (no separator can be forged inside a value).
        let material = serde_json::json!([
            self.authority.id(),
            self.client_id,
            scopes,
            self.resource,
            self.mode.name(),
        ])
        .to_string();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, material.as_bytes());
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

// === tokens ===

/// An access token and when it expires.
#[derive(Clone)]
pub struct Token {
    pub access_token: String,
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field(
                "expires_at",
                &humantime::format_rfc3339_seconds(self.expires_at),
            )
            .finish_non_exhaustive()
    }
}

impl From<&cache::Stored> for Token {
    fn from(s: &cache::Stored) -> Self {
        Self {
            access_token: s.access_token.clone(),
            expires_at: s.expiry(),
        }
    }
}

/// The `exp` of a JWT access token, unverified (only to know when to fetch a new one).
pub(crate) fn jwt_expiry(token: &str) -> Option<u64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()
}

/// A token for this login: the cached one while it has more than two minutes left, else a
/// refreshed one, else a new sign-in (a human one only when `interactive`). Concurrent callers
/// for the same login (other processes included) share one refresh or sign-in.
pub async fn get_token(args: &LoginArgs, interactive: bool) -> anyhow::Result<Token> {
    crate::install_crypto_provider();
    let plan = Plan::new(args)?;
    let cache = cache::Cache::open(&args.cache_dir()?)?;
    let entry = cache.entry(&plan.cache_key());
    // Whoever holds the lock may take up to --timeout (a person signing in, or a slow `az` or
    // identity endpoint); waiting less would fail concurrent kubectl runs that only had to wait.
    let lock = entry.lock(args.timeout + LOCK_SLACK).await?;
    let stored = entry.read(&lock);
    if let Some(s) = stored.as_ref().filter(|s| s.usable_for(REUSE_MARGIN)) {
        return Ok(s.into());
    }
    let extra_ca = args.extra_ca()?;
    let http = crate::net::idp::IdpHttp::new(&extra_ca)?;
    if let Some(rt) = stored.as_ref().and_then(|s| s.refresh_token.clone()) {
        match interactive::refresh(&http, &plan, &rt).await {
            Ok(fresh) => {
                entry.write(&lock, &fresh)?;
                return Ok((&fresh).into());
            }
            Err(interactive::RefreshError::Rejected(why)) => {
                // The refresh token is dead (expired, revoked, password changed): forget it so
                // the next run does not try it again, then sign in anew.
                eprintln!("kube-relay token: the saved sign-in can no longer be refreshed ({why}); a new sign-in is needed");
                if let Some(mut s) = stored.clone() {
                    s.refresh_token = None;
                    entry.write(&lock, &s)?;
                }
            }
            Err(interactive::RefreshError::Failed(e)) => {
                eprintln!("kube-relay token: refreshing the saved sign-in failed ({e:#}); signing in again");
            }
        }
    }
    if plan.mode.needs_human() && !interactive {
        anyhow::bail!(
            "signing in with --login {} needs you, but this process has no terminal (kubectl runs plugins without one when stdin is not a terminal or interactiveMode is Never).\nRun this once in a terminal, then retry:\n\n  {}\n",
            plan.mode.name(),
            args.terminal_command()
        );
    }
    let fresh = tokio::time::timeout(args.timeout, acquire(&plan, args, &http, &extra_ca))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no token within {} (--timeout)",
                humantime::format_duration(args.timeout)
            )
        })??;
    entry.write(&lock, &fresh)?;
    Ok((&fresh).into())
}

async fn acquire(
    plan: &Plan,
    args: &LoginArgs,
    http: &crate::net::idp::IdpHttp,
    extra_ca: &[CertificateDer<'static>],
) -> anyhow::Result<cache::Stored> {
    match plan.mode {
        LoginMode::Browser => interactive::browser(http, plan, args.timeout, args.no_browser).await,
        LoginMode::Devicecode => interactive::device_code(http, plan, args.timeout).await,
        _ => azure::acquire(plan, args, http, extra_ca).await,
    }
}

/// Deletes this login's cache entry, or all of them.
pub async fn logout(args: &LoginArgs, all: bool) -> anyhow::Result<String> {
    let dir = args.cache_dir()?;
    let cache = cache::Cache::open(&dir)?;
    if all {
        let n = cache.clear()?;
        return Ok(format!(
            "removed {n} cached login(s) from {}",
            dir.display()
        ));
    }
    let plan = Plan::new(args)?;
    let entry = cache.entry(&plan.cache_key());
    let lock = entry.lock(LOCK_SLACK).await?;
    Ok(if entry.remove(&lock)? {
        format!("removed the cached {} login", plan.mode.name())
    } else {
        format!("no cached {} login to remove", plan.mode.name())
    })
}

/// Runs `kube-relay token`.
pub fn main(args: TokenArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kube-relay token: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.logout {
        return match rt.block_on(logout(&args.login, args.all)) {
            Ok(msg) => {
                eprintln!("kube-relay token: {msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kube-relay token: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let info = match exec::ExecInfo::parse(std::env::var("KUBERNETES_EXEC_INFO").ok().as_deref()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("kube-relay token: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let interactive = info
        .interactive
        .unwrap_or_else(|| std::io::stdin().is_terminal());
    match rt.block_on(get_token(&args.login, interactive)) {
        Ok(t) => {
            println!(
                "{}",
                exec::credential(&info.api_version, &t.access_token, t.expires_at)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kube-relay token: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: TokenArgs,
    }

    fn parse(argv: &[&str]) -> LoginArgs {
        Cli::try_parse_from(std::iter::once("token").chain(argv.iter().copied()))
            .unwrap()
            .args
            .login
    }

    #[test]
    fn exec_args_round_trip_without_secrets() {
        let a = parse(&[
            "--login",
            "secret",
            "--tenant-id",
            "t1",
            "--authority-host",
            "https://127.0.0.1:9",
            "--client-id",
            "c1",
            "--scope",
            "api://kube-relay/.default",
            "--client-secret",
            "hunter2",
            "--cache-dir",
            "/tmp/c d",
            "--timeout",
            "30s",
        ]);
        let args = a.to_exec_args();
        assert!(!args.iter().any(|s| s.contains("hunter2")));
        // Nor in Debug output (of the flags, or of the command's whole arguments).
        assert!(!format!("{a:?}").contains("hunter2"), "{a:?}");
        assert!(format!("{a:?}").contains("<redacted>"), "{a:?}");
        let token =
            Cli::try_parse_from(["token", "--login", "secret", "--client-secret", "hunter2"])
                .unwrap()
                .args;
        assert!(!format!("{token:?}").contains("hunter2"), "{token:?}");
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut back = parse(&argv);
        back.client_secret = a.client_secret.clone();
        assert_eq!(back, a);
        assert!(a.terminal_command().contains("'/tmp/c d'"));
    }

    #[test]
    fn from_params_entra_and_oidc() {
        let p = LoginParams {
            kind: "entra".into(),
            issuer: None,
            tenant_id: Some("t".into()),
            authority_host: Some("https://login.microsoftonline.com/".into()),
            client_id: "c".into(),
            scopes: vec!["api://kube-relay/user_impersonation".into()],
            resource: None,
            passthrough_scopes: vec!["6dae42f8-4368-4678-94ff-3960e28e3630/.default".into()],
        };
        let a = LoginArgs::from_params(&p, false);
        assert_eq!(a.login, LoginMode::Browser);
        assert_eq!(a.authority_host, None);
        assert_eq!(a.scopes, p.scopes);
        let a = LoginArgs::from_params(&p, true);
        assert_eq!(a.scopes, p.passthrough_scopes);
        assert_eq!(
            a.to_exec_args(),
            [
                "--login",
                "browser",
                "--tenant-id",
                "t",
                "--client-id",
                "c",
                "--scope",
                "6dae42f8-4368-4678-94ff-3960e28e3630/.default"
            ]
        );
        let o = LoginParams {
            kind: "oidc".into(),
            issuer: Some("https://idp.example".into()),
            resource: Some("https://relay.example".into()),
            ..p
        };
        let a = LoginArgs::from_params(&o, false);
        assert_eq!(a.issuer.as_deref(), Some("https://idp.example"));
        assert_eq!(a.tenant_id, None);
        let plan = Plan::new(&a).unwrap();
        assert_eq!(plan.resource.as_deref(), Some("https://relay.example"));
    }

    #[test]
    fn cache_key_ignores_scope_order_only() {
        let mut a = parse(&[
            "--tenant-id",
            "t",
            "--client-id",
            "c",
            "--scope",
            "a",
            "--scope",
            "b",
        ]);
        let k1 = Plan::new(&a).unwrap().cache_key();
        a.scopes.reverse();
        assert_eq!(Plan::new(&a).unwrap().cache_key(), k1);
        a.login = LoginMode::Devicecode;
        assert_ne!(Plan::new(&a).unwrap().cache_key(), k1);
        a.login = LoginMode::Browser;
        a.client_id = Some("other".into());
        assert_ne!(Plan::new(&a).unwrap().cache_key(), k1);
        assert_eq!(k1.len(), 64);
    }

    #[test]
    fn plan_errors_say_what_is_missing() {
        let e = Plan::new(&parse(&["--client-id", "c", "--scope", "s"])).unwrap_err();
        assert!(e.to_string().contains("--tenant-id"), "{e}");
        let e = Plan::new(&parse(&["--login", "github"])).unwrap_err();
        assert!(e.to_string().contains("--audience"), "{e}");
        let p = Plan::new(&parse(&[
            "--login",
            "msi",
            "--resource",
            "api://kube-relay",
        ]))
        .unwrap();
        assert_eq!(p.scopes, ["api://kube-relay/.default"]);
        assert_eq!(p.resource, None);
    }

    /// A generic OIDC provider on loopback HTTP answering discovery and refresh grants:
    /// `rt-good` is exchanged (and rotated), anything else is `invalid_grant`.
    async fn refresh_idp() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use http_body_util::BodyExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        let forms = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (b, f) = (base.clone(), forms.clone());
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let (b, f) = (b.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: ::http::Request<hyper::body::Incoming>| {
                            let (b, f) = (b.clone(), f.clone());
                            async move {
                                let path = req.uri().path().to_owned();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let form = String::from_utf8_lossy(&body).into_owned();
                                let (status, json) = if path.ends_with("/openid-configuration") {
                                    (
                                        200,
                                        serde_json::json!({"issuer": b, "authorization_endpoint": format!("{b}/authorize"), "token_endpoint": format!("{b}/token")}),
                                    )
                                } else if form.contains("refresh_token=rt-good") {
                                    f.lock().unwrap().push(form);
                                    (
                                        200,
                                        serde_json::json!({"access_token": "at-new", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "rt-rotated"}),
                                    )
                                } else {
                                    f.lock().unwrap().push(form);
                                    (
                                        400,
                                        serde_json::json!({"error": "invalid_grant", "error_description": "refresh token expired"}),
                                    )
                                };
                                let mut r = ::http::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from(json.to_string()),
                                ));
                                *r.status_mut() = ::http::StatusCode::from_u16(status).unwrap();
                                r.headers_mut().insert(
                                    "content-type",
                                    ::http::HeaderValue::from_static("application/json"),
                                );
                                Ok::<_, std::convert::Infallible>(r)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (base, forms)
    }

    async fn seed(entry: &cache::Entry, rt: &str) {
        let lock = entry.lock(Duration::from_secs(1)).await.unwrap();
        let s = cache::Stored {
            access_token: "at-old".into(),
            expires_at: cache::unix_now() + 60,
            refresh_token: Some(rt.to_owned()),
        };
        entry.write(&lock, &s).unwrap();
    }

    async fn read(entry: &cache::Entry) -> cache::Stored {
        let lock = entry.lock(Duration::from_secs(1)).await.unwrap();
        entry.read(&lock).unwrap()
    }

    #[tokio::test]
    async fn expired_token_is_refreshed_and_a_rejected_refresh_token_is_dropped() {
        let (issuer, forms) = refresh_idp().await;
        let tmp = tempfile::tempdir().unwrap();
        let args = LoginArgs {
            issuer: Some(issuer),
            client_id: Some("cli".into()),
            scopes: vec!["kube".into()],
            resource: Some("https://relay.example".into()),
            cache_dir: Some(tmp.path().to_owned()),
            ..LoginArgs::default()
        };
        let entry = cache::Cache::open(tmp.path())
            .unwrap()
            .entry(&Plan::new(&args).unwrap().cache_key());

        // Within two minutes of expiry: refreshed, even without a terminal.
        seed(&entry, "rt-good").await;
        let t = get_token(&args, false).await.unwrap();
        assert_eq!(t.access_token, "at-new");
        let s = read(&entry).await;
        assert_eq!(s.refresh_token.as_deref(), Some("rt-rotated"));
        assert!(s.usable_for(Duration::from_secs(3000)));
        let form = forms.lock().unwrap()[0].clone();
        assert!(form.contains("grant_type=refresh_token"), "{form}");
        assert!(form.contains("offline_access"), "{form}");
        assert!(
            form.contains("resource=https%3A%2F%2Frelay.example"),
            "{form}"
        );
        // Fresh now: served from the cache.
        assert_eq!(
            get_token(&args, false).await.unwrap().access_token,
            "at-new"
        );
        assert_eq!(forms.lock().unwrap().len(), 1);

        // A dead refresh token: dropped, and without a terminal the sign-in is refused at once.
        seed(&entry, "rt-revoked").await;
        let e = get_token(&args, false).await.unwrap_err().to_string();
        assert!(e.contains("no terminal"), "{e}");
        assert!(e.contains("token --login browser --issuer"), "{e}");
        assert_eq!(read(&entry).await.refresh_token, None);
        assert_eq!(forms.lock().unwrap().len(), 2);
    }

    #[test]
    fn jwt_expiry_reads_exp() {
        use base64::Engine as _;
        let b = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let t = format!("{}.{}.sig", b("{}"), b(r#"{"exp":1700000000}"#));
        assert_eq!(jwt_expiry(&t), Some(1_700_000_000));
        assert_eq!(jwt_expiry("opaque"), None);
    }
}
