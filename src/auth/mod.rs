//! Authentication: bearer tokens from the configured OIDC / Entra issuers become a [`Principal`].
//!
//! Order of checks, cheapest first, so junk never costs a signature verification (docs/security.md
//! E1–E4, F5): size → JWT shape and header (`alg` in the issuer's allowlist, `kid` present and
//! short) → the verified-token cache → `iss` names a configured key source → `kid` is in that
//! source's cached keys (one rate-limited, single-flight refresh on a miss) → the key's type
//! matches `alg` → signature and `iss`, `aud`, `exp` (required), `nbf` (required
//! for Entra and for OIDC issuers with `require_nbf`, else checked when present; leeway
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

mod bearer;
mod claims;
mod keys;
pub mod sso;

pub use bearer::{bearer_token, ws_bearer_token, ws_protocols, WS_BEARER_PREFIX};
use claims::*;
use keys::*;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
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
/// Bytes the verified-token cache may hold, as [`Principal::cached_bytes`] counts them. A cap
/// on entries alone let the cache's size follow its callers' tokens: an entry holds the token
/// (2 to 4 KB for Entra) and its groups several times over (up to 200 in an Entra token), so
/// 50,000 entries of 200-group callers came to gigabytes. With this cap about 12,000 callers
/// of 40 groups stay cached at once, and more of smaller tokens; one evicted costs its next
/// request a signature check.
const TOKEN_CACHE_BYTES: u64 = 256 << 20;
/// Entries the cache sizes its table for.
const TOKEN_CACHE_ENTRIES: usize = 50_000;

/// The verified-token cache: entries weighed by [`Principal::cached_bytes`].
type TokenCache = quick_cache::sync::Cache<Arc<str>, Arc<Principal>, EntryWeight>;

fn token_cache(bytes: u64) -> TokenCache {
    quick_cache::sync::Cache::with_weighter(TOKEN_CACHE_ENTRIES, bytes, EntryWeight)
}

#[derive(Clone)]
struct EntryWeight;

impl quick_cache::Weighter<Arc<str>, Arc<Principal>> for EntryWeight {
    fn weight(&self, _token: &Arc<str>, principal: &Arc<Principal>) -> u64 {
        principal.cached_bytes()
    }
}

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
    /// Shared, not copied, with the audit record and the impersonation headers: an Entra
    /// token can carry up to 200 groups.
    pub groups: Arc<[String]>,
    /// The token says its group list is incomplete (Entra overage): group rules cannot be
    /// evaluated and fail closed.
    pub groups_overage: bool,
    /// An Entra app-only token (a service principal, no `scp`): Graph knows its object id as a
    /// service principal, not a user.
    pub app_only: bool,
    /// Entra object id, sent as `Impersonate-Extra-oid` (AKS Azure RBAC needs it).
    pub oid: Option<String>,
    /// The client application (`appid` v1 / `azp` v2), for `apps` rules.
    pub app_id: Option<String>,
    /// `exp`, seconds since the epoch: long-running requests end when it passes (plus grace).
    pub expires_at: u64,
    pub claims: serde_json::Map<String, Value>,
    /// The verified bearer token, for passthrough and on-behalf-of only.
    token: Arc<str>,
    /// What every request of this caller derives from the principal the same way.
    pub memo: Memo,
}

/// Forms of a principal that every one of its requests needs and derives the same way, built by
/// the first request that needs each and shared by the rest: the principal lives in the
/// verified-token cache, so a caller's requests reuse it. With an Entra token of 40 groups,
/// building these per request (the audit record's user with its escaped groups, one header per
/// group) was a sixth of the relay's work per request (docs/perf).
/// A clone starts empty: it may be changed before use.
#[derive(Default)]
pub struct Memo {
    /// The audit record's `user`, serialized once.
    pub audit_user: std::sync::OnceLock<Arc<crate::audit::AuditUser>>,
    /// The `Impersonate-*` headers that name this caller, or why they cannot be sent.
    pub impersonation: std::sync::OnceLock<Result<IdentityHeaders, &'static str>>,
    /// `Authorization: Bearer <token>` for passthrough, or why the token cannot be a header.
    pub bearer: std::sync::OnceLock<Result<http::HeaderValue, &'static str>>,
}

impl Clone for Memo {
    fn clone(&self) -> Self {
        Memo::default()
    }
}

/// Header fields, in the order they are sent.
pub type IdentityHeaders = Box<[(http::HeaderName, http::HeaderValue)]>;

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

    /// Roughly the bytes this principal holds once its memo is filled, for the token cache's
    /// cap: the token twice (itself and the passthrough header), each group four times (the
    /// claims, the list, the audit record's user and an impersonation header) with the
    /// allocation around each copy, and a fixed share for the other claims and fields. Fixed
    /// at creation, as the cache requires (the memo fills later).
    fn cached_bytes(&self) -> u64 {
        const PER_COPY: usize = 48;
        const FIXED: usize = 2048;
        let groups: usize = self.groups.iter().map(|g| g.len() + PER_COPY).sum();
        (2 * self.token.len() + 4 * groups + FIXED) as u64
    }

    /// A caller `issuer/subject` with no groups and a token valid for an hour, for unit tests of
    /// what happens after authentication.
    #[cfg(test)]
    pub(crate) fn for_tests(issuer: &str, subject: &str) -> Self {
        Self {
            issuer: issuer.into(),
            subject: subject.to_owned(),
            user_key: format!("{issuer}/{subject}"),
            username: subject.to_owned(),
            groups: Arc::from([]),
            groups_overage: false,
            app_only: false,
            oid: None,
            app_id: None,
            expires_at: crate::clock::unix_now() + 3600,
            claims: serde_json::Map::new(),
            token: "".into(),
            memo: Memo::default(),
        }
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

/// How a successful authentication was reached, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Cached,
    Verified,
}

/// Validates bearer tokens against the configured issuers.
pub struct Authenticator {
    sources: Vec<Arc<KeySource>>,
    /// Verified tokens by their full text (shared with the principal, not copied): a hit is an
    /// exact match, so the cache's hash (keyed per process) needs no collision resistance, and
    /// a token is never hashed with SHA-256 on the request path.
    cache: TokenCache,
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
            cache: token_cache(TOKEN_CACHE_BYTES),
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
                let keys = o.keys.read().clone();
                let at = *o.fetched_at.lock();
                *src.keys.write() = keys;
                *src.fetched_at.lock() = at;
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
        let p = self.cache.get(token)?;
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
        // Two dots, found with SIMD: a `char` split walked every character of a multi-KB token
        // on each request (callgrind: ~6k instructions for a 3.3 KB Entra token).
        if memchr::memchr_iter(b'.', token.as_bytes()).take(3).count() != 2 {
            return Err(fail(AuthFailure::Malformed, "not a compact JWS"));
        }
        if let Some(p) = self.cache.get(token) {
            if crate::clock::unix_now() < p.expires_at + LEEWAY_SECS {
                return Ok((p, Verified::Cached));
            }
            self.cache.remove(token);
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
        // Entra always sends `nbf`; stock OIDC access tokens (RFC 9068) need not, and are then
        // checked as kube-apiserver checks them: `nbf` validated when present.
        let nbf_required = match &src.issuer.kind {
            IssuerKind::Entra { .. } => true,
            IssuerKind::Oidc { require_nbf, .. } => *require_nbf,
        };
        if nbf_required {
            v.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
        } else {
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
        }
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
        self.cache
            .insert(principal.token.clone(), principal.clone());
        Ok((principal, Verified::Verified))
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    fn principal(n: usize, token_bytes: usize, groups: usize) -> Principal {
        let mut p = Principal::for_tests("entra", &n.to_string());
        p.token = format!("{n:06}{}", "x".repeat(token_bytes)).into();
        p.groups = (0..groups)
            .map(|g| format!("{g:08}-0000-4000-8000-000000000000"))
            .collect();
        p
    }

    #[test]
    fn the_token_cache_is_capped_by_bytes_not_entries() {
        let budget = 1 << 20;
        let cache = token_cache(budget);
        for n in 0..1000 {
            let p = Arc::new(principal(n, 4000, 200));
            cache.insert(p.token.clone(), p);
        }
        assert!(cache.weight() <= budget, "weight {}", cache.weight());
        // About 78 KB each: a cap on entries alone would have kept all 1,000.
        assert!(cache.len() < 20, "{} entries", cache.len());
        // Small tokens still fill it with many.
        let cache = token_cache(budget);
        for n in 0..1000 {
            let p = Arc::new(principal(n, 1000, 0));
            cache.insert(p.token.clone(), p);
        }
        assert!(cache.len() > 200, "{} entries", cache.len());
    }

    #[test]
    fn about_12000_entra_callers_of_40_groups_fit() {
        let fit = TOKEN_CACHE_BYTES / principal(0, 3000, 40).cached_bytes();
        assert!((11_000..13_000).contains(&fit), "{fit}");
    }
}
