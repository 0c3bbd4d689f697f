//! Upstream credentials: what the relay sends as `Authorization` to one cluster
//! (docs/architecture.md "Identity and upstream credentials").
//!
//! One [`UpstreamCredentials`] per cluster, built from its `upstream_auth`:
//! - `passthrough`: the caller's verified token, unchanged.
//! - `impersonate` + `token_file`: the file's token, re-read when the file changes (projected
//!   service-account tokens rotate); the file is stat'ed at most every [`FILE_CHECK_INTERVAL`].
//! - `impersonate` + client certificate: no header; the TLS layer presents the certificate.
//! - `impersonate` + `azure`: a token for the AKS audience from azure_identity (managed identity,
//!   workload identity, client secret), through our own hyper + rustls transport.
//! - `on_behalf_of`: Entra's OBO grant, the relay as confidential client; the exchanged token is
//!   cached per user (issuer, tid, oid, scope).
//!
//! Invariants:
//! - A request never waits on a token fetch while a valid token is cached: a token close to
//!   expiry is refreshed in the background (`TokenCache`) and the cached one is used meanwhile.
//! - Concurrent requests for the same key share one fetch (single flight), and every fetch is
//!   bounded by [`FETCH_TIMEOUT`].
//! - Tokens, secrets and assertions never appear in Debug output, errors or logs; header values
//!   carrying them are marked sensitive.
//! - Nothing from a token picks a URL: the token endpoint comes from configuration only; the
//!   caller's `tid` only fills the tenant path segment after it has been checked to be a GUID
//!   (and the configured tenant, when one is configured).

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use azure_core::credentials::TokenCredential;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::time::Instant;

use crate::auth::Principal;
use crate::config::{
    AzureCredentialConfig, AzureCredentialKind, ClusterConfig, EntraEndpoint, OboClientAuth,
    OboConfig, RelayCredential, SecretString, UpstreamAuth,
};
use crate::error::ProxyError;
use crate::net::azure::HyperTransport;
use crate::net::PooledClient;

/// How often a token file's modification time is checked.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Upper bound on one token fetch (Entra, IMDS), so a hanging authority fails requests with a
/// 503 instead of holding them.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A cached token is not sent when it expires within this margin (clock skew, transit).
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// A background refresh starts this long before expiry (or at half the lifetime if shorter).
const REFRESH_LEAD: Duration = Duration::from_secs(300);
/// Bound on cached OBO tokens (one per user and scope).
const MAX_CACHED_USERS: usize = 10_000;
/// Bound on a token endpoint's response body.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The audience Entra expects for federated assertions.
const TOKEN_EXCHANGE_SCOPE: &str = "api://AzureADTokenExchange/.default";

// === errors ===

/// Why an upstream credential could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Entra AADSTS65001: nobody consented to the relay app calling the AKS server app.
    #[error("consent missing: {0}")]
    ConsentRequired(String),
    /// Entra `interaction_required` or `invalid_grant` (MFA, expired or revoked sign-in).
    #[error("the user must sign in again: {0}")]
    InteractionRequired(String),
    /// The caller's token cannot be exchanged at all (no `tid`/`oid`, a foreign tenant).
    #[error("token not usable for this cluster: {0}")]
    NotExchangeable(String),
    /// Entra or the identity endpoint failed, timed out or refused the relay's own credential.
    #[error("credential source unavailable: {0}")]
    Unavailable(String),
    /// A header value could not be built (a token with characters not allowed in headers).
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl CredentialError {
    /// The request-path error, with a message that tells the user what to do.
    pub fn into_proxy_error(self, cluster: &str) -> ProxyError {
        match self {
            Self::ConsentRequired(detail) => {
                tracing::warn!(cluster, %detail, "OBO: consent missing");
                ProxyError::Forbidden(format!(
                    "cluster {cluster}: Entra ID has no consent for kube-relay to act for you on the AKS server app (AADSTS65001); an administrator must grant admin consent to the kube-relay app for the Azure Kubernetes Service AAD Server API (6dae42f8-4368-4678-94ff-3960e28e3630)"
                ))
            }
            Self::InteractionRequired(detail) => ProxyError::SignInAgain {
                hint: format!(
                    "cluster {cluster}: Entra ID needs you to sign in again (MFA, expired or revoked session); run kubelogin remove-tokens (or sign in again) and retry"
                ),
                detail,
            },
            Self::NotExchangeable(detail) => ProxyError::Forbidden(format!(
                "cluster {cluster}: your token cannot be exchanged for this cluster ({detail})"
            )),
            Self::Unavailable(detail) => ProxyError::CredentialUnavailable {
                cluster: cluster.to_owned(),
                detail,
            },
            Self::Invalid(detail) => ProxyError::Internal(format!(
                "cluster {cluster}: upstream credential: {detail}"
            )),
        }
    }
}

// === UpstreamCredentials ===

/// How one cluster authenticates upstream, built from its `upstream_auth`.
pub struct UpstreamCredentials {
    mode: Mode,
}

enum Mode {
    Passthrough,
    ClientCert,
    TokenFile(Arc<TokenFile>),
    Azure(Arc<AzureSource>),
    Obo(Arc<Obo>),
}

impl fmt::Debug for UpstreamCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match &self.mode {
            Mode::Passthrough => "passthrough",
            Mode::ClientCert => "impersonate/client_certificate",
            Mode::TokenFile(_) => "impersonate/token_file",
            Mode::Azure(_) => "impersonate/azure",
            Mode::Obo(_) => "on_behalf_of",
        };
        f.debug_struct("UpstreamCredentials")
            .field("mode", &mode)
            .finish_non_exhaustive()
    }
}

pub use crate::metrics::CredentialStats;

impl UpstreamCredentials {
    pub fn new(cluster: &ClusterConfig) -> anyhow::Result<Self> {
        let name = cluster.name.to_string();
        let mode = match &cluster.upstream_auth {
            UpstreamAuth::Passthrough => Mode::Passthrough,
            UpstreamAuth::Impersonate(RelayCredential::ClientCert { .. }) => Mode::ClientCert,
            UpstreamAuth::Impersonate(RelayCredential::TokenFile { path, token }) => {
                Mode::TokenFile(Arc::new(TokenFile::new(path.clone(), token.clone())))
            }
            UpstreamAuth::Impersonate(RelayCredential::Azure(cfg)) => {
                Mode::Azure(Arc::new(AzureSource::new(cfg)?))
            }
            UpstreamAuth::OnBehalfOf(cfg) => Mode::Obo(Arc::new(Obo::new(&name, cfg)?)),
        };
        Ok(Self { mode })
    }

    /// The `Authorization` value to send upstream for this caller; `None` when the relay
    /// authenticates with a client certificate (then no Authorization header).
    pub async fn authorization(
        &self,
        p: &Principal,
    ) -> Result<Option<HeaderValue>, CredentialError> {
        match &self.mode {
            Mode::Passthrough => bearer(p.bearer_token()).map(Some),
            Mode::ClientCert => Ok(None),
            Mode::TokenFile(f) => {
                let token = f.current().await?;
                bearer(token.expose()).map(Some)
            }
            Mode::Azure(a) => a.authorization().await.map(Some),
            Mode::Obo(o) => o.authorization(p).await.map(Some),
        }
    }

    /// Whether the relay must add Impersonate-* headers for the caller (true only in mode
    /// impersonate).
    pub fn impersonates(&self) -> bool {
        matches!(
            self.mode,
            Mode::ClientCert | Mode::TokenFile(_) | Mode::Azure(_)
        )
    }

    /// Fetch and cache-hit counts (zero for modes without a token source).
    pub fn stats(&self) -> CredentialStats {
        match &self.mode {
            Mode::Azure(a) => a.cache.stats(),
            Mode::Obo(o) => o.cache.stats(),
            _ => CredentialStats::default(),
        }
    }
}

/// `Bearer <token>`, marked sensitive so hyper's and our own Debug output never show it.
fn bearer(token: &str) -> Result<HeaderValue, CredentialError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| CredentialError::Invalid("token is not header-safe".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

// === token file ===

/// A token file re-read when its modification time or size changes.
struct TokenFile {
    path: PathBuf,
    /// A `std` lock: held only for field copies, never across an await.
    state: RwLock<FileState>,
}

struct FileState {
    token: SecretString,
    /// (mtime, len) when last read; `None` until the first stat.
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

impl TokenFile {
    fn new(path: PathBuf, token: String) -> Self {
        // The first call stats the file, so the stamp of the content read at start-up is
        // learned then (a rewrite between start-up and the first request is picked up too).
        let checked = Instant::now()
            .checked_sub(FILE_CHECK_INTERVAL)
            .unwrap_or_else(Instant::now);
        Self {
            path,
            state: RwLock::new(FileState {
                token: SecretString::new(token),
                stamp: None,
                checked,
            }),
        }
    }

    /// The current token: the cached one, unless the check interval has passed and the file
    /// changed. A file that has become unreadable or empty keeps the last good token (logged):
    /// a kubelet rewriting the projected token must not fail requests.
    async fn current(&self) -> Result<SecretString, CredentialError> {
        let (token, stamp, due) = {
            let st = self.state.read().unwrap_or_else(|e| e.into_inner());
            (
                st.token.clone(),
                st.stamp,
                st.checked.elapsed() >= FILE_CHECK_INTERVAL,
            )
        };
        if !due {
            return Ok(token);
        }
        let new_stamp = match tokio::fs::metadata(&self.path).await {
            Ok(m) => m.modified().ok().map(|t| (t, m.len())),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "token file: cannot stat; keeping the last token");
                None
            }
        };
        let mut fresh = token;
        if new_stamp.is_some() && new_stamp != stamp {
            match tokio::fs::read_to_string(&self.path).await {
                Ok(s) if !s.trim().is_empty() => {
                    fresh = SecretString::new(s.trim().to_owned());
                    tracing::debug!(path = %self.path.display(), "token file: re-read");
                }
                Ok(_) => {
                    tracing::warn!(path = %self.path.display(), "token file: empty; keeping the last token")
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "token file: cannot read; keeping the last token")
                }
            }
        }
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.token = fresh.clone();
        if new_stamp.is_some() {
            st.stamp = new_stamp;
        }
        st.checked = Instant::now();
        Ok(fresh)
    }
}

// === token cache ===

/// A token with its lifetime, as fetched.
struct Fetched {
    value: HeaderValue,
    expires_in: Duration,
}

#[derive(Clone)]
struct Cached {
    value: HeaderValue,
    /// After this the token is not sent any more.
    usable_until: Instant,
    /// After this a background refresh starts.
    refresh_at: Instant,
}

impl Cached {
    fn new(f: Fetched) -> Self {
        let now = Instant::now();
        // Both bounds shrink with short lifetimes so a short-lived token is still used for
        // most of its life (and the tests can use seconds-long tokens).
        let usable = f
            .expires_in
            .saturating_sub(EXPIRY_MARGIN.min(f.expires_in / 4));
        let lead = REFRESH_LEAD.min(f.expires_in / 2);
        Self {
            value: f.value,
            usable_until: now + usable,
            refresh_at: now + f.expires_in.saturating_sub(lead).min(usable),
        }
    }
}

struct Slot {
    current: RwLock<Option<Cached>>,
    /// Held by the one fetch in flight for this key (single flight).
    fetch: Arc<tokio::sync::Mutex<()>>,
}

/// Tokens by key, each fetched by at most one task at a time.
struct TokenCache<K> {
    /// A `std` lock: held only to look up or insert a slot, never across an await.
    slots: Mutex<HashMap<K, Arc<Slot>>>,
    fetches: AtomicU64,
    hits: AtomicU64,
}

impl<K: Hash + Eq + Clone + Send + 'static> TokenCache<K> {
    fn new() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            fetches: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    fn stats(&self) -> CredentialStats {
        CredentialStats {
            fetches: self.fetches.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
        }
    }

    fn slot(&self, key: &K) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get(key) {
            return s.clone();
        }
        if slots.len() >= MAX_CACHED_USERS {
            // Drop expired entries first; if the map is still full, start over rather than
            // grow without bound (a refetch costs one exchange per user).
            let now = Instant::now();
            slots.retain(|_, s| {
                s.current
                    .read()
                    .map(|c| c.as_ref().is_some_and(|c| c.usable_until > now))
                    .unwrap_or(false)
            });
            if slots.len() >= MAX_CACHED_USERS {
                slots.clear();
            }
        }
        let s = Arc::new(Slot {
            current: RwLock::new(None),
            fetch: Arc::new(tokio::sync::Mutex::new(())),
        });
        slots.insert(key.clone(), s.clone());
        s
    }

    /// The token for `key`: cached when usable (refreshed in the background once it is due),
    /// else fetched by exactly one caller while the others wait for its result.
    async fn get<F, Fut>(&self, key: &K, fetch: F) -> Result<HeaderValue, CredentialError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Fetched, CredentialError>> + Send + 'static,
    {
        let slot = self.slot(key);
        let now = Instant::now();
        if let Some(c) = read_slot(&slot) {
            if now < c.usable_until {
                self.hits.fetch_add(1, Ordering::Relaxed);
                if now >= c.refresh_at {
                    // Refresh in the background; skip if a fetch is already running.
                    if let Ok(guard) = slot.fetch.clone().try_lock_owned() {
                        self.fetches.fetch_add(1, Ordering::Relaxed);
                        let fut = fetch();
                        let slot = slot.clone();
                        tokio::spawn(async move {
                            let _guard = guard;
                            match bounded(fut).await {
                                Ok(f) => store(&slot, f),
                                Err(e) => {
                                    tracing::debug!(error = %e, "background token refresh failed; the cached token stays in use")
                                }
                            }
                        });
                    }
                }
                return Ok(c.value);
            }
        }
        let _guard = tokio::time::timeout(FETCH_TIMEOUT, slot.fetch.lock())
            .await
            .map_err(|_| {
                CredentialError::Unavailable("timed out waiting for a token fetch".into())
            })?;
        // Whoever held the lock may have stored a token meanwhile.
        if let Some(c) = read_slot(&slot) {
            if Instant::now() < c.usable_until {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(c.value);
            }
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = bounded(fetch()).await?;
        let value = fetched.value.clone();
        store(&slot, fetched);
        Ok(value)
    }
}

fn read_slot(slot: &Slot) -> Option<Cached> {
    slot.current
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn store(slot: &Slot, f: Fetched) {
    *slot.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Cached::new(f));
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, CredentialError>>,
) -> Result<T, CredentialError> {
    tokio::time::timeout(FETCH_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(CredentialError::Unavailable(format!(
                "no answer from the token endpoint within {}s",
                FETCH_TIMEOUT.as_secs()
            )))
        })
}

// === HTTP to Entra ===

/// An HTTPS client for Entra: the public web PKI for the public authority, or exactly `ca`
/// for a private one (tests on loopback).
fn entra_client(ca: Option<&[CertificateDer<'static>]>) -> anyhow::Result<PooledClient> {
    crate::net::azure::entra_client(ca)
}

fn full_body(b: Bytes) -> crate::net::UpstreamBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// Entra's token response, success or error, as far as we read it.
#[derive(Deserialize, Default)]
struct TokenResponse {
    access_token: Option<String>,
    /// Seconds; Entra sends a number, some proxies a string.
    expires_in: Option<serde_json::Value>,
    error: Option<String>,
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u64>,
}

/// Sends one form POST to a token endpoint and classifies the answer.
async fn post_form(
    client: &PooledClient,
    url: &str,
    form: &[(&str, &str)],
) -> Result<Fetched, CredentialError> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded;charset=utf-8",
        )
        .header(header::ACCEPT, "application/json")
        .body(full_body(Bytes::from(body)))
        .map_err(|e| CredentialError::Unavailable(format!("building the token request: {e}")))?;
    let resp = client.request(req).await.map_err(|e| {
        CredentialError::Unavailable(format!(
            "token endpoint unreachable: {}",
            crate::net::error_chain(&e)
        ))
    })?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| CredentialError::Unavailable(format!("reading the token response: {e}")))?
        .to_bytes();
    let parsed: TokenResponse = serde_json::from_slice(&bytes).unwrap_or_default();
    classify(status, parsed)
}

fn classify(status: StatusCode, r: TokenResponse) -> Result<Fetched, CredentialError> {
    if status.is_success() {
        let token = r.access_token.ok_or_else(|| {
            CredentialError::Unavailable("token response without access_token".into())
        })?;
        let expires_in = match &r.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .ok_or_else(|| CredentialError::Unavailable("token response without expires_in".into()))?;
        return Ok(Fetched {
            value: bearer(&token)?,
            expires_in: Duration::from_secs(expires_in),
        });
    }
    // Entra's description names the AADSTS code and a trace id: useful in the log, never on
    // the wire (it may name the tenant or app).
    let code = r.error.unwrap_or_default();
    let detail = format!(
        "HTTP {}: {} {}",
        status.as_u16(),
        code,
        r.error_description
            .as_deref()
            .unwrap_or("")
            .lines()
            .next()
            .unwrap_or("")
    );
    let has = |n: u64, s: &str| {
        r.error_codes.contains(&n)
            || r.error_description
                .as_deref()
                .is_some_and(|d| d.contains(s))
    };
    if has(65001, "AADSTS65001") {
        return Err(CredentialError::ConsentRequired(detail));
    }
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || code == "temporarily_unavailable"
    {
        return Err(CredentialError::Unavailable(detail));
    }
    if code == "interaction_required" || code == "invalid_grant" {
        return Err(CredentialError::InteractionRequired(detail));
    }
    // invalid_client, unauthorized_client, invalid_scope, ...: the relay's own configuration
    // is wrong; the user can only wait for an admin.
    Err(CredentialError::Unavailable(detail))
}

// === on-behalf-of ===

/// A hand-written OBO client. Why not the `oauth2` crate: it has no OBO grant, no client
/// assertions and no per-request tenant; what remains is one form POST, which our pooled
/// hyper client already does with the relay's one TLS stack.
struct Obo {
    cluster: String,
    client_id: String,
    auth: ClientAuth,
    endpoint: EntraEndpoint,
    http: PooledClient,
    cache: TokenCache<OboKey>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct OboKey {
    issuer: String,
    tid: String,
    oid: String,
    scope: String,
}

enum ClientAuth {
    Secret(SecretString),
    Certificate {
        key: jsonwebtoken::EncodingKey,
        x5t_s256: String,
    },
    Federated(Arc<AssertionSource>),
}

/// Where a federated client assertion comes from.
enum AssertionSource {
    File(TokenFile),
    ManagedIdentity(Arc<dyn TokenCredential>),
}

impl Obo {
    fn new(cluster: &str, cfg: &OboConfig) -> anyhow::Result<Self> {
        let auth = match &cfg.client_auth {
            OboClientAuth::Secret(s) => ClientAuth::Secret(s.clone()),
            OboClientAuth::Certificate { chain, key } => {
                let leaf = chain
                    .first()
                    .ok_or_else(|| anyhow::anyhow!("client certificate file has no certificate"))?;
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
                ClientAuth::Certificate {
                    key: rsa_encoding_key(key)?,
                    x5t_s256: URL_SAFE_NO_PAD.encode(digest.as_ref()),
                }
            }
            OboClientAuth::FederatedTokenFile { path } => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read federated token file {}: {e}", path.display())
                })?;
                ClientAuth::Federated(Arc::new(AssertionSource::File(TokenFile::new(
                    path.clone(),
                    token.trim().to_owned(),
                ))))
            }
            OboClientAuth::FederatedManagedIdentity { client_id } => {
                ClientAuth::Federated(Arc::new(AssertionSource::ManagedIdentity(
                    managed_identity(client_id.as_deref(), None)?,
                )))
            }
        };
        Ok(Self {
            cluster: cluster.to_owned(),
            client_id: cfg.client_id.clone(),
            auth,
            endpoint: cfg.endpoint.clone(),
            http: entra_client(cfg.endpoint.ca.as_deref())?,
            cache: TokenCache::new(),
        })
    }

    async fn authorization(
        self: &Arc<Self>,
        p: &Principal,
    ) -> Result<HeaderValue, CredentialError> {
        let claim = |n: &str| p.claims.get(n).and_then(|v| v.as_str()).map(str::to_owned);
        let tid = claim("tid")
            .ok_or_else(|| CredentialError::NotExchangeable("the token has no tid".into()))?;
        if !crate::config::is_guid(&tid) {
            return Err(CredentialError::NotExchangeable(
                "the token's tid is not a GUID".into(),
            ));
        }
        if let Some(t) = &self.endpoint.tenant_id {
            if !t.eq_ignore_ascii_case(&tid) {
                return Err(CredentialError::NotExchangeable(
                    "the token is from another tenant than the cluster's".into(),
                ));
            }
        }
        let oid = p
            .oid
            .clone()
            .or_else(|| claim("oid"))
            .ok_or_else(|| CredentialError::NotExchangeable("the token has no oid".into()))?;
        let key = OboKey {
            issuer: p.issuer.to_string(),
            tid: tid.to_ascii_lowercase(),
            oid,
            scope: self.endpoint.scope.clone(),
        };
        let this = self.clone();
        let assertion = SecretString::new(p.bearer_token().to_owned());
        let tenant = key.tid.clone();
        let result = self
            .cache
            .get(&key, move || async move {
                this.exchange(&tenant, assertion).await
            })
            .await;
        if let Err(e) = &result {
            tracing::info!(cluster = %self.cluster, user = %p.user_key(), error = %e, "OBO exchange failed");
        }
        result
    }

    fn token_url(&self, tenant: &str) -> String {
        format!(
            "{}/{tenant}/oauth2/v2.0/token",
            self.endpoint.authority_host.as_str().trim_end_matches('/')
        )
    }

    async fn exchange(
        &self,
        tenant: &str,
        assertion: SecretString,
    ) -> Result<Fetched, CredentialError> {
        let url = self.token_url(tenant);
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("requested_token_use", "on_behalf_of"),
            ("client_id", &self.client_id),
            ("assertion", assertion.expose()),
            ("scope", &self.endpoint.scope),
        ];
        let client_assertion;
        match &self.auth {
            ClientAuth::Secret(s) => form.push(("client_secret", s.expose())),
            ClientAuth::Certificate { key, x5t_s256 } => {
                client_assertion = signed_assertion(&self.client_id, &url, key, x5t_s256)?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                form.push(("client_assertion", client_assertion.expose()));
            }
            ClientAuth::Federated(src) => {
                client_assertion = src.assertion().await?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                form.push(("client_assertion", client_assertion.expose()));
            }
        }
        post_form(&self.http, &url, &form).await
    }
}

impl AssertionSource {
    async fn assertion(&self) -> Result<SecretString, CredentialError> {
        match self {
            Self::File(f) => f.current().await,
            Self::ManagedIdentity(cred) => {
                // azure_identity caches this token itself.
                let t = cred
                    .get_token(&[TOKEN_EXCHANGE_SCOPE], None)
                    .await
                    .map_err(|e| azure_error("managed identity (federated assertion)", &e))?;
                Ok(SecretString::new(t.token.secret().to_owned()))
            }
        }
    }
}

/// A client assertion JWT (RFC 7523) as Entra wants it: RS256, `x5t#S256` of the certificate,
/// `aud` the token endpoint, short-lived, unique `jti`.
fn signed_assertion(
    client_id: &str,
    aud: &str,
    key: &jsonwebtoken::EncodingKey,
    x5t_s256: &str,
) -> Result<SecretString, CredentialError> {
    let now = crate::clock::unix_now();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.x5t_s256 = Some(x5t_s256.to_owned());
    let claims = serde_json::json!({
        "aud": aud,
        "iss": client_id,
        "sub": client_id,
        "jti": uuid::Uuid::new_v4().to_string(),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    });
    jsonwebtoken::encode(&header, &claims, key)
        .map(SecretString::new)
        .map_err(|e| CredentialError::Invalid(format!("signing the client assertion: {e}")))
}

/// jsonwebtoken takes PEM for RSA keys in either PKCS#1 or PKCS#8 form.
fn rsa_encoding_key(key: &PrivateKeyDer<'static>) -> anyhow::Result<jsonwebtoken::EncodingKey> {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Pkcs8(_) => "PRIVATE KEY",
        _ => anyhow::bail!("the OBO client key must be an RSA key (PKCS#1 or PKCS#8)"),
    };
    let b64 = STANDARD.encode(key.secret_der());
    let mut pem = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|_| anyhow::anyhow!("the OBO client key must be an RSA key (PKCS#1 or PKCS#8)"))
}

// === azure_identity ===

/// The relay's own Azure identity, for mode impersonate.
struct AzureSource {
    cred: Arc<dyn TokenCredential>,
    scope: String,
    cache: TokenCache<()>,
}

impl AzureSource {
    fn new(cfg: &AzureCredentialConfig) -> anyhow::Result<Self> {
        let ep = &cfg.endpoint;
        let cred: Arc<dyn TokenCredential> = match &cfg.kind {
            AzureCredentialKind::ManagedIdentity => {
                managed_identity(cfg.client_id.as_deref(), ep.ca.as_deref())?
            }
            AzureCredentialKind::WorkloadIdentity {
                federated_token_file,
            } => {
                let options = azure_identity::WorkloadIdentityCredentialOptions {
                    credential_options: azure_identity::ClientAssertionCredentialOptions {
                        client_options: client_options(ep)?,
                    },
                    client_id: cfg.client_id.clone(),
                    tenant_id: ep.tenant_id.clone(),
                    token_file_path: Some(federated_token_file.clone()),
                };
                azure_identity::WorkloadIdentityCredential::new(Some(options))
                    .map_err(|e| anyhow::anyhow!("workload identity credential: {e}"))?
            }
            AzureCredentialKind::ClientSecret { secret } => {
                let tenant = ep
                    .tenant_id
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("client_secret needs tenant_id"))?;
                let client_id = cfg
                    .client_id
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("client_secret needs client_id"))?;
                let options = azure_identity::ClientSecretCredentialOptions {
                    client_options: client_options(ep)?,
                };
                azure_identity::ClientSecretCredential::new(
                    tenant,
                    client_id,
                    secret.expose().to_owned().into(),
                    Some(options),
                )
                .map_err(|e| anyhow::anyhow!("client secret credential: {e}"))?
            }
        };
        Ok(Self {
            cred,
            scope: ep.scope.clone(),
            cache: TokenCache::new(),
        })
    }

    async fn authorization(self: &Arc<Self>) -> Result<HeaderValue, CredentialError> {
        let this = self.clone();
        self.cache
            .get(&(), move || async move {
                let t = this
                    .cred
                    .get_token(&[this.scope.as_str()], None)
                    .await
                    .map_err(|e| azure_error("azure credential", &e))?;
                let secs = (t.expires_on - azure_core::time::OffsetDateTime::now_utc())
                    .whole_seconds()
                    .max(0);
                Ok(Fetched {
                    value: bearer(t.token.secret())?,
                    expires_in: Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
                })
            })
            .await
    }
}

/// azure_identity errors name the endpoint and Entra's description, never the secret.
fn azure_error(what: &str, e: &azure_core::Error) -> CredentialError {
    let text = e.to_string();
    if text.contains("AADSTS65001") {
        return CredentialError::ConsentRequired(format!("{what}: {text}"));
    }
    CredentialError::Unavailable(format!("{what}: {text}"))
}

fn client_options(ep: &EntraEndpoint) -> anyhow::Result<azure_core::http::ClientOptions> {
    Ok(azure_client_options(
        ep.authority_host.as_str(),
        HyperTransport::new(ep.ca.as_deref())?,
    ))
}

/// Options for azure_identity's Entra credentials: `authority_host` (sovereign clouds, test
/// stand-ins) and our transport. Shared with `kube-relay token` (src/login).
pub(crate) fn azure_client_options(
    authority_host: &str,
    transport: HyperTransport,
) -> azure_core::http::ClientOptions {
    let mut cloud = azure_core::cloud::CustomConfiguration::default();
    cloud.authority_host = authority_host.trim_end_matches('/').to_owned();
    azure_core::http::ClientOptions {
        transport: Some(azure_core::http::Transport::new(Arc::new(transport))),
        // Our cache and FETCH_TIMEOUT bound the wait; the SDK's retries (up to a minute) would
        // hold requests past it.
        retry: azure_core::http::RetryOptions::none(),
        cloud: Some(Arc::new(cloud.into())),
        ..Default::default()
    }
}

/// The relay's managed identity. azure_identity picks the source from the environment
/// (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`, else IMDS at 169.254.169.254).
fn managed_identity(
    client_id: Option<&str>,
    ca: Option<&[CertificateDer<'static>]>,
) -> anyhow::Result<Arc<dyn TokenCredential>> {
    managed_identity_over(client_id, HyperTransport::new(ca)?)
}

/// A managed identity credential over `transport` (`kube-relay token --login msi` passes one
/// that also trusts the public web PKI).
pub(crate) fn managed_identity_over(
    client_id: Option<&str>,
    transport: HyperTransport,
) -> anyhow::Result<Arc<dyn TokenCredential>> {
    let options = azure_identity::ManagedIdentityCredentialOptions {
        user_assigned_id: client_id.map(|c| azure_identity::UserAssignedId::ClientId(c.to_owned())),
        client_options: azure_core::http::ClientOptions {
            transport: Some(azure_core::http::Transport::new(Arc::new(transport))),
            ..Default::default()
        },
    };
    let cred = azure_identity::ManagedIdentityCredential::new(Some(options))
        .map_err(|e| anyhow::anyhow!("managed identity credential: {e}"))?;
    Ok(cred)
}

#[cfg(test)]
mod tests;
