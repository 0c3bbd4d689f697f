//! The request path, as named phases in order (docs/architecture.md "Request lifecycle"):
//!
//! [`route`] → [`check_headers`] → [`authenticate`] → [`find_cluster`] → [`authorize`] →
//! [`prepare_upstream`] → [`dispatch`]: forward (stream) or upgrade (tunnel after a real 101).
//!
//! Each phase is a plain async fn that returns `Result<_, ProxyError>` and records what it
//! learnt in the request's [`Ctx`]; the audit record, the access log line and the metrics are
//! derived from that context once, at the end of [`handle`]. [`handle`] never fails: the one
//! `Err` arm there renders every error with [`ProxyError::into_response`]. [`authorize`] yields
//! the [`Admitted`] proof that [`dispatch`] requires.

mod access;
pub mod headers;
pub mod upgrade;

pub use access::write_directly_to as log_access_lines_to;

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::audit::{AuditBase, AuditObject, AuditUser};
use crate::auth::Principal;
use crate::authz::{Admitted, RequestInfo};
use crate::body::{OnClose, RelayBody, StreamBody};
use crate::error::{Fault, ProxyError};
use crate::metrics::{DurationLabels, LongRunningLabels, ReasonLabels, RequestLabels};
use crate::route::{self, Route, RouteInput};
use crate::state::{ConnCtx, State};
use crate::upstream::Upstream;

/// What the phases learnt about one request, in the order they learn it. The audit record
/// (and from it the access log and metrics) is derived from this in [`Ctx::audit`], never
/// assembled piecemeal by the phases.
#[derive(Default)]
struct Ctx {
    /// Request-side facts known before any phase runs.
    base: AuditBase,
    cluster: Option<String>,
    principal: Option<Arc<Principal>>,
    info: Option<RequestInfo>,
    /// The identity a permitted `kubectl --as` asks for.
    nested: Option<headers::Impersonation>,
    admitted: bool,
    long_running: bool,
    /// The caller's groups beyond the token (Entra overage), as the authorize phase saw them.
    membership: crate::authz::Membership,
    /// A browser's request through the portal's gateway: its streams end with the portal
    /// session and after the terminal's idle limit.
    web: Option<WebLimits>,
    /// Ends this request's own HTTP/2 stream alone, should its client stop reading a watch
    /// (src/conn_streams.rs); `None` on HTTP/1.1.
    own_stream: Option<crate::conn_streams::StreamEnd>,
}

#[derive(Clone, Copy)]
struct WebLimits {
    idle: std::time::Duration,
    /// Seconds since the epoch.
    session_ends: u64,
}

impl Ctx {
    /// The audit record's fields as of now (streams take a copy when they start).
    fn audit(&self) -> AuditBase {
        let mut a = self.base.clone();
        if let Some(c) = &self.cluster {
            a.annotations.insert("kube-relay.io/cluster", c.clone());
        }
        if let Some(p) = &self.principal {
            a.user = Some(
                p.memo
                    .audit_user
                    .get_or_init(|| Arc::new(audit_user(p)))
                    .clone(),
            );
            if let Some(uti) = p.claim("uti").or_else(|| p.claim("jti")) {
                // The token's id, for correlation with the IdP's sign-in logs; never the token.
                a.annotations
                    .insert("kube-relay.io/token-id", uti.to_owned());
            }
        }
        if let Some(info) = &self.info {
            a.verb = info.verb.clone();
            if info.is_resource {
                a.object_ref = Some(AuditObject {
                    resource: info.resource.clone(),
                    namespace: info.namespace.clone(),
                    name: info.name.clone(),
                    api_group: info.api_group.clone(),
                    subresource: info.subresource.clone(),
                });
            }
        }
        if let Some(n) = &self.nested {
            a.impersonated = Some(AuditUser::new(
                n.user.clone(),
                n.uid.clone(),
                n.groups.clone(),
                std::collections::BTreeMap::new(),
            ));
        }
        if self.admitted {
            a.annotations
                .insert("authorization.k8s.io/decision", "allow".into());
        }
        match &self.membership {
            crate::authz::Membership::Token => {}
            crate::authz::Membership::Resolved(groups) => {
                a.annotations.insert(
                    "kube-relay.io/group-overage",
                    format!("resolved: {} of the rules' groups", groups.len()),
                );
            }
            crate::authz::Membership::Unresolved(why) => {
                a.annotations
                    .insert("kube-relay.io/group-overage", format!("unresolved: {why}"));
            }
        }
        a
    }
}

/// Serves one request. Never fails: errors become Status responses here and only here.
/// `own_stream` ends this request's HTTP/2 stream alone, should it turn out a watch whose
/// client stops reading (`None` on HTTP/1.1).
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
    own_stream: Option<crate::conn_streams::StreamEnd>,
) -> Result<Response<RelayBody>, Infallible> {
    let start = Instant::now();
    let audit_id = headers::audit_id(req.headers());
    let method = req.method().clone();
    let is_upgrade = req.headers().contains_key(header::UPGRADE);
    let mut ctx = Ctx {
        base: audit_base(&req, &audit_id, conn.peer.ip()),
        own_stream,
        ..Ctx::default()
    };

    // audit.mode blocking with a failing sink: refused before any other work.
    let result = match state.audit.refusing() {
        Some(sink) => Err(ProxyError::AuditUnavailable {
            sink: sink.to_owned(),
        }),
        // Boxed: the phases' state machine is several KB, and hyper moves the request's future
        // into a new task for every HTTP/2 stream (callgrind: memcpy of it was a fifth of the
        // instructions per request); one allocation is far cheaper than those copies.
        None => Box::pin(phases(&state, &conn, req, &audit_id, &mut ctx)).await,
    };
    let mut audit = ctx.audit();
    let mut resp = match result {
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
            if let ProxyError::Forbidden(why) = &err {
                audit
                    .annotations
                    .insert("authorization.k8s.io/decision", "forbid".into());
                audit
                    .annotations
                    .insert("authorization.k8s.io/reason", why.clone());
            }
            if let ProxyError::StepUp { auth_context, .. } = &err {
                audit
                    .annotations
                    .insert("authorization.k8s.io/decision", "forbid".into());
                audit.annotations.insert(
                    "authorization.k8s.io/reason",
                    format!("step-up required: authentication context {auth_context}"),
                );
            }
            if let ProxyError::Unauthorized(why) = &err {
                // The failure class only (e.g. `signature`, `unknown_key`): never token content.
                audit.annotations.insert(
                    "kube-relay.io/authentication-failure",
                    why.failure.as_label().to_owned(),
                );
            }
            err.into_response()
        }
    };
    resp.headers_mut()
        .insert("audit-id", headers::wire_audit_id(&audit_id));
    if is_upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // A refused upgrade closes the client connection: whatever the client pipelined after
        // it is never read as another request (docs/security.md A1, A2).
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }

    let cluster = ctx.cluster.unwrap_or_default();
    let verb = audit.verb.to_ascii_uppercase();
    let code = resp.status().as_u16();
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            cluster: cluster.clone(),
            verb: verb.clone(),
            code,
        })
        .inc();
    let elapsed = start.elapsed();
    let streaming = ctx.long_running && (code == 101 || resp.status().is_success());
    if !streaming {
        state
            .metrics
            .duration
            .get_or_create(&DurationLabels {
                cluster: cluster.clone(),
                verb,
            })
            .observe(elapsed.as_secs_f64());
    }
    // Long-running streams get their ResponseComplete record when they close.
    let stage = if streaming {
        "ResponseStarted"
    } else {
        "ResponseComplete"
    };
    let written = state.audit.emit(
        &audit,
        stage,
        code,
        &[("kube-relay.io/latency-ms", elapsed.as_millis().to_string())],
    );
    if let Some(written) = written {
        // audit.mode blocking: no answer goes out without its record.
        if !written.wait().await {
            tracing::warn!(audit_id = ?audit_id, "audit record not written; answering 503 (audit.mode: blocking)");
            resp = ProxyError::AuditUnavailable {
                sink: state.audit.sink().to_owned(),
            }
            .into_response();
            resp.headers_mut().insert("audit-id", audit_id.clone());
            if is_upgrade {
                // A refused upgrade closes the connection (docs/security.md A1, A2).
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
    }
    access::log(&access::Line {
        audit_id: &audit_id,
        peer: conn.peer,
        method: &method,
        path: audit.request_uri.split('?').next().unwrap_or(""),
        cluster: &cluster,
        verb: &audit.verb,
        user: audit.user.as_ref().map(|u| u.username.as_str()),
        code,
        ms: elapsed.as_millis() as u64,
    });
    Ok(resp)
}

/// The audit record's request-side facts, known before any phase runs.
fn audit_base(
    req: &Request<Incoming>,
    audit_id: &HeaderValue,
    peer: std::net::IpAddr,
) -> AuditBase {
    let h = req.headers();
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    // Kubernetes builds sourceIPs from X-Forwarded-For, then the peer.
    let mut source_ips: Vec<String> = h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|ip| ip.trim().to_owned())
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .collect();
    source_ips.push(peer.to_string());
    let mut annotations = std::collections::BTreeMap::new();
    if let Some(cmd) = text("kubectl-command") {
        annotations.insert("kube-relay.io/kubectl-command", cmd);
    }
    if let Some(session) = text("kubectl-session") {
        annotations.insert("kube-relay.io/kubectl-session", session);
    }
    AuditBase {
        audit_id: audit_id.to_str().unwrap_or_default().to_owned(),
        request_uri: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
        verb: req.method().as_str().to_ascii_lowercase(),
        source_ips,
        user_agent: text("user-agent"),
        received: Some(std::time::SystemTime::now()),
        annotations,
        ..AuditBase::default()
    }
}

fn audit_user(p: &Principal) -> AuditUser {
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("kube-relay.io/issuer", vec![p.issuer.to_string()]);
    if let Some(oid) = &p.oid {
        extra.insert("oid", vec![oid.clone()]);
    }
    if let Some(tid) = p.claim("tid") {
        extra.insert("kube-relay.io/tid", vec![tid.to_owned()]);
    }
    if let Some(app) = &p.app_id {
        extra.insert("kube-relay.io/app-id", vec![app.clone()]);
    }
    AuditUser::new(p.username.clone(), p.oid.clone(), p.groups.clone(), extra)
}

/// The phases, in order. Returns early with the portal's answer for the relay's own pages.
async fn phases(
    state: &State,
    conn: &ConnCtx,
    req: Request<Incoming>,
    audit_id: &HeaderValue,
    ctx: &mut Ctx,
) -> Result<Response<RelayBody>, ProxyError> {
    // The stand-in for a request head the framing check refused (src/framing.rs).
    if let Some(why) = req.headers().get(crate::framing::REFUSED_HEADER) {
        return Err(ProxyError::BadRequest(crate::framing::refusal_message(
            why.to_str().unwrap_or("ambiguous framing"),
        )));
    }
    let mut req = req;
    let routed = match route(state, conn, &req)? {
        Route::Relay { path } => Err(path.to_owned()),
        Route::Cluster {
            cluster,
            upstream_target,
        } => Ok((cluster, upstream_target.to_path_and_query())),
    };
    let (cluster_name, target) = match routed {
        Ok(cluster_and_target) => cluster_and_target,
        // The portal's terminal and logs: admitted by session, origin and CSRF token, then the
        // cluster request they stand for goes through every phase below like kubectl's.
        Err(path) if path.starts_with(crate::portal::gateway::PREFIX) => {
            // The query carries the session's CSRF token: never in a record, even of a refusal.
            ctx.base.request_uri = path.clone();
            let web = crate::portal::gateway::admit(state, &mut req, &path).await?;
            ctx.base.request_uri = web.target.clone();
            ctx.base
                .annotations
                .insert("kube-relay.io/client", "web-terminal".to_owned());
            ctx.web = Some(WebLimits {
                idle: web.idle,
                session_ends: web.session_ends,
            });
            (web.cluster, web.target)
        }
        Err(path) => return crate::portal::handle(state, conn, req, &path).await,
    };
    ctx.cluster = Some(cluster_name.clone());
    check_headers(&req)?;
    let principal = authenticate(state, conn, &req, ctx).await?;
    let upstream = find_cluster(state, &cluster_name)?;
    let info = RequestInfo::parse(req.method(), &target);
    let admitted = authorize(state, upstream, &principal, &req, &info, ctx).await?;
    // audit.mode blocking: recorded before anything reaches the cluster.
    if state.audit.records_received() {
        let written = state.audit.emit_received(&ctx.audit());
        if !written.wait().await {
            return Err(ProxyError::AuditUnavailable {
                sink: state.audit.sink().to_owned(),
            });
        }
    }
    let up_headers = prepare_upstream(conn, upstream, &principal, &req, audit_id, ctx).await?;
    let up = Prepared {
        req,
        headers: up_headers,
        target: &target,
        info: &info,
    };
    dispatch(state, conn, upstream, admitted, &principal, up, ctx).await
}

/// Phase: route. Pure; malformed or contradictory names are refused before anything else.
fn route<'a>(
    state: &'a State,
    conn: &'a ConnCtx,
    req: &'a Request<Incoming>,
) -> Result<Route<'a>, ProxyError> {
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let uri_host = req.uri().authority().map(|a| a.as_str());
    let host_header = match req.headers().get(header::HOST) {
        Some(h) => Some(
            h.to_str()
                .map_err(|_| ProxyError::BadRequest("malformed Host header".into()))?,
        ),
        None => None,
    };
    route::resolve(
        &state.cfg.routing,
        &state.cfg.public_host,
        RouteInput {
            sni: conn.sni.as_deref(),
            hosts: [uri_host, host_header],
            target,
        },
    )
    .map_err(|e| match e {
        route::RouteError::BadRequest(m) => ProxyError::BadRequest(m.to_owned()),
        e @ (route::RouteError::Misdirected { .. } | route::RouteError::HostMismatch(_)) => {
            ProxyError::Misdirected(e.to_string())
        }
        e @ route::RouteError::NoCluster(_) => ProxyError::NotFound(e.to_string()),
    })
}

/// Phase: header checks that need no identity.
fn check_headers(req: &Request<Incoming>) -> Result<(), ProxyError> {
    if headers::total_size(req.headers()) > headers::MAX_HEADER_BYTES {
        return Err(ProxyError::HeaderTooLarge);
    }
    headers::reject_underscore_identity_headers(req.headers())
}

/// Phase: authenticate, then the caller's request rate.
async fn authenticate(
    state: &State,
    conn: &ConnCtx,
    req: &Request<Incoming>,
    ctx: &mut Ctx,
) -> Result<Arc<Principal>, ProxyError> {
    let principal = state.authenticate(conn.peer.ip(), req.headers()).await?;
    ctx.principal = Some(principal.clone());
    if let Err(wait) = state.identity_rate.take(principal.user_key()) {
        return Err(ProxyError::TooManyRequests {
            message: format!("too many requests from {}; slow down", principal.username),
            retry_after: wait.as_secs().max(1),
        });
    }
    Ok(principal)
}

/// Phase: find the cluster. After authentication, so anonymous callers cannot enumerate; a
/// cluster the probe found down answers at once instead of after the connect timeout.
fn find_cluster<'a>(state: &'a State, name: &str) -> Result<&'a Upstream, ProxyError> {
    let upstream = state.upstreams.get(name).ok_or_else(|| {
        ProxyError::NotFound(format!("cluster {name} is not served by this relay"))
    })?;
    if !upstream.health.is_up() {
        return Err(ProxyError::Upstream {
            cluster: name.to_owned(),
            failure: crate::error::UpstreamFailure::ConnectRefused,
            detail: upstream
                .health
                .last_error()
                .unwrap_or_else(|| "health probe failing".into()),
        });
    }
    Ok(upstream)
}

/// Phase: authorize. Nested impersonation (`kubectl --as`) is denied unless a rule allows it
/// (docs/security.md B2).
///
/// A token whose groups did not fit (Entra overage) has its membership resolved first, through
/// Graph when the issuer is configured for it; the answer is cached per user.
async fn authorize(
    state: &State,
    upstream: &Upstream,
    principal: &Principal,
    req: &Request<Incoming>,
    info: &RequestInfo,
    ctx: &mut Ctx,
) -> Result<Admitted, ProxyError> {
    ctx.info = Some(info.clone());
    let nested = headers::requested_impersonation(req.headers())?;
    let impersonating = nested.is_some();
    ctx.nested = nested;
    // Rules that do not need the groups (users, apps, roles) are tried first, so an overage
    // caller they admit costs no Graph call and does not wait on a Graph outage.
    let first = if principal.groups_overage {
        crate::authz::Membership::Unresolved("not resolved".into())
    } else {
        crate::authz::Membership::Token
    };
    let mut decision =
        crate::authz::authorize(principal, &upstream.cluster, info, impersonating, &first);
    if decision.is_err() && principal.groups_overage && upstream.cluster.has_group_rules() {
        let membership = state.groups.membership(principal).await;
        decision = crate::authz::authorize(
            principal,
            &upstream.cluster,
            info,
            impersonating,
            &membership,
        );
        ctx.membership = membership;
    }
    match decision {
        Ok(admitted) => {
            ctx.admitted = true;
            Ok(admitted)
        }
        Err(denied) => {
            state
                .metrics
                .denials
                .get_or_create(&crate::metrics::ClusterLabels {
                    cluster: upstream.cluster.name.to_string(),
                })
                .inc();
            Err(match denied {
                crate::authz::Denied::Forbidden(why) => ProxyError::Forbidden(why),
                crate::authz::Denied::StepUp {
                    auth_context,
                    message,
                } => ProxyError::StepUp {
                    auth_context,
                    message,
                },
            })
        }
    }
}

/// Phase: prepare upstream headers. The client's are sanitised first, then the cluster's
/// credential and the identity it carries are added.
async fn prepare_upstream(
    conn: &ConnCtx,
    upstream: &Upstream,
    principal: &Principal,
    req: &Request<Incoming>,
    audit_id: &HeaderValue,
    ctx: &Ctx,
) -> Result<http::HeaderMap, ProxyError> {
    let mut up_headers = headers::sanitize_request(req.headers());
    let authorization = upstream
        .credentials
        .authorization(principal)
        .await
        .map_err(|e| e.into_proxy_error(&upstream.cluster.name.to_string()))?;
    // In impersonate mode the relay speaks for the caller (or for whom a permitted `--as` names);
    // in the other modes a permitted `--as` travels with the caller's own credential, so the
    // cluster checks the caller's right to impersonate itself.
    // The cluster's `forward_groups` narrows the caller's own groups; the groups of a permitted
    // `--as` were asked for by name and admitted by a rule, so they go as asked.
    let nested;
    let (identity, groups) = match &ctx.nested {
        Some(n) => {
            nested = headers::identity_headers(n)
                .map_err(|why| ProxyError::Forbidden(why.to_owned()))?;
            (&nested[..], None)
        }
        None if upstream.credentials.impersonates() => (
            headers::own_identity_headers(principal)?,
            upstream.cluster.forward_groups.as_ref(),
        ),
        None => (&[][..], None),
    };
    headers::add_identity(&mut up_headers, authorization, identity, groups);
    headers::add_forwarding(&mut up_headers, req.headers(), &conn.peer_header, audit_id);
    Ok(up_headers)
}

/// A request ready to leave for its cluster.
struct Prepared<'a> {
    req: Request<Incoming>,
    /// Sanitised, with the cluster's credential and identity added.
    headers: http::HeaderMap,
    /// The upstream request-target (path and query).
    target: &'a str,
    info: &'a RequestInfo,
}

/// Phase: forward or upgrade. Takes the [`Admitted`] proof: nothing else sends to a cluster.
/// Long-running requests end when the caller's token does, plus grace (docs/security.md A6).
async fn dispatch(
    state: &State,
    conn: &ConnCtx,
    upstream: &Upstream,
    admitted: Admitted,
    principal: &Arc<Principal>,
    up: Prepared<'_>,
    ctx: &mut Ctx,
) -> Result<Response<RelayBody>, ProxyError> {
    let Prepared {
        mut req,
        headers: up_headers,
        target,
        info,
    } = up;
    let cluster_name = upstream.cluster.name.to_string();
    let impersonating = ctx.nested.is_some();
    let mut token_deadline = token_deadline(principal, state.cfg.timeouts.token_grace);
    let mut idle = state.cfg.timeouts.stream_idle;
    if let Some(web) = ctx.web {
        // A browser's stream ends with its portal session, and sooner when left idle.
        let left = web.session_ends.saturating_sub(crate::clock::unix_now());
        token_deadline = token_deadline.min(Instant::now() + std::time::Duration::from_secs(left));
        idle = idle.min(web.idle);
    }
    if let Some(kind) = upgrade::requested(&req, info)? {
        ctx.long_running = true;
        let client_upgrade = hyper::upgrade::on(&mut req);
        let guard = register_stream(
            state,
            principal,
            &cluster_name,
            info,
            impersonating,
            crate::streams::StreamKind::Tunnel,
            None,
        )?;
        let up = upgrade::UpgradeRequest {
            req,
            headers: up_headers,
            target,
            kind,
            client_upgrade,
            token_deadline,
            idle,
            // A terminal's keystrokes and resizes are small; nothing a browser sends needs more.
            max_client_frame: ctx.web.map(|_| 64 * 1024),
            audit: ctx.audit(),
            guard,
        };
        return upgrade::relay(state, upstream, admitted, up).await;
    }
    let query = target.split_once('?').map_or("", |(_, q)| q);
    ctx.long_running = info.is_long_running_read(query);
    let stream = if ctx.long_running {
        let guard = register_stream(
            state,
            principal,
            &cluster_name,
            info,
            impersonating,
            crate::streams::StreamKind::Watch,
            // A body the client stopped taking is let go with its h2 stream, or its HTTP/1.1
            // connection (src/streams.rs).
            Some(match ctx.own_stream.take() {
                Some(stream) => crate::streams::Stop::Stream(stream),
                None => crate::streams::Stop::Connection(conn.abort.clone()),
            }),
        )?;
        Some((ctx.audit(), token_deadline, idle, guard))
    } else {
        None
    };
    forward(state, upstream, admitted, req, up_headers, target, stream).await
}

/// Registers a long-running request, within the per-identity cap (scenario 9: one identity's
/// 2,000 watches must not starve the others).
fn register_stream(
    state: &State,
    p: &Arc<Principal>,
    cluster: &str,
    info: &RequestInfo,
    impersonating: bool,
    kind: crate::streams::StreamKind,
    stop: Option<crate::streams::Stop>,
) -> Result<crate::streams::StreamGuard, ProxyError> {
    state
        .streams
        .register(
            crate::streams::NewStream {
                principal: p.clone(),
                cluster: cluster.to_owned(),
                info: info.clone(),
                impersonating,
                kind,
                stop,
            },
            state.cfg.limits.per_identity_streams,
        )
        .ok_or_else(|| ProxyError::TooManyRequests {
            message: format!(
                "too many concurrent watches and sessions for {} (limit {}); close some and retry",
                p.username, state.cfg.limits.per_identity_streams
            ),
            retry_after: 5,
        })
}

/// When a long-running request by `p` must end: its token's expiry plus the grace period.
fn token_deadline(p: &Principal, grace: std::time::Duration) -> Instant {
    let left = p.expires_at.saturating_sub(crate::clock::unix_now());
    Instant::now() + std::time::Duration::from_secs(left) + grace
}

/// How many times a request the API server refused unprocessed is sent again.
const MAX_RESENDS: usize = 3;

/// Forwards a non-upgrade request over the cluster's pooled client and streams the answer back.
/// `stream` is set for long-running reads (watch, `logs -f`): their body gets an idle timeout,
/// the token deadline and a close hook that writes the audit record's ResponseComplete.
async fn forward(
    state: &State,
    upstream: &Upstream,
    _admitted: Admitted,
    req: Request<Incoming>,
    headers: http::HeaderMap,
    target: &str,
    stream: Option<(
        AuditBase,
        Instant,
        std::time::Duration,
        crate::streams::StreamGuard,
    )>,
) -> Result<Response<RelayBody>, ProxyError> {
    let cluster = upstream.cluster.name.to_string();
    let (parts, body) = req.into_parts();
    let uri = upstream
        .uri(target)
        .map_err(|e| ProxyError::BadRequest(format!("cannot forward this request-target: {e}")))?;
    // A client body that breaks mid-way (bad chunk framing, reset) is the client's fault: note
    // it so the failed exchange is reported as 400, not blamed on the cluster.
    let client_body_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = client_body_failed.clone();
    let pick = upstream.client.pick(stream.is_some());
    // A request without a body that may go over HTTP/2 can be sent again as it was: kept for a
    // stream the API server refused unprocessed (see `net::refused_unprocessed`).
    let replay = (pick.may_be_refused() && hyper::body::Body::is_end_stream(&body))
        .then(|| (parts.method.clone(), uri.clone(), headers.clone()));
    let body = body
        .map_err(move |e| {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            e
        })
        .boxed();
    let mut up_req = Request::new(body);
    *up_req.method_mut() = parts.method;
    *up_req.uri_mut() = uri;
    *up_req.headers_mut() = headers;
    // The pool picks h2 or http/1.1 by ALPN; pinning HTTP/1.1 here lets it decide.
    *up_req.version_mut() = http::Version::HTTP_11;

    let send = |req| {
        tokio::time::timeout(
            state.cfg.timeouts.response_header,
            upstream.client.send(&pick, req),
        )
    };
    // kube-apiserver's --goaway-chance (and any HTTP/2 server draining) refuses streams
    // opened after its GOAWAY, and the pool dials afresh. The fresh connection can itself be
    // told GOAWAY before this request leaves, so it is resent a few times, never more: each
    // resend is of a request the API server did not act on.
    let mut resp = send(up_req).await;
    if let Some((method, uri, headers)) = &replay {
        for _ in 0..MAX_RESENDS {
            match &resp {
                Ok(Err(e)) if crate::net::refused_unprocessed(e) => {}
                _ => break,
            }
            let mut again = Request::new(crate::net::empty_body());
            *again.method_mut() = method.clone();
            *again.uri_mut() = uri.clone();
            *again.headers_mut() = headers.clone();
            *again.version_mut() = http::Version::HTTP_11;
            state.metrics.upstream_retries.inc();
            resp = send(again).await;
        }
    }
    let resp = resp
        .map_err(|_| ProxyError::Upstream {
            cluster: cluster.clone(),
            failure: crate::error::UpstreamFailure::ResponseTimeout,
            detail: format!(
                "no response headers within {:?}",
                state.cfg.timeouts.response_header
            ),
        })?
        .map_err(|e| {
            if client_body_failed.load(std::sync::atomic::Ordering::Relaxed) {
                return ProxyError::BadRequest(
                    "the request body is malformed (invalid chunked framing or cut short)".into(),
                );
            }
            let (failure, detail) = crate::net::classify(&e);
            ProxyError::Upstream {
                cluster: cluster.clone(),
                failure,
                detail,
            }
        })?;
    let (mut parts, body) = resp.into_parts();
    headers::sanitize_response(&mut parts.headers);
    let body = match stream {
        Some((audit, deadline, idle, guard)) if parts.status.is_success() => {
            let gauge = state
                .metrics
                .longrunning
                .get_or_create(&LongRunningLabels {
                    cluster,
                    protocol: "watch",
                })
                .clone();
            gauge.inc();
            let log = state.audit.clone();
            let code = parts.status.as_u16();
            let close = OnClose::new(move |end| {
                gauge.dec();
                log.emit(
                    &audit,
                    "ResponseComplete",
                    code,
                    &[
                        ("kube-relay.io/protocol", "watch".into()),
                        ("kube-relay.io/bytes-to-client", end.bytes.to_string()),
                        ("kube-relay.io/close-reason", end.reason.as_str().to_owned()),
                    ],
                );
            });
            StreamBody::new(body, Some(idle), Some(deadline), Some(close))
                .stoppable(guard)
                .boxed()
        }
        _ => StreamBody::new(body, None, None, None)
            .holding(pick.into_slot())
            .boxed(),
    };
    Ok(Response::from_parts(parts, body))
}
