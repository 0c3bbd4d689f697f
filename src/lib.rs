//! kube-relay: one TLS-terminating relay in front of many private Kubernetes API servers.
//!
//! # Request lifecycle
//!
//! ```text
//!  accept (connection permit) ─► TLS (one deadline; SNI kept) ─► HTTP/1.1 or h2 (hyper-util auto)
//!        │
//!        ▼  proxy::handle — one named phase each, errors rendered in one place (error.rs)
//!  relay page? (/, /-/) ─► portal
//!  route (route.rs: SNI / Host / path must agree)
//!    ─► authenticate (state.rs → auth/: Principal)
//!    ─► authorize (authz.rs, default deny; exec/attach/portforward = create)
//!    ─► prepare upstream headers (proxy/headers.rs: strip, then add credential + identity)
//!    ─► forward over the cluster's pool (upstream/, h2 or http/1.1), streaming the body back
//!       or upgrade (proxy/upgrade.rs: own connection, tunnel only after a real 101)
//!    ─► audit record, access log, metrics
//! ```
//!
//! # Modules
//! The map, its layers and the invariants each module keeps are in docs/architecture.md.
//! - Server side: [`server`] (listeners, reload, drain, admin) over [`proxy`] and [`portal`],
//!   which share [`state`]; below them [`route`], [`auth`], [`authz`], [`credentials`],
//!   [`upstream`], [`streams`], [`body`], [`audit`], [`metrics`], [`limits`] and [`error`] (the
//!   one place errors become `metav1.Status` responses).
//! - Bottom: [`net`] (the one outbound HTTPS stack), [`wire`] (documents server and CLI share),
//!   [`config`], [`tls`], [`private_file`].
//! - User side: [`cli`] (`kube-relay token`, `kubeconfig`, `doctor`, `certs`).
//! - `dev`: the embedded default (`kube-relay dev`), only with the default `dev` feature.
// Client input and I/O fail in ordinary operation: errors are handled, never unwrapped
// (tests may unwrap: clippy.toml).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod audit;
pub mod auth;
pub mod authz;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conn_streams;
pub mod credentials;
#[cfg(feature = "dev")]
pub mod dev;
pub mod error;
pub mod framing;
pub mod groups;
pub mod html;
pub mod limits;
pub mod lines;
pub mod metrics;
pub mod net;
pub mod portal;
pub mod private_file;
pub mod proxy;
pub mod recording;
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
