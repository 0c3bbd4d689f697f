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

mod azure;
mod cache;
mod exec;
mod interactive;

pub use crate::wire::login::{LoginArgs, LoginMode, LoginParams, DEFAULT_AUTHORITY_HOST};

/// A cached token is used until this long before it expires.
const REUSE_MARGIN: Duration = Duration::from_secs(120);
/// Waiting for another process's sign-in may take its whole timeout plus this.
const LOCK_SLACK: Duration = Duration::from_secs(30);
/// Entra's audience for federated credentials (GitHub / Azure DevOps / Kubernetes tokens).
const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

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
    /// The `claims` request parameter for a step-up (`--auth-context`), JSON.
    pub claims: Option<String>,
}

fn env_first(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

impl Plan {
    pub(crate) fn new(a: &LoginArgs) -> anyhow::Result<Self> {
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
        let claims = match &a.auth_context {
            None => None,
            Some(ctx) => {
                anyhow::ensure!(
                    mode.needs_human(),
                    "--auth-context asks for a step-up sign-in by a person: it works with --login browser or devicecode, not {}",
                    mode.name()
                );
                anyhow::ensure!(
                    !ctx.is_empty()
                        && ctx.len() <= 64
                        && ctx
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric()
                                || matches!(b, b'-' | b'_' | b'.' | b':')),
                    "--auth-context {ctx:?}: expected an authentication context id such as c1"
                );
                Some(crate::wire::login::step_up_claims(ctx))
            }
        };
        Ok(Self {
            mode,
            authority,
            client_id,
            scopes,
            resource,
            claims,
        })
    }

    /// SHA-256 of what makes two logins different (hex): authority, client, sorted scopes,
    /// resource and mode.
    pub(crate) fn cache_key(&self) -> String {
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
            self.claims,
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
    fn auth_context_needs_a_person_and_a_plain_id() {
        let mut a = parse(&[
            "--tenant-id",
            "t",
            "--client-id",
            "c",
            "--scope",
            "a",
            "--auth-context",
            "c1",
        ]);
        assert!(Plan::new(&a).is_ok());
        let args = a.to_exec_args();
        assert!(
            args.ends_with(&["--auth-context".into(), "c1".into()]),
            "{args:?}"
        );
        a.login = LoginMode::Secret;
        let e = Plan::new(&a).unwrap_err().to_string();
        assert!(e.contains("--login browser or devicecode"), "{e}");
        a.login = LoginMode::Browser;
        a.auth_context = Some("c1\" evil".into());
        let e = Plan::new(&a).unwrap_err().to_string();
        assert!(e.contains("authentication context id"), "{e}");
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
        // A step-up token is cached apart from the plain one.
        a.auth_context = Some("c1".into());
        let step_up = Plan::new(&a).unwrap();
        assert_ne!(step_up.cache_key(), k1);
        assert_eq!(
            step_up.claims.as_deref(),
            Some(r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#)
        );
        a.auth_context = None;
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
    async fn refresh_idp() -> (String, std::sync::Arc<parking_lot::Mutex<Vec<String>>>) {
        use http_body_util::BodyExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        let forms = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
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
                                    f.lock().push(form);
                                    (
                                        200,
                                        serde_json::json!({"access_token": "at-new", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "rt-rotated"}),
                                    )
                                } else {
                                    f.lock().push(form);
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
        let form = forms.lock()[0].clone();
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
        assert_eq!(forms.lock().len(), 1);

        // A dead refresh token: dropped, and without a terminal the sign-in is refused at once.
        seed(&entry, "rt-revoked").await;
        let e = get_token(&args, false).await.unwrap_err().to_string();
        assert!(e.contains("no terminal"), "{e}");
        assert!(e.contains("token --login browser --issuer"), "{e}");
        assert_eq!(read(&entry).await.refresh_token, None);
        assert_eq!(forms.lock().len(), 2);
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
