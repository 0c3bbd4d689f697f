//! kube-sim: a simulated Kubernetes API server and a dev OIDC issuer.
//!
//! It is kube-relay's one stand-in for kube-apiserver (none can be installed on our machines), so
//! it must be faithful *on the wire*: what kubectl, the Python client and client-node send and
//! expect (discovery, Table output, watch, logs -f, exec/attach/port-forward over SPDY/3.1 and
//! WebSocket, SelfSubjectReview, bearer and impersonation checks like AKS). It also records what
//! it received so relay tests can assert on exactly what crossed the relay.
//!
//! Layout:
//! - [`pki`]: throwaway CAs and leaf certificates (dev mode and tests).
//! - [`issuer`]: the dev OIDC issuer (discovery, JWKS, token minting).
//! - [`oauth`]: the dev issuer's optional authorization server (code + PKCE, refresh, device
//!   code) with a "pick a dev user" sign-in page, for `kube-relay dev`.
//! - [`server`]: the API server: listener, TLS, ALPN h2/http1.1, auth, REST, watch, logs.
//! - [`store`]: in-memory namespaces / pods / configmaps with resource versions and watch events.
//! - [`stream`]: exec / attach / port-forward over SPDY/3.1 and WebSocket.
//! - [`spdy`]: SPDY/3.1 framing (hand-written: no maintained crate exists).
//! - [`record`]: the record of received requests.
//! - [`token_endpoint`]: a loopback Entra token endpoint (client credentials, OBO) and managed
//!   identity endpoint, for upstream-credential tests.
//! - [`graph`]: a loopback Microsoft Graph `checkMemberGroups` endpoint, for group-overage
//!   resolution tests.
//! - `loopback`: the accept loop the issuer, token endpoint and Graph stand-in share.

pub mod graph;
pub mod issuer;
mod loopback;
pub mod pki;
pub mod record;
pub mod server;
pub mod spdy;
pub mod store;
pub mod stream;
pub mod token_endpoint;

/// Response body type used throughout the simulator: boxed so REST, streaming (watch, logs) and
/// upgrade answers share one type.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

/// Installs the process-wide rustls crypto provider (aws-lc-rs) once. Safe to call many times;
/// both the relay and the simulator use the same provider so they can share one process.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // jsonwebtoken has its own provider slot; pin it to the same backend explicitly.
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}
