//! The browser portal (placeholder until the portal lands).

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::app::State;
use crate::auth::Principal;
use crate::error::ProxyError;
use crate::proxy::body::RelayBody;
use crate::proxy::ConnCtx;

pub async fn handle(
    _state: &State,
    _conn: &ConnCtx,
    _req: Request<Incoming>,
    path: &str,
) -> Result<Response<RelayBody>, ProxyError> {
    Err(ProxyError::NotFound(format!(
        "kube-relay has no page at {path}"
    )))
}

/// The signed-in portal user behind the request's session cookie, if any and still valid.
pub async fn session_principal(_state: &State, _h: &http::HeaderMap) -> Option<Arc<Principal>> {
    None
}
