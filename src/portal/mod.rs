//! The relay's own pages and APIs, on the public host only (docs/architecture.md "Routing"): the
//! portal at `/`
//! and everything under `/-/`. Nothing here is ever forwarded to a cluster.
//!
//! - [`api`]: `/-/clusters`, `/-/kubeconfig` (bearer token or portal session) and
//!   `/-/login-config` (public: what `kube-relay token` needs to sign in).
//! - [`gateway`]: `/-/web/…`, the browser's way to a cluster for the terminal and logs (its
//!   requests are rewritten and then served by the proxy's phases, not here).
//! - [`terminal`]: the web terminal and live logs page (`/-/terminal`) and its scripts.
//! - [`playback`]: session recordings for auditors (`/-/recordings…`).
//! - [`web`]: the browser portal: `/`, `/-/login`, `/-/callback`, `/-/logout`, `/-/signed-out`,
//!   `/-/static/…`.

pub mod api;
pub mod gateway;
pub mod playback;
pub mod terminal;
pub mod web;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::RelayBody;
use crate::error::ProxyError;
use crate::state::ConnCtx;
use crate::state::State;

/// Serves a relay page or API. Errors become Status responses in `proxy::handle` like any
/// other; HTML pages render their own friendly errors.
pub async fn handle(
    state: &State,
    conn: &ConnCtx,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<RelayBody>, ProxyError> {
    match path {
        "/-/clusters" | "/-/kubeconfig" | "/-/login-config" => {
            api::handle(state, conn, req, path).await
        }
        p if playback::serves(p) => playback::handle(state, req, path).await,
        p if terminal::serves(p) => terminal::handle(state, req, path).await,
        _ => web::handle(state, conn, req, path).await,
    }
}
