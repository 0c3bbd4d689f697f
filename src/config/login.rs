//! `login`: how people and CI get tokens for this relay, and the browser portal.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLogin {
    issuer: String,
    client_id: String,
    scopes: Option<Vec<String>>,
    resource: Option<String>,
    passthrough_scopes: Option<Vec<String>>,
    portal: Option<FilePortal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePortal {
    client_id: String,
    client_secret_file: String,
    cookie_key_file: String,
    session_lifetime: Option<String>,
    sign_out_at_provider: Option<bool>,
    terminal: Option<bool>,
    terminal_idle: Option<String>,
}

/// The `login` section: which issuer people sign in with and as which client.
#[derive(Debug)]
pub struct LoginConfig {
    /// One of `identity.issuers`: tokens it issues are what the relay validates.
    pub issuer: Arc<IssuerConfig>,
    /// Public client (no secret) for `kube-relay token`'s browser and device-code flows.
    pub client_id: String,
    /// Scopes asked for so the access token is for this relay (e.g.
    /// `api://kube-relay/user_impersonation`). `openid` is not implied.
    pub scopes: Vec<String>,
    /// RFC 8707 resource indicator, for generic OIDC providers that pick the token audience by it.
    pub resource: Option<String>,
    /// Scopes for clusters in `passthrough` mode, whose token goes upstream unchanged and so must
    /// carry the cluster's own audience. Entra default: the AKS server app's `.default` scope.
    pub passthrough_scopes: Vec<String>,
    pub portal: Option<PortalConfig>,
}

impl LoginConfig {
    /// The `issuer` the OpenID configuration at [`Self::discovery_url`] must name: the configured
    /// OIDC issuer, or Entra's v2 issuer for the tenant.
    pub fn expected_issuer(&self) -> String {
        match &self.issuer.kind {
            IssuerKind::Oidc { issuer_str, .. } => issuer_str.clone(),
            IssuerKind::Entra {
                tenant_id,
                authority_host,
                ..
            } => format!(
                "{}/{tenant_id}/v2.0",
                authority_host.as_str().trim_end_matches('/')
            ),
        }
    }

    /// Where the issuer's OpenID configuration (authorization, token and device endpoints) is.
    pub fn discovery_url(&self) -> String {
        match &self.issuer.kind {
            IssuerKind::Oidc { issuer_str, .. } => format!(
                "{}/.well-known/openid-configuration",
                issuer_str.trim_end_matches('/')
            ),
            IssuerKind::Entra {
                tenant_id,
                authority_host,
                ..
            } => format!(
                "{}/{tenant_id}/v2.0/.well-known/openid-configuration",
                authority_host.as_str().trim_end_matches('/')
            ),
        }
    }
}

/// The browser portal's confidential client and session cookie settings.
#[derive(Debug)]
pub struct PortalConfig {
    pub client_id: String,
    pub client_secret: SecretString,
    /// Seals the session cookie; every replica reads the same file, so any replica can open a
    /// cookie another one sealed.
    pub cookie_key: CookieKey,
    pub session_lifetime: Duration,
    /// Sign-out also ends the browser's session at the identity provider (OpenID Connect
    /// RP-initiated logout), returning to `<public_url>/-/signed-out`, which must be registered
    /// with the provider. Off by default: an unregistered return address is an error page at
    /// some providers.
    pub sign_out_at_provider: bool,
    /// The web terminal and live logs (`/-/terminal`): off unless asked for.
    pub terminal: bool,
    /// A terminal with no bytes either way for this long is closed (browsers left open).
    pub terminal_idle: Duration,
}

/// 32 bytes derived from `cookie_key_file`. Debug never prints them.
#[derive(Clone)]
pub struct CookieKey(pub [u8; 32]);

impl fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The optional `login` section.
pub(super) fn parse_login(
    root: &Mapping,
    base: &Path,
    issuers: &[Arc<IssuerConfig>],
    errs: &mut Errors,
) -> Option<LoginConfig> {
    let l = optional::<FileLogin>(root, "login", errs).flatten()?;
    let issuer = issuers.iter().find(|i| i.name == l.issuer).cloned();
    if issuer.is_none() && !issuers.is_empty() {
        errs.add(
            "login.issuer",
            format!(
                "no issuer named {:?} in identity.issuers (have: {})",
                l.issuer,
                issuers
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if l.client_id.trim().is_empty() {
        errs.add("login.client_id", "must not be empty");
    }
    let scopes = l.scopes.unwrap_or_default();
    if scopes
        .iter()
        .any(|s| s.trim().is_empty() || s.contains(' '))
    {
        errs.add("login.scopes", "each scope must be one non-empty word");
    }
    if scopes.is_empty() && l.resource.is_none() {
        errs.add(
            "login",
            "set `scopes` (e.g. api://kube-relay/user_impersonation) or `resource`, so tokens are issued for this relay",
        );
    }
    let is_entra = matches!(
        issuer.as_deref().map(|i| &i.kind),
        Some(IssuerKind::Entra { .. })
    );
    let passthrough_scopes = l.passthrough_scopes.unwrap_or_else(|| {
        if is_entra {
            vec![format!("{AKS_SERVER_APP}/.default")]
        } else {
            scopes.clone()
        }
    });
    let portal = l.portal.and_then(|p| {
        if p.client_id.trim().is_empty() {
            errs.add("login.portal.client_id", "must not be empty");
        }
        let client_secret = read_secret(
            base,
            &p.client_secret_file,
            "login.portal.client_secret_file".into(),
            errs,
        );
        let cookie_key = read_cookie_key(base, &p.cookie_key_file, errs);
        let session_lifetime = match &p.session_lifetime {
            None => Duration::from_secs(3600),
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if d >= Duration::from_secs(60) && d <= Duration::from_secs(24 * 3600) => d,
                Ok(_) => {
                    errs.add(
                        "login.portal.session_lifetime",
                        "must be between 1m and 24h (sessions are meant to be short)",
                    );
                    return None;
                }
                Err(e) => {
                    errs.add(
                        "login.portal.session_lifetime",
                        format!("not a duration ({e}); use e.g. 1h or 30m"),
                    );
                    return None;
                }
            },
        };
        let terminal_idle = match &p.terminal_idle {
            None => Duration::from_secs(15 * 60),
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(8 * 3600) => d,
                Ok(_) => {
                    errs.add("login.portal.terminal_idle", "must be between 1s and 8h");
                    return None;
                }
                Err(e) => {
                    errs.add(
                        "login.portal.terminal_idle",
                        format!("not a duration ({e}); use e.g. 15m"),
                    );
                    return None;
                }
            },
        };
        if p.terminal_idle.is_some() && p.terminal != Some(true) {
            errs.add(
                "login.portal.terminal_idle",
                "only used with terminal: true",
            );
        }
        Some(PortalConfig {
            client_id: p.client_id,
            client_secret: client_secret?,
            cookie_key: cookie_key?,
            session_lifetime,
            sign_out_at_provider: p.sign_out_at_provider.unwrap_or(false),
            terminal: p.terminal.unwrap_or(false),
            terminal_idle,
        })
    });
    Some(LoginConfig {
        issuer: issuer?,
        client_id: l.client_id,
        scopes,
        resource: l.resource,
        passthrough_scopes,
        portal,
    })
}

/// The cookie key file holds at least 32 bytes of secret (any encoding: it is hashed); SHA-256
/// of its trimmed contents is the sealing key, so a hex or base64 file both work.
pub(super) fn read_cookie_key(base: &Path, file: &str, errs: &mut Errors) -> Option<CookieKey> {
    let p = base.join(file);
    let key_path = "login.portal.cookie_key_file";
    match std::fs::read(&p) {
        Ok(b) => {
            let trimmed = b.trim_ascii();
            if trimmed.len() < 32 {
                errs.add(
                    key_path,
                    format!(
                        "{} holds {} bytes; use at least 32 random bytes (e.g. `openssl rand -base64 48 > {}`)",
                        p.display(),
                        trimmed.len(),
                        p.display()
                    ),
                );
                return None;
            }
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, trimmed);
            let mut k = [0u8; 32];
            k.copy_from_slice(d.as_ref());
            Some(CookieKey(k))
        }
        Err(e) => {
            errs.add(key_path, format!("cannot read {}: {e}", p.display()));
            None
        }
    }
}
