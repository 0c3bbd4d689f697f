//! Authentication: bearer tokens from the configured OIDC / Entra issuers become a [`Principal`].
//!
//! Order of checks, cheapest first, so junk never costs a signature verification (docs/security.md
//! E1–E4, F5): size → JWT shape and header (`alg` in the issuer's allowlist, `kid` present and
//! short) → the verified-token cache → `iss` names a configured key source → `kid` is in that
//! source's cached keys (one rate-limited, single-flight refresh on a miss) → the key's type
//! matches `alg` → signature and `iss`, `aud`, `exp`, `nbf` (all required; leeway
//! [`LEEWAY_SECS`]) → issuer rules (Entra tenant, scopes or roles).
//!
//! Header-supplied keys (`jwk`, `jku`, `x5u`) are never used: the `kid` is only a lookup key into
//! keys fetched from the issuer's own discovery document, and an Entra issuer's v1 and v2 tokens
//! are each checked against the keys of their own metadata document.
//!
//! Key freshness (docs/protocols.md §2.3, docs/security.md E8 and scenario 3): a background task
//! refreshes
//! every source on `key_refresh_interval` (retrying with backoff while the IdP is down); an
//! unknown `kid` triggers at most one fetch per `key_refresh_cooldown`; failed fetches keep the
//! last good keys, for at most `max_key_staleness`. No request waits on a refresh when its key is
//! cached. At start-up the relay serves immediately and reports not-ready until every source has
//! keys (`/readyz`); a token arriving first triggers its own (rate-limited) fetch.
//!
//! A [`Principal`] can only be made here, and forwarding needs one, so no request can reach a
//! cluster unauthenticated.

pub mod sso;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::{is_guid, IssuerConfig, IssuerKind};
use crate::metrics::{IssuerResultLabels, Metrics};
use crate::net::{client_tls, pooled_client, TlsDialer, Trust, HTTP1};

/// Clock-skew allowance on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 60;
/// Tokens larger than this are refused before any parsing (Entra tokens with many groups stay
/// well under it).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
const MAX_KID_BYTES: usize = 256;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request with an unknown `kid` waits for the key fetch it triggered.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(2);
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Verified tokens remembered; each entry is a few hundred bytes.
const TOKEN_CACHE_ENTRIES: usize = 50_000;

/// An authenticated caller. Only [`Authenticator::authenticate`] makes one.
#[derive(Clone)]
pub struct Principal {
    /// The configured issuer's name.
    pub issuer: Arc<str>,
    /// The stable identity key: `oid` for Entra, the configured claim for OIDC.
    pub subject: String,
    /// `issuer-name/subject`, computed once: rules, limits and logs all key on it.
    user_key: String,
    /// The name shown upstream: `upn`, else `oid` (Entra); the subject (OIDC).
    pub username: String,
    pub groups: Vec<String>,
    /// The token says its group list is incomplete (Entra overage): group rules cannot be
    /// evaluated and fail closed.
    pub groups_overage: bool,
    /// Entra object id, sent as `Impersonate-Extra-oid` (AKS Azure RBAC needs it).
    pub oid: Option<String>,
    /// The client application (`appid` v1 / `azp` v2), for `apps` rules.
    pub app_id: Option<String>,
    /// `exp`, seconds since the epoch: long-running requests end when it passes (plus grace).
    pub expires_at: u64,
    pub claims: serde_json::Map<String, Value>,
    /// The verified bearer token, for passthrough and on-behalf-of only.
    token: Arc<str>,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("username", &self.username)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl Principal {
    /// `issuer-name/subject`, the form access rules name users by.
    pub fn user_key(&self) -> &str {
        &self.user_key
    }

    /// The caller's own token, to forward unchanged in passthrough mode.
    pub fn bearer_token(&self) -> &str {
        &self.token
    }

    /// A string claim, if present.
    pub fn claim(&self, name: &str) -> Option<&str> {
        claim_str(&self.claims, name)
    }
}

/// Why a token was refused; the label of `relay_authn_total{reason}`. Never sent to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    TooLarge,
    Malformed,
    Algorithm,
    UnknownIssuer,
    UnknownKey,
    StaleKeys,
    Signature,
    Claims,
    Tenant,
    Scope,
}

impl AuthFailure {
    pub fn as_label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey => "unknown_key",
            Self::StaleKeys => "stale_keys",
            Self::Signature => "signature",
            Self::Claims => "claims",
            Self::Tenant => "tenant",
            Self::Scope => "scope",
        }
    }
}

#[derive(Debug)]
pub struct AuthError {
    pub failure: AuthFailure,
    pub detail: String,
}

fn fail(failure: AuthFailure, detail: impl Into<String>) -> AuthError {
    AuthError {
        failure,
        detail: detail.into(),
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.failure.as_label(), self.detail)
    }
}

// === where the token is carried ===

/// Prefix of the WebSocket subprotocol entry that carries a bearer token (browsers cannot set
/// `Authorization` on a WebSocket).
pub const WS_BEARER_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// The caller's bearer token: `Authorization: Bearer`, else the WebSocket subprotocol entry
/// browsers use. No token at all is the empty string, which verification refuses as `missing`.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<String, AuthError> {
    match headers.get(http::header::AUTHORIZATION) {
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| fail(AuthFailure::Malformed, "Authorization is not ASCII"))?;
            let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(fail(
                    AuthFailure::Malformed,
                    "Authorization is not a bearer token",
                ));
            }
            Ok(rest.trim().to_owned())
        }
        None => Ok(ws_bearer_token(headers).unwrap_or_default()),
    }
}

/// The bearer token carried in `Sec-WebSocket-Protocol`, if any.
pub fn ws_bearer_token(headers: &http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let entry =
        ws_protocols(headers).find_map(|p| p.strip_prefix(WS_BEARER_PREFIX).map(str::to_owned))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(entry.trim_end_matches('='))
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Every entry of every `Sec-WebSocket-Protocol` header, trimmed.
pub fn ws_protocols(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// How a successful authentication was reached, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Cached,
    Verified,
}

struct CachedKey {
    key: DecodingKey,
    alg: Algorithm,
}

type KeyMap = HashMap<String, Arc<CachedKey>>;

/// One metadata document and its keys: an OIDC issuer has one, an Entra tenant two (v1, v2).
struct KeySource {
    issuer: Arc<IssuerConfig>,
    name: Arc<str>,
    /// The exact `iss` tokens verified with these keys carry.
    iss: String,
    discovery_url: Url,
    keys: RwLock<Arc<KeyMap>>,
    /// When keys were last fetched successfully.
    fetched_at: Mutex<Option<Instant>>,
    /// Serialises fetches (single flight) and remembers when the last unknown-kid fetch began.
    refresh: AsyncMutex<Option<Instant>>,
    client: crate::net::PooledClient,
}

/// Validates bearer tokens against the configured issuers.
pub struct Authenticator {
    sources: Vec<Arc<KeySource>>,
    cache: quick_cache::sync::Cache<[u8; 32], Arc<Principal>>,
    metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct IssPeek {
    iss: Option<String>,
}

impl Authenticator {
    pub fn new(issuers: &[Arc<IssuerConfig>], metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let mut sources = Vec::new();
        for cfg in issuers {
            // Public issuers (Entra, GitHub) are trusted through the Mozilla roots compiled in;
            // an issuer on a private CA (tests, on-prem IdPs) trusts exactly its `ca_file`.
            let tls = client_tls(Trust::ca_or_public(&cfg.ca), None, HTTP1)?;
            let client = pooled_client(TlsDialer::new(tls, None, None, FETCH_TIMEOUT));
            let docs: Vec<(String, Url)> = match &cfg.kind {
                IssuerKind::Oidc {
                    issuer, issuer_str, ..
                } => {
                    vec![(
                        issuer_str.clone(),
                        Url::parse(&crate::net::oidc_discovery_url(issuer.as_str()))?,
                    )]
                }
                IssuerKind::Entra {
                    tenant_id,
                    authority_host,
                    ..
                } => {
                    let mut docs = Vec::new();
                    for (iss, url) in crate::net::entra_metadata(authority_host.as_str(), tenant_id)
                    {
                        docs.push((iss, Url::parse(&url)?));
                    }
                    docs
                }
            };
            for (iss, discovery_url) in docs {
                sources.push(Arc::new(KeySource {
                    issuer: cfg.clone(),
                    name: Arc::from(cfg.name.as_str()),
                    iss,
                    discovery_url,
                    keys: RwLock::new(Arc::new(HashMap::new())),
                    fetched_at: Mutex::new(None),
                    refresh: AsyncMutex::new(None),
                    client: client.clone(),
                }));
            }
        }
        Ok(Self {
            sources,
            cache: quick_cache::sync::Cache::new(TOKEN_CACHE_ENTRIES),
            metrics,
        })
    }

    /// Keeps every source's keys fresh until `shutdown`: fetch now, then every
    /// `key_refresh_interval`; while the IdP fails, retry with backoff (1 s doubling, capped).
    pub fn spawn_refresh(self: &Arc<Self>, shutdown: CancellationToken) {
        for src in &self.sources {
            let src = src.clone();
            let metrics = self.metrics.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut backoff = Duration::from_secs(1);
                loop {
                    let wait = match src.fetch(&metrics).await {
                        Ok(()) => {
                            backoff = Duration::from_secs(1);
                            src.issuer.keys.refresh_interval
                        }
                        Err(e) => {
                            tracing::warn!(issuer = %src.name, iss = %src.iss, error = %e, retry_in = ?backoff, "cannot load the issuer's signing keys");
                            let w = backoff;
                            backoff = (backoff * 2)
                                .min(Duration::from_secs(60))
                                .min(src.issuer.keys.refresh_interval);
                            w
                        }
                    };
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            });
        }
    }

    /// Takes over the keys `old` holds for sources that are configured identically, so a
    /// reload during an IdP outage keeps validating tokens.
    pub fn adopt_keys(&self, old: &Authenticator) {
        for src in &self.sources {
            if let Some(o) = old
                .sources
                .iter()
                .find(|o| o.iss == src.iss && o.discovery_url == src.discovery_url)
            {
                let keys = o.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
                let at = *o.fetched_at.lock().unwrap_or_else(|e| e.into_inner());
                *src.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
                *src.fetched_at.lock().unwrap_or_else(|e| e.into_inner()) = at;
            }
        }
    }

    /// Fetches every source's keys once, now (tools and benchmarks; the relay itself uses
    /// [`Authenticator::spawn_refresh`]). Returns per source `iss` and the key count or error.
    pub async fn load_keys(&self) -> Vec<(String, Result<usize, String>)> {
        let mut out = Vec::new();
        for src in &self.sources {
            let r = src
                .fetch(&self.metrics)
                .await
                .map(|()| src.usable_keys().len());
            out.push((src.iss.clone(), r));
        }
        out
    }

    /// Per key source: issuer name, `iss`, number of usable keys (0 when none or stale).
    pub fn key_status(&self) -> Vec<(String, String, usize)> {
        self.sources
            .iter()
            .map(|s| (s.name.to_string(), s.iss.clone(), s.usable_keys().len()))
            .collect()
    }

    /// A previously verified, unexpired token, without any signature work.
    pub fn cached(&self, token: &str) -> Option<Arc<Principal>> {
        let p = self.cache.get(&token_hash(token))?;
        (crate::clock::unix_now() < p.expires_at + LEEWAY_SECS).then_some(p)
    }

    /// Validates a bearer token.
    pub async fn authenticate(&self, token: &str) -> Result<(Arc<Principal>, Verified), AuthError> {
        if token.is_empty() {
            return Err(fail(AuthFailure::Missing, "empty bearer token"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(fail(
                AuthFailure::TooLarge,
                format!("token of {} bytes", token.len()),
            ));
        }
        if token.split('.').count() != 3 {
            return Err(fail(AuthFailure::Malformed, "not a compact JWS"));
        }
        let hash = token_hash(token);
        if let Some(p) = self.cache.get(&hash) {
            if crate::clock::unix_now() < p.expires_at + LEEWAY_SECS {
                return Ok((p, Verified::Cached));
            }
            self.cache.remove(&hash);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| fail(AuthFailure::Malformed, format!("header: {e}")))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(fail(
                AuthFailure::Algorithm,
                format!("alg {:?} not allowed", header.alg),
            ));
        }
        let kid = header
            .kid
            .as_deref()
            .filter(|k| !k.is_empty() && k.len() <= MAX_KID_BYTES)
            .ok_or_else(|| fail(AuthFailure::Malformed, "missing or oversized kid"))?;
        let peek: IssPeek = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| fail(AuthFailure::Malformed, format!("payload: {e}")))?;
        let iss = peek
            .iss
            .ok_or_else(|| fail(AuthFailure::Claims, "no iss claim"))?;
        let src = self.sources.iter().find(|s| s.iss == iss).ok_or_else(|| {
            fail(
                AuthFailure::UnknownIssuer,
                format!("iss {iss:?} is not configured"),
            )
        })?;
        if !src.issuer.algorithms.contains(&header.alg) {
            return Err(fail(
                AuthFailure::Algorithm,
                format!("alg {:?} not allowed for issuer {}", header.alg, src.name),
            ));
        }
        let key = match src.usable_keys().get(kid).cloned() {
            Some(k) => k,
            None => {
                // The fetch runs in its own task: a request waits at most
                // UNKNOWN_KID_WAIT for it, however long a struggling IdP takes; the fetch goes
                // on and serves the requests after it.
                let (s, m) = (src.clone(), self.metrics.clone());
                let fetch = tokio::spawn(async move { s.refresh_for_unknown_kid(&m).await });
                let _ = tokio::time::timeout(UNKNOWN_KID_WAIT, fetch).await;
                let keys = src.usable_keys();
                if keys.is_empty() && src.has_stale_keys() {
                    return Err(fail(
                        AuthFailure::StaleKeys,
                        format!("keys of {} are older than max_key_staleness", src.name),
                    ));
                }
                keys.get(kid).cloned().ok_or_else(|| {
                    fail(
                        AuthFailure::UnknownKey,
                        format!("kid {kid:?} not in the keys of {}", src.name),
                    )
                })?
            }
        };
        if key.alg != header.alg {
            return Err(fail(
                AuthFailure::Algorithm,
                "alg does not match the key type",
            ));
        }
        let mut v = Validation::new(key.alg);
        v.algorithms = vec![key.alg];
        v.set_issuer(&[iss.as_str()]);
        v.set_audience(&src.issuer.audiences);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
        v.validate_exp = true;
        v.validate_nbf = true;
        v.leeway = LEEWAY_SECS;
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &v)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let failure = match e.kind() {
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidRsaKey(_) => AuthFailure::Signature,
                    _ => AuthFailure::Claims,
                };
                fail(failure, e.to_string())
            })?;
        let principal = Arc::new(principal_from(src, &iss, data.claims, token)?);
        self.cache.insert(hash, principal.clone());
        Ok((principal, Verified::Verified))
    }
}

fn token_hash(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn claim_str<'a>(claims: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a str> {
    claims
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn claim_list(claims: &serde_json::Map<String, Value>, name: &str) -> Vec<String> {
    match claims.get(name) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Entra replaces `groups` by a pointer to Graph above 200 groups (or sets `hasgroups`); the
/// pointer's URL is never fetched (docs/security.md E7).
fn has_groups_overage(claims: &serde_json::Map<String, Value>) -> bool {
    claims
        .get("_claim_names")
        .and_then(|n| n.get("groups"))
        .is_some()
        || claims.get("hasgroups") == Some(&Value::Bool(true))
}

fn principal_from(
    src: &KeySource,
    iss: &str,
    claims: serde_json::Map<String, Value>,
    token: &str,
) -> Result<Principal, AuthError> {
    let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    match &src.issuer.kind {
        IssuerKind::Oidc {
            username_claim,
            groups_claim,
            ..
        } => {
            let subject = claim_str(&claims, username_claim)
                .ok_or_else(|| fail(AuthFailure::Claims, format!("no {username_claim} claim")))?
                .to_owned();
            let groups = claim_list(&claims, groups_claim);
            let app_id = claim_str(&claims, "azp")
                .or_else(|| claim_str(&claims, "client_id"))
                .map(str::to_owned);
            Ok(Principal {
                issuer: src.name.clone(),
                user_key: format!("{}/{subject}", src.name),
                username: subject.clone(),
                subject,
                groups,
                groups_overage: false,
                oid: None,
                app_id,
                expires_at,
                claims,
                token: Arc::from(token),
            })
        }
        IssuerKind::Entra {
            tenant_id,
            required_scopes,
            required_roles,
            ..
        } => {
            // `tid` must be a GUID naming the configured tenant, the same tenant as in `iss`
            // (which matched this tenant's v1 or v2 form exactly). Entra signing keys are shared
            // across tenants, so the signature alone proves nothing about the tenant.
            let tid = claim_str(&claims, "tid").unwrap_or_default();
            if !is_guid(tid)
                || !tid.eq_ignore_ascii_case(tenant_id)
                || !iss
                    .to_ascii_lowercase()
                    .contains(&tenant_id.to_ascii_lowercase())
            {
                return Err(fail(
                    AuthFailure::Tenant,
                    format!("tid {tid:?} is not the configured tenant"),
                ));
            }
            let oid = claim_str(&claims, "oid")
                .filter(|o| is_guid(o))
                .ok_or_else(|| fail(AuthFailure::Claims, "no oid claim"))?
                .to_owned();
            // Delegated tokens carry `scp`; app-only tokens carry `roles` and no `scp`
            // (`idtyp: app` when the optional claim is on).
            let app_only =
                claim_str(&claims, "idtyp") == Some("app") || claim_str(&claims, "scp").is_none();
            if app_only {
                let roles = claim_list(&claims, "roles");
                if !required_roles.is_empty() && !roles.iter().any(|r| required_roles.contains(r)) {
                    return Err(fail(
                        AuthFailure::Scope,
                        "app-only token without a required role",
                    ));
                }
            } else {
                let scp = claim_str(&claims, "scp").unwrap_or_default();
                if !required_scopes.is_empty()
                    && !scp
                        .split(' ')
                        .any(|s| required_scopes.iter().any(|r| r == s))
                {
                    return Err(fail(AuthFailure::Scope, "no required scope in scp"));
                }
            }
            let username = claim_str(&claims, "upn").unwrap_or(&oid).to_owned();
            let groups = claim_list(&claims, "groups");
            let app_id = claim_str(&claims, "appid")
                .or_else(|| claim_str(&claims, "azp"))
                .map(str::to_owned);
            Ok(Principal {
                issuer: src.name.clone(),
                user_key: format!("{}/{oid}", src.name),
                subject: oid.clone(),
                username,
                groups_overage: has_groups_overage(&claims),
                groups,
                oid: Some(oid),
                app_id,
                expires_at,
                claims,
                token: Arc::from(token),
            })
        }
    }
}

impl KeySource {
    /// The keys usable now: empty when none were ever loaded or they are too stale.
    fn usable_keys(&self) -> Arc<KeyMap> {
        let fresh = self
            .fetched_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() <= self.issuer.keys.max_staleness);
        if fresh {
            self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
        } else {
            Arc::new(HashMap::new())
        }
    }

    fn has_stale_keys(&self) -> bool {
        !self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// One fetch for an unknown `kid`, unless another ran within the cooldown. Concurrent
    /// callers wait for the one in flight instead of fetching again.
    async fn refresh_for_unknown_kid(&self, metrics: &Metrics) {
        let mut last = self.refresh.lock().await;
        if let Some(at) = *last {
            if at.elapsed() < self.issuer.keys.unknown_kid_cooldown {
                return;
            }
        }
        *last = Some(Instant::now());
        if let Err(e) = self.fetch_locked(metrics).await {
            tracing::warn!(issuer = %self.name, error = %e, "key refresh for an unknown kid failed");
        }
    }

    /// A scheduled fetch (background task), serialised with unknown-kid fetches.
    async fn fetch(&self, metrics: &Metrics) -> Result<(), String> {
        let _guard = self.refresh.lock().await;
        self.fetch_locked(metrics).await
    }

    async fn fetch_locked(&self, metrics: &Metrics) -> Result<(), String> {
        let r = self.fetch_keys().await;
        metrics
            .jwks_refresh
            .get_or_create(&IssuerResultLabels {
                issuer: self.name.to_string(),
                result: if r.is_ok() { "success" } else { "failure" },
            })
            .inc();
        let map = r?;
        tracing::info!(issuer = %self.name, iss = %self.iss, keys = map.len(), "loaded signing keys");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        *self.fetched_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(())
    }

    /// Discovery, then JWKS. A document naming another issuer is refused.
    async fn fetch_keys(&self) -> Result<KeyMap, String> {
        let discovery = self.fetch_json(&self.discovery_url).await?;
        let issuer = discovery
            .get("issuer")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if issuer != self.iss {
            return Err(format!(
                "discovery names issuer {issuer:?}, expected {:?}",
                self.iss
            ));
        }
        let jwks_uri = discovery
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or("discovery document has no jwks_uri")?;
        let jwks_url = Url::parse(jwks_uri).map_err(|e| format!("jwks_uri: {e}"))?;
        if jwks_url.scheme() != "https" {
            return Err("jwks_uri must be https".into());
        }
        let jwks: JwkSet = serde_json::from_value(self.fetch_json(&jwks_url).await?)
            .map_err(|e| format!("JWKS: {e}"))?;
        let mut map = KeyMap::new();
        for jwk in &jwks.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => continue,
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                map.insert(kid, Arc::new(CachedKey { key, alg }));
            }
        }
        if map.is_empty() {
            return Err("JWKS holds no usable RS256/ES256 key".into());
        }
        Ok(map)
    }

    async fn fetch_json(&self, url: &Url) -> Result<Value, String> {
        crate::net::get_json(
            &self.client,
            url.as_str(),
            MAX_DOCUMENT_BYTES,
            FETCH_TIMEOUT,
        )
        .await
    }
}
