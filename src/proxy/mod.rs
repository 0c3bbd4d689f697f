//! The request path, as named phases in order (see the lifecycle in `lib.rs`):
//!
//! route → check headers → authenticate → find cluster → authorize → prepare upstream headers →
//! forward (stream) or upgrade (tunnel after a real 101) → respond (errors rendered in one place)
//! → access log and metrics.
//!
//! [`handle`] never fails: every phase returns `Result<_, ProxyError>` and the one `Err` arm in
//! `handle` renders it with [`ProxyError::into_response`].

pub mod body;
pub mod headers;
pub mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::app::State;
use crate::auth::Principal;
use crate::authz::{authorize, Decision, RequestInfo};
use crate::error::{Fault, ProxyError};
use crate::metrics::{AuthnLabels, DurationLabels, LongRunningLabels, ReasonLabels, RequestLabels};
use crate::route::{self, Route, RouteInput};
use crate::upstream::Upstream;
use body::{OnDrop, RelayBody, StreamBody};

/// What the relay knows about the client connection a request arrived on.
#[derive(Debug)]
pub struct ConnCtx {
    pub peer: SocketAddr,
    /// SNI from the handshake, lower-cased by rustls.
    pub sni: Option<String>,
}

/// Per-request facts gathered by the phases, for the access log and metrics.
#[derive(Default)]
struct Outcome {
    cluster: Option<String>,
    verb: String,
    user: Option<String>,
    long_running: bool,
}

/// Serves one request. Never fails: errors become Status responses here and only here.
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<RelayBody>, Infallible> {
    let start = Instant::now();
    let audit_id = headers::audit_id(req.headers());
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
    let is_upgrade = req.headers().contains_key(header::UPGRADE);
    let mut out = Outcome::default();

    let mut resp = match proxy(&state, &conn, req, &audit_id, &mut out).await {
        Ok(r) => r,
        Err(err) => {
            match err.fault() {
                Fault::Client => {
                    tracing::info!(audit_id = ?audit_id, peer = %conn.peer, error = %err, "request refused")
                }
                Fault::Upstream => {
                    tracing::warn!(audit_id = ?audit_id, error = %err, "upstream failure")
                }
                Fault::Internal => {
                    tracing::error!(audit_id = ?audit_id, error = %err, "internal error")
                }
            }
            if let ProxyError::Upstream {
                cluster, failure, ..
            } = &err
            {
                state
                    .metrics
                    .upstream_errors
                    .get_or_create(&ReasonLabels {
                        cluster: cluster.clone(),
                        reason: failure.as_label(),
                    })
                    .inc();
            }
            err.into_response()
        }
    };
    resp.headers_mut().insert("audit-id", audit_id.clone());
    if is_upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // A refused upgrade closes the client connection: whatever the client pipelined after
        // it is never read as another request (security.md A1, A2).
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }

    let cluster = out.cluster.unwrap_or_default();
    let verb = if out.verb.is_empty() {
        method.as_str().to_ascii_lowercase()
    } else {
        out.verb
    };
    let code = resp.status().as_u16();
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            cluster: cluster.clone(),
            verb: verb.to_ascii_uppercase(),
            code,
        })
        .inc();
    let elapsed = start.elapsed();
    if !out.long_running && code != 101 {
        state
            .metrics
            .duration
            .get_or_create(&DurationLabels {
                cluster: cluster.clone(),
                verb: verb.to_ascii_uppercase(),
            })
            .observe(elapsed.as_secs_f64());
    }
    tracing::info!(
        target: "kube_relay::access",
        audit_id = ?audit_id,
        peer = %conn.peer,
        method = %method,
        // The path only: queries can carry label values users consider sensitive.
        path = %target.split('?').next().unwrap_or(""),
        cluster = %cluster,
        verb = %verb,
        user = out.user.as_deref().unwrap_or("-"),
        code,
        ms = elapsed.as_millis() as u64,
        "request"
    );
    Ok(resp)
}

/// The phases, in order.
async fn proxy(
    state: &State,
    conn: &ConnCtx,
    mut req: Request<Incoming>,
    audit_id: &HeaderValue,
    out: &mut Outcome,
) -> Result<Response<RelayBody>, ProxyError> {
    // Phase: route (pure; malformed or contradictory names are refused before anything else).
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let uri_host = req.uri().authority().map(|a| a.as_str().to_owned());
    let host_header = match req.headers().get(header::HOST) {
        Some(h) => Some(
            h.to_str()
                .map_err(|_| ProxyError::BadRequest("malformed Host header".into()))?
                .to_owned(),
        ),
        None => None,
    };
    let route = route::resolve(
        &state.cfg.routing,
        &state.cfg.public_host,
        RouteInput {
            sni: conn.sni.as_deref(),
            hosts: [uri_host.as_deref(), host_header.as_deref()],
            target: &target,
        },
    )
    .map_err(|e| match e {
        route::RouteError::BadRequest(m) => ProxyError::BadRequest(m.to_owned()),
        e @ (route::RouteError::Misdirected { .. } | route::RouteError::HostMismatch(_)) => {
            ProxyError::Misdirected(e.to_string())
        }
        e @ route::RouteError::NoCluster(_) => ProxyError::NotFound(e.to_string()),
    })?;
    let (cluster_name, upstream_target) = match route {
        Route::Relay { path } => {
            return Err(ProxyError::NotFound(format!(
                "kube-relay has no page at {path}"
            )))
        }
        Route::Cluster {
            cluster,
            upstream_target,
        } => (cluster, upstream_target.to_path_and_query()),
    };
    out.cluster = Some(cluster_name.clone());

    // Phase: header checks that need no identity.
    if headers::total_size(req.headers()) > headers::MAX_HEADER_BYTES {
        return Err(ProxyError::HeaderTooLarge);
    }
    headers::reject_underscore_identity_headers(req.headers())?;

    // Phase: authenticate.
    let principal = authenticate(state, req.headers()).await?;
    out.user = Some(principal.user_key());

    // Phase: find the cluster (after authentication, so anonymous callers cannot enumerate).
    let upstream = state.upstreams.get(&cluster_name).ok_or_else(|| {
        ProxyError::NotFound(format!(
            "cluster {cluster_name} is not served by this relay"
        ))
    })?;

    // Phase: authorize.
    let info = RequestInfo::parse(req.method(), &upstream_target);
    out.verb = info.verb.clone();
    if headers::has_client_impersonation(req.headers()) {
        return Err(ProxyError::Forbidden(
            "impersonation (kubectl --as) is not allowed through kube-relay; it already impersonates you".into(),
        ));
    }
    if let Decision::Deny(why) = authorize(&principal, &upstream.cluster, &info) {
        return Err(ProxyError::Forbidden(why));
    }

    // Phase: prepare upstream headers.
    let mut up_headers = headers::sanitize_request(req.headers());
    headers::add_identity(&mut up_headers, &upstream.cluster.upstream_auth, &principal)?;
    headers::add_forwarding(&mut up_headers, req.headers(), conn.peer.ip(), audit_id);

    // Phase: forward or upgrade.
    if let Some(kind) = upgrade::requested(&req, &info)? {
        out.long_running = true;
        let client_upgrade = hyper::upgrade::on(&mut req);
        return upgrade::relay(
            state,
            upstream,
            req,
            up_headers,
            &upstream_target,
            kind,
            client_upgrade,
        )
        .await;
    }
    let query = upstream_target.split_once('?').map_or("", |(_, q)| q);
    out.long_running = info.is_long_running_read(query);
    forward(
        state,
        upstream,
        req,
        up_headers,
        &upstream_target,
        out.long_running,
    )
    .await
}

/// Extracts and validates the caller's bearer token (`Authorization`, else the WebSocket
/// subprotocol entry browsers use).
async fn authenticate(state: &State, h: &http::HeaderMap) -> Result<Principal, ProxyError> {
    let token = match h.get(header::AUTHORIZATION) {
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ProxyError::Unauthorized("Authorization is not ASCII".into()))?;
            let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(ProxyError::Unauthorized(
                    "Authorization is not a bearer token".into(),
                ));
            }
            rest.trim().to_owned()
        }
        None => headers::ws_bearer_token(h).unwrap_or_default(),
    };
    let result = state.auth.authenticate(&token).await;
    let (res, reason) = match &result {
        Ok(_) => ("success", ""),
        Err(e) => ("failure", e.failure.as_label()),
    };
    state
        .metrics
        .authn
        .get_or_create(&AuthnLabels {
            result: res,
            reason,
        })
        .inc();
    result.map_err(|e| ProxyError::Unauthorized(format!("{}: {}", e.failure.as_label(), e.detail)))
}

/// Forwards a non-upgrade request over the cluster's pooled client and streams the answer back.
async fn forward(
    state: &State,
    upstream: &Upstream,
    req: Request<Incoming>,
    headers: http::HeaderMap,
    target: &str,
    long_running: bool,
) -> Result<Response<RelayBody>, ProxyError> {
    let cluster = upstream.cluster.name.to_string();
    let (parts, body) = req.into_parts();
    let uri = upstream
        .uri(target)
        .map_err(|e| ProxyError::BadRequest(format!("cannot forward this request-target: {e}")))?;
    let mut up_req = Request::new(body.boxed());
    *up_req.method_mut() = parts.method;
    *up_req.uri_mut() = uri;
    *up_req.headers_mut() = headers;
    // The pool picks h2 or http/1.1 by ALPN; pinning HTTP/1.1 here lets it decide.
    *up_req.version_mut() = http::Version::HTTP_11;

    let resp = tokio::time::timeout(
        state.cfg.timeouts.response_header,
        upstream.client.request(up_req),
    )
    .await
    .map_err(|_| ProxyError::Upstream {
        cluster: cluster.clone(),
        failure: crate::error::UpstreamFailure::ResponseTimeout,
        detail: format!(
            "no response headers within {:?}",
            state.cfg.timeouts.response_header
        ),
    })?
    .map_err(|e| {
        let (failure, detail) = crate::upstream::classify(&e);
        ProxyError::Upstream {
            cluster: cluster.clone(),
            failure,
            detail,
        }
    })?;
    let (mut parts, body) = resp.into_parts();
    headers::sanitize_response(&mut parts.headers);
    let body = if long_running {
        let gauge = state
            .metrics
            .longrunning
            .get_or_create(&LongRunningLabels {
                cluster,
                protocol: "watch",
            })
            .clone();
        gauge.inc();
        StreamBody::new(
            body,
            Some(state.cfg.timeouts.stream_idle),
            Some(OnDrop::new(move || {
                gauge.dec();
            })),
        )
        .boxed()
    } else {
        StreamBody::new(body, None, None).boxed()
    };
    Ok(Response::from_parts(parts, body))
}
