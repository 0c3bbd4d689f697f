//! What a request sees: one configuration generation ([`State`]) and the connection it
//! arrived on ([`ConnCtx`]). The server builds and swaps generations; the proxy and the portal
//! only read them, so this sits below both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, Principal};
use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::{AuthnLabels, Metrics};
use crate::upstream::Upstream;

/// Everything a request needs, for one configuration generation. A reload builds a new one and
/// swaps it in; requests in flight keep the generation they started with.
pub struct State {
    pub cfg: Config,
    pub upstreams: HashMap<String, Upstream>,
    pub auth: Arc<Authenticator>,
    pub audit: crate::audit::AuditLog,
    /// The browser portal's identity provider client, when `login.portal` is configured.
    pub portal: Option<Arc<crate::auth::sso::Portal>>,
    /// Group overage resolution through Microsoft Graph, per issuer.
    pub groups: Arc<crate::groups::GroupResolver>,
    /// Where exec and attach sessions are recorded (`recording.store`), when configured.
    pub recordings: Option<Arc<crate::recording::RecordingStore>>,
    pub(crate) tls: TlsAcceptor,
    /// Stops this generation's background tasks (key refresh) when it is replaced.
    pub(crate) generation: CancellationToken,
    // Shared by every generation:
    pub metrics: Arc<Metrics>,
    pub auth_failures: Arc<crate::limits::FailureLimiter>,
    pub identity_rate: Arc<crate::limits::IdentityRate>,
    pub streams: Arc<crate::streams::StreamRegistry>,
    /// Tunnels (exec, attach, port-forward) outlive the HTTP connection that upgraded them, so
    /// they are tracked here for the drain to wait on.
    pub tunnels: TaskTracker,
}

/// What the relay knows about the client connection a request arrived on.
#[derive(Debug)]
pub struct ConnCtx {
    pub peer: SocketAddr,
    /// SNI from the handshake, lower-cased by rustls.
    pub sni: Option<String>,
    /// Cancelling it drops the connection at once (a stalled HTTP/1.1 watch: src/streams.rs).
    pub abort: tokio_util::sync::CancellationToken,
    /// The peer's IP as `X-Forwarded-For` carries it, formatted once per connection.
    pub peer_header: http::HeaderValue,
}

impl ConnCtx {
    pub fn new(peer: SocketAddr, sni: Option<String>) -> Self {
        let peer_header = http::HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or(http::HeaderValue::from_static("unknown"));
        // Shared from now on: each request's clone is a reference count.
        drop(peer_header.clone());
        Self {
            peer,
            sni,
            abort: tokio_util::sync::CancellationToken::new(),
            peer_header,
        }
    }
}

impl State {
    /// The authenticate phase: extracts and verifies the caller's bearer token. A source that
    /// keeps failing is refused with 429 before any verification work, except for tokens
    /// already verified (docs/security.md F5). Shared by the proxy and the portal's APIs.
    pub async fn authenticate(
        &self,
        peer: std::net::IpAddr,
        h: &http::HeaderMap,
    ) -> Result<Arc<Principal>, ProxyError> {
        let token = crate::auth::bearer_token(h).map_err(ProxyError::Unauthorized)?;
        if let Err(wait) = self.auth_failures.check(peer) {
            if let Some(p) = self.auth.cached(&token) {
                return Ok(p);
            }
            return Err(ProxyError::TooManyRequests {
                message: "too many failed authentications from this address; retry later".into(),
                retry_after: wait.as_secs().max(1),
            });
        }
        let result = self.auth.authenticate(&token).await;
        let (res, reason) = match &result {
            Ok((_, crate::auth::Verified::Cached)) => ("success", "cached"),
            Ok((_, crate::auth::Verified::Verified)) => ("success", "verified"),
            Err(e) => ("failure", e.failure.as_label()),
        };
        self.metrics
            .authn
            .get_or_create(&AuthnLabels {
                result: res,
                reason,
            })
            .inc();
        match result {
            Ok((p, _)) => Ok(p),
            Err(e) => {
                self.auth_failures.record_failure(peer);
                Err(ProxyError::Unauthorized(e))
            }
        }
    }
}
