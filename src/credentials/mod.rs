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
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
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

mod azure;
mod cache;
mod file;
mod obo;

use azure::*;
use cache::*;
use file::*;
use obo::*;

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
    /// Only a caller's token could tell (no tenant to check the relay's client against).
    pub fn needs_a_caller(&self) -> bool {
        matches!(self, Self::NotExchangeable(_))
    }

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

// === the relay's Azure identity for other resources ===

/// The relay's own Azure identity, for a resource other than a cluster (Microsoft Graph for
/// group overage): the same azure_identity sources, cache and refresh as mode impersonate.
pub struct AzureToken(Arc<AzureSource>);

impl fmt::Debug for AzureToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureToken").finish_non_exhaustive()
    }
}

impl AzureToken {
    pub fn new(cfg: &AzureCredentialConfig) -> anyhow::Result<Self> {
        Ok(Self(Arc::new(AzureSource::new(cfg)?)))
    }

    /// `Bearer <token>` for the configured scope, from the cache while it is fresh.
    pub async fn authorization(&self) -> Result<HeaderValue, CredentialError> {
        self.0.authorization().await
    }

    /// The underlying azure_identity credential, for an Azure SDK client that asks for its own
    /// scope (Azure Storage).
    pub fn token_credential(&self) -> Arc<dyn TokenCredential> {
        self.0.cred.clone()
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
            // Built once per principal: the header is the token's size (an Entra token is 2 to
            // 4 KB), and the principal lives in the verified-token cache.
            Mode::Passthrough => p
                .memo
                .bearer
                .get_or_init(|| {
                    let v = bearer(p.bearer_token()).map_err(|_| "token is not header-safe")?;
                    // Shared from now on: each request's clone is a reference count.
                    drop(v.clone());
                    Ok(v)
                })
                .clone()
                .map(Some)
                .map_err(|why| CredentialError::Invalid(why.into())),
            Mode::ClientCert => Ok(None),
            Mode::TokenFile(f) => {
                let token = f.current().await?;
                bearer(token.expose()).map(Some)
            }
            Mode::Azure(a) => a.authorization().await.map(Some),
            Mode::Obo(o) => o.authorization(p).await.map(Some),
        }
    }

    /// `kube-relay doctor`: proves the relay's own Entra credential for this cluster works,
    /// without a caller. Azure identities acquire a token for the cluster's scope (returned,
    /// for `GET /version`); on_behalf_of runs a client-credentials grant with the same client
    /// authentication. `None`: the mode has no Entra credential (doctor checks it otherwise).
    pub async fn self_check(
        &self,
    ) -> Option<Result<(String, Option<HeaderValue>), CredentialError>> {
        match &self.mode {
            Mode::Azure(a) => Some(a.authorization().await.map(|h| {
                (
                    format!("impersonate: Azure identity token acquired for {}", a.scope),
                    Some(h),
                )
            })),
            Mode::Obo(o) => Some(o.check_client().await.map(|d| (d, None))),
            Mode::Passthrough | Mode::ClientCert | Mode::TokenFile(_) => None,
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

#[cfg(test)]
mod tests;
