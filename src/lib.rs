//! kube-relay: one TLS-terminating relay in front of many private Kubernetes API servers.
//!
//! # Request lifecycle
//!
//! ```text
//!  accept (connection permit) ─► TLS (one deadline; SNI kept) ─► HTTP/1.1 or h2 (hyper-util auto)
//!        │
//!        ▼  proxy::handle — one named phase each, errors rendered in one place (error.rs)
//!  route (route.rs: SNI / Host / path must agree)
//!    ─► header checks ─► authenticate (auth.rs → Principal)
//!    ─► cluster lookup ─► authorize (authz.rs, default deny; exec/attach/portforward = create)
//!    ─► prepare upstream headers (proxy/headers.rs: strip, then add credential + identity)
//!    ─► forward over the cluster's pool (upstream.rs, h2 or http/1.1), streaming the body back
//!       or upgrade (proxy/upgrade.rs: own connection, tunnel only after a real 101)
//!    ─► access log + metrics (metrics.rs)
//! ```
//!
//! # Modules
//! - [`config`]: file schema → validated [`config::Config`]; every error reported at once.
//! - [`app`]: wiring, listeners, admin endpoints.
//! - [`tls`]: serving TLS and the process's one crypto provider.
//! - [`route`], [`auth`], [`authz`], [`proxy`], [`upstream`]: the request path.
//! - [`credentials`]: what the relay sends upstream as `Authorization` per cluster (passthrough,
//!   token file, Azure identity, Entra on-behalf-of), cached and refreshed off the request path.
//! - [`error`]: the one place errors become `metav1.Status` responses.
//! - [`dev`]: the embedded default (`kube-relay dev`).

pub mod audit;
pub mod auth;
pub mod authz;
pub mod body;
pub mod cli;
pub mod config;
pub mod credentials;
#[cfg(feature = "dev")]
pub mod dev;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod portal;
pub mod private_file;
pub mod proxy;
pub mod route;
pub mod server;
pub mod state;
pub mod streams;
pub mod tls;
pub mod upstream;
pub mod wire;

/// Installs the process-wide crypto providers (rustls and jsonwebtoken) explicitly. Call once at
/// start-up, before any TLS or JWT work.
pub fn install_crypto_provider() {
    tls::install_crypto_provider();
}
