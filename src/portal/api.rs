//! `/-/clusters`, `/-/kubeconfig` and `/-/login-config`.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::app::State;
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
