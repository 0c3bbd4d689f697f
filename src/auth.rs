//! Authentication: bearer tokens from the configured OIDC / Entra issuers become a [`Principal`].
//!
//! Order of checks, cheapest first, so junk never costs a signature verification (security.md
//! E1–E4, F5): size → JWT shape and header (`alg` allowlist RS256/ES256, `kid` present and short)
//! → `iss` names a configured issuer → `kid` is in that issuer's cached JWKS (one rate-limited,
//! single-flight refresh on a miss) → the key's type matches `alg` → signature and `iss`, `aud`,
//! `exp`, `nbf` (all required; leeway [`LEEWAY_SECS`]) → issuer-specific rules.
//!
//! Header-supplied keys (`jwk`, `jku`, `x5u`) are never used: the `kid` is only a lookup key into
//! keys fetched from the issuer's own discovery document.
//!
//! A [`Principal`] can only be made here, and forwarding needs one, so no request can reach a
//! cluster unauthenticated.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;
use url::Url;

use crate::config::{IssuerConfig, IssuerKind};
use crate::upstream::{client_tls, pooled_client, TlsDialer};

/// Clock-skew allowance on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 60;
/// Tokens larger than this are refused before any parsing (Entra tokens with many groups stay
/// well under it).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
const MAX_KID_BYTES: usize = 256;
/// At most one JWKS refresh per issuer in this window, however many unknown `kid`s arrive.
const REFRESH_COOLDOWN: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// An authenticated caller. Only [`Authenticator::authenticate`] makes one.
#[derive(Clone)]
pub struct Principal {
    /// The configured issuer's name.
    pub issuer: Arc<str>,
    /// The stable identity key: `oid` for Entra, the configured claim for OIDC.
    pub subject: String,
    /// The name shown upstream: `upn`, else `oid` (Entra); the subject (OIDC).
    pub username: String,
    pub groups: Vec<String>,
    /// Entra object id, sent as `Impersonate-Extra-oid` (AKS Azure RBAC needs it).
    pub oid: Option<String>,
    pub claims: serde_json::Map<String, Value>,
    /// The verified bearer token, for passthrough clusters only.
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
    pub fn user_key(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }

    /// The caller's own token, to forward unchanged in passthrough mode.
    pub fn bearer_token(&self) -> &str {
        &self.token
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

struct CachedKey {
    key: DecodingKey,
    alg: Algorithm,
}

type KeyMap = HashMap<String, Arc<CachedKey>>;

/// One configured issuer with its key cache.
struct IssuerState {
    cfg: Arc<IssuerConfig>,
    name: Arc<str>,
    /// Exact `iss` values accepted.
    accepted_iss: Vec<String>,
    discovery_url: Url,
    keys: RwLock<Arc<KeyMap>>,
    /// Serialises refreshes (single flight) and remembers when the last one started.
    refresh: AsyncMutex<Option<Instant>>,
    client: crate::upstream::PooledClient,
}

/// Validates bearer tokens against the configured issuers.
pub struct Authenticator {
    issuers: Vec<Arc<IssuerState>>,
}

#[derive(Deserialize)]
struct IssPeek {
    iss: Option<String>,
}

impl Authenticator {
    pub fn new(issuers: &[Arc<IssuerConfig>]) -> anyhow::Result<Self> {
        let mut out = Vec::new();
        for cfg in issuers {
            let (accepted_iss, discovery_url) = match &cfg.kind {
                IssuerKind::Oidc {
                    issuer, issuer_str, ..
                } => {
                    let base = issuer.as_str().trim_end_matches('/');
                    (
                        vec![issuer_str.clone()],
                        Url::parse(&format!("{base}/.well-known/openid-configuration"))?,
                    )
                }
                IssuerKind::Entra {
                    tenant_id,
                    authority_host,
                    ..
                } => {
                    let host = authority_host.as_str().trim_end_matches('/');
                    (
                        vec![
                            format!("{host}/{tenant_id}/v2.0"),
                            format!("https://sts.windows.net/{tenant_id}/"),
                        ],
                        Url::parse(&format!(
                            "{host}/{tenant_id}/v2.0/.well-known/openid-configuration"
                        ))?,
                    )
                }
            };
            // Public issuers (Entra, GitHub) are trusted through the Mozilla roots compiled in;
            // an issuer on a private CA (tests, on-prem IdPs) trusts exactly its `ca_file`.
            let tls = if cfg.ca.is_empty() {
                let mut store = rustls::RootCertStore::empty();
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                let mut c = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                    .with_root_certificates(store)
                    .with_no_client_auth();
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(c)
            } else {
                client_tls(&cfg.ca, None, &[b"http/1.1"])?
            };
            let client = pooled_client(TlsDialer::new(tls, None, None, FETCH_TIMEOUT));
            out.push(Arc::new(IssuerState {
                name: Arc::from(cfg.name.as_str()),
                cfg: cfg.clone(),
                accepted_iss,
                discovery_url,
                keys: RwLock::new(Arc::new(HashMap::new())),
                refresh: AsyncMutex::new(None),
                client,
            }));
        }
        Ok(Self { issuers: out })
    }

    /// Fetches every issuer's keys once; failures are logged and retried on demand.
    pub async fn warm_up(&self) -> Vec<(String, Result<usize, String>)> {
        let mut out = Vec::new();
        for st in &self.issuers {
            let r = st.refresh_keys(true).await.map(|()| st.key_count());
            if let Err(e) = &r {
                tracing::warn!(issuer = %st.name, error = %e, "could not load the issuer's signing keys; will retry when a token arrives");
            }
            out.push((st.cfg.name.clone(), r));
        }
        out
    }

    /// Number of cached keys per issuer, for readiness.
    pub fn key_counts(&self) -> Vec<(String, usize)> {
        self.issuers
            .iter()
            .map(|s| (s.cfg.name.clone(), s.key_count()))
            .collect()
    }

    /// Validates a bearer token.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
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
        let st = self
            .issuers
            .iter()
            .find(|s| s.accepted_iss.contains(&iss))
            .ok_or_else(|| {
                fail(
                    AuthFailure::UnknownIssuer,
                    format!("iss {iss:?} is not configured"),
                )
            })?;

        let key = match st.key(kid) {
            Some(k) => k,
            None => {
                // Unknown kid: maybe the IdP rolled its keys. At most one refresh per cooldown.
                if let Err(e) = st.refresh_keys(false).await {
                    tracing::warn!(issuer = %st.name, error = %e, "JWKS refresh failed");
                }
                st.key(kid).ok_or_else(|| {
                    fail(
                        AuthFailure::UnknownKey,
                        format!("kid {kid:?} not in the JWKS of {}", st.name),
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
        v.set_audience(&st.cfg.audiences);
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
        principal_from(st, &iss, data.claims, token)
    }
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

fn principal_from(
    st: &IssuerState,
    iss: &str,
    claims: serde_json::Map<String, Value>,
    token: &str,
) -> Result<Principal, AuthError> {
    match &st.cfg.kind {
        IssuerKind::Oidc {
            username_claim,
            groups_claim,
            ..
        } => {
            let subject = claim_str(&claims, username_claim)
                .ok_or_else(|| fail(AuthFailure::Claims, format!("no {username_claim} claim")))?
                .to_owned();
            let groups = claim_list(&claims, groups_claim);
            Ok(Principal {
                issuer: st.name.clone(),
                username: subject.clone(),
                subject,
                groups,
                oid: None,
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
            let tid = claim_str(&claims, "tid").unwrap_or_default();
            if !tid.eq_ignore_ascii_case(tenant_id)
                || !iss.to_ascii_lowercase().contains(tenant_id.as_str())
            {
                return Err(fail(
                    AuthFailure::Tenant,
                    format!("tid {tid:?} is not the configured tenant"),
                ));
            }
            let oid = claim_str(&claims, "oid")
                .ok_or_else(|| fail(AuthFailure::Claims, "no oid claim"))?
                .to_owned();
            // Delegated tokens carry `scp`; app-only tokens carry `roles` (and no `scp`).
            match claim_str(&claims, "scp") {
                Some(scp) => {
                    if !required_scopes.is_empty()
                        && !scp
                            .split(' ')
                            .any(|s| required_scopes.iter().any(|r| r == s))
                    {
                        return Err(fail(AuthFailure::Scope, "no required scope in scp"));
                    }
                }
                None => {
                    let roles = claim_list(&claims, "roles");
                    if !required_roles.is_empty()
                        && !roles.iter().any(|r| required_roles.contains(r))
                    {
                        return Err(fail(
                            AuthFailure::Scope,
                            "app-only token without a required role",
                        ));
                    }
                }
            }
            let username = claim_str(&claims, "upn").unwrap_or(&oid).to_owned();
            let groups = claim_list(&claims, "groups");
            Ok(Principal {
                issuer: st.name.clone(),
                subject: oid.clone(),
                username,
                groups,
                oid: Some(oid),
                claims,
                token: Arc::from(token),
            })
        }
    }
}

impl IssuerState {
    fn key(&self, kid: &str) -> Option<Arc<CachedKey>> {
        let map = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        map.get(kid).cloned()
    }

    fn key_count(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Fetches discovery and JWKS. Single flight; unless `force`, skipped when the last attempt
    /// started within [`REFRESH_COOLDOWN`]. A failed fetch keeps the current keys.
    async fn refresh_keys(&self, force: bool) -> Result<(), String> {
        let mut last = self.refresh.lock().await;
        if let Some(at) = *last {
            if !force && at.elapsed() < REFRESH_COOLDOWN {
                return Ok(());
            }
        }
        *last = Some(Instant::now());
        let discovery = self.fetch_json(&self.discovery_url).await?;
        let issuer = discovery
            .get("issuer")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !self.accepted_iss.iter().any(|a| a == issuer)
            && !matches!(self.cfg.kind, IssuerKind::Entra { .. })
        {
            return Err(format!(
                "discovery names issuer {issuer:?}, expected {:?}",
                self.accepted_iss
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
        tracing::info!(issuer = %self.name, keys = map.len(), "loaded signing keys");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        Ok(())
    }

    async fn fetch_json(&self, url: &Url) -> Result<Value, String> {
        let uri: http::Uri = url.as_str().parse().map_err(|e| format!("{url}: {e}"))?;
        let req = http::Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .map_err(|e| e.to_string())?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("GET {url}: {}", crate::upstream::error_chain(&e)))?;
            if !resp.status().is_success() {
                return Err(format!("GET {url}: HTTP {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| format!("GET {url}: invalid JSON: {e}"))
        };
        tokio::time::timeout(FETCH_TIMEOUT, work)
            .await
            .map_err(|_| format!("GET {url}: timed out"))?
    }
}
