//! The simulated API server: listener, TLS with ALPN h2/http1.1, authentication and
//! impersonation like AKS, the record of every request, and dispatch to discovery, REST, watch,
//! logs, SelfSubjectReview and the streaming subresources.
//!
//! Request lifecycle (one function per step, in `handle`):
//! 1. authenticate the bearer token (static token or JWT), then apply `Impersonate-*` headers;
//! 2. push the request to the [`Record`] — before answering, rejected requests included;
//! 3. route: discovery and OpenAPI (`discovery`), resources (`rest`), exec/attach/
//!    port-forward (handed to [`crate::stream::handle`]), SelfSubjectReview;
//! 4. every failure leaves as a `metav1.Status` through `ApiError::into_response`.
//!
//! Invariants:
//! - Nothing panics on request data: no `unwrap` on anything a client sent.
//! - No timeout applies to streams (watch, logs -f, exec): only `timeoutSeconds` or the client
//!   going away ends them, as with kube-apiserver behind a relay.
//! - Authorization is "allow every authenticated user": the simulator models identity, not RBAC.
//!
//! Deliberate gaps (none matters to kubectl 1.27–1.33, the Python client or client-node):
//! protobuf request bodies (415) and protobuf answers (406, except the OpenAPI v2 document);
//! server-side apply (415, saying so); API groups other than core v1 and authentication (404
//! saying so: `kubectl create deployment` needs a real cluster); a watch with selectors does not turn MODIFIED into ADDED/DELETED
//! when an object starts or stops matching; pods run at once and are deleted at once; JSON
//! object keys come out sorted rather than in Go struct order. Against a real kube-apiserver
//! (tests/e2e/real_fidelity.rs) kube-sim also still serves SelfSubjectReview v1beta1, which 1.34
//! no longer does.

mod auth;
mod discovery;
mod kubelet;
mod openapi;
mod patch;
mod rest;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::record::{Record, RecordedRequest, UserInfo};
use crate::store::{Resource, Store, StoreError};
use crate::stream::{PodFiles, StreamKind, StreamTarget};
use crate::Body;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// === Public configuration and handle ===

/// One simulated cluster.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Cluster name: used for node names and in the `/version` build metadata.
    pub name: String,
    /// What `/version` reports, e.g. `v1.31.2`.
    pub git_version: String,
    pub auth: SimAuth,
}

impl SimConfig {
    /// A cluster reporting `v1.31.2` with no credentials configured (every request is 401).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            git_version: "v1.31.2".into(),
            auth: SimAuth::default(),
        }
    }
}

/// Who may call the cluster: static bearer tokens and trusted JWT issuers (AKS-style Entra).
#[derive(Clone, Debug, Default)]
pub struct SimAuth {
    pub static_tokens: Vec<StaticToken>,
    pub jwt: Vec<JwtIssuer>,
}

/// A bearer token that authenticates as `user`; `can_impersonate` grants `impersonate` on
/// users, groups, uids and user extras (what the relay's own identity needs).
#[derive(Clone, Debug)]
pub struct StaticToken {
    pub token: String,
    pub user: UserInfo,
    pub can_impersonate: bool,
}

/// A trusted JWT issuer: tokens must carry `iss` = `issuer`, an `aud` in `audiences`, and be
/// signed (RS256 or ES256) by the key in `jwks` named by their `kid`.
#[derive(Clone, Debug)]
pub struct JwtIssuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: jsonwebtoken::jwk::JwkSet,
}

/// A running simulator. Dropping it does not stop the server: call [`SimHandle::shutdown`].
pub struct SimHandle {
    pub addr: SocketAddr,
    /// Every request received, in arrival order.
    pub record: Record,
    store: Arc<Store>,
    cancel: CancellationToken,
    open_streams: Arc<AtomicUsize>,
}

impl SimHandle {
    /// Stops accepting, closes every connection and ends every watch and log stream.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// The object store, for tests that change cluster state behind the API's back.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Watch and `logs -f` responses still streaming. Tests use it to check that a stream ends
    /// once its client (or a relay in between) goes away.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::SeqCst)
    }
}

/// rustls `ServerConfig` for the simulator with ALPN `["h2", "http/1.1"]`.
pub fn tls_config(leaf: &crate::pki::LeafCert) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("leaf certificate PEM: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("leaf key PEM: {e}"))?;
    // The provider is explicit so a process that links several providers never panics on an
    // ambiguous default (rustls #2070).
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves on `listener` (TLS when `tls` is `Some`, else plain HTTP) until
/// [`SimHandle::shutdown`]. Returns once listening.
pub async fn start(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: SimConfig,
) -> anyhow::Result<SimHandle> {
    start_mode(listener, tls, cfg, Mode::ApiServer)
}

/// Serves the kubelet's streaming and log endpoints (see the `kubelet` module) until
/// [`SimHandle::shutdown`], for a real kube-apiserver whose Node points here. `cfg.auth` is not
/// used: the API server is the only caller.
pub async fn start_kubelet(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: SimConfig,
) -> anyhow::Result<SimHandle> {
    start_mode(listener, tls, cfg, Mode::Kubelet)
}

/// Which server a simulator plays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    ApiServer,
    Kubelet,
}

fn start_mode(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: SimConfig,
    mode: Mode,
) -> anyhow::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let record = Record::default();
    let store = Arc::new(Store::seeded(&cfg.name));
    let open_streams = Arc::new(AtomicUsize::new(0));
    let state = Arc::new(State {
        mode,
        discovery: discovery::Documents::new(&cfg.git_version),
        cfg,
        record: record.clone(),
        store: store.clone(),
        files: PodFiles::default(),
        cancel: cancel.clone(),
        open_streams: open_streams.clone(),
    });
    tokio::spawn(accept_loop(
        listener,
        tls.map(tokio_rustls::TlsAcceptor::from),
        state,
    ));
    Ok(SimHandle {
        addr,
        record,
        store,
        cancel,
        open_streams,
    })
}

// === Connections ===

/// Everything a request handler may need; one per simulator.
struct State {
    mode: Mode,
    cfg: SimConfig,
    record: Record,
    store: Arc<Store>,
    /// Files "inside" pods, shared by every exec so `kubectl cp` round-trips.
    files: PodFiles,
    discovery: discovery::Documents,
    /// Cancelled by shutdown; long-running responses watch it too.
    cancel: CancellationToken,
    /// How many watch / log-follow streams are running (see [`StreamGuard`]).
    open_streams: Arc<AtomicUsize>,
}

impl State {
    /// Counts a streaming response until the guard is dropped (when its task ends).
    fn stream_guard(&self) -> StreamGuard {
        self.open_streams.fetch_add(1, Ordering::SeqCst);
        StreamGuard(self.open_streams.clone())
    }
}

/// Held by each streaming task; dropping it uncounts the stream.
struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    loop {
        let accepted = tokio::select! {
            _ = state.cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "kube-sim accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (tls, state) = (tls.clone(), state.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_connection(tcp, state).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => serve_connection(tls, state).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "kube-sim TLS handshake failed"),
                        Err(_) => tracing::debug!("kube-sim TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// HTTP/1.1 or h2 (hyper-util picks by the connection preface, which matches ALPN); upgrades
/// (exec, attach, port-forward) arrive on HTTP/1.1.
async fn serve_connection<I>(io: I, state: Arc<State>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cancel = state.cancel.clone();
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(error = %e, "kube-sim connection ended with an error");
        },
        _ = cancel.cancelled() => {}
    }
}

// === Request path ===

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let identity = match state.mode {
        Mode::ApiServer => auth::authenticate(&state.cfg.auth, req.headers()),
        // The API server is the kubelet's only caller (see the kubelet module).
        Mode::Kubelet => Ok(UserInfo {
            username: "kube-apiserver".into(),
            ..UserInfo::default()
        }),
    };
    state.record.push(RecordedRequest {
        method: req.method().to_string(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
        version: req.version(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        user: identity.as_ref().ok().cloned(),
    });
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let username = identity.as_ref().ok().map(|u| u.username.clone());
    let mut response = match identity {
        Ok(_) if state.mode == Mode::Kubelet => kubelet::handle(&state, req).await,
        Ok(user) => route(&state, req, user)
            .await
            .unwrap_or_else(ApiError::into_response),
        Err(e) => e.into_response(),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), user = ?username, "kube-sim request");
    if state.mode == Mode::Kubelet {
        return response;
    }
    // kube-apiserver stamps every answer with an audit ID and forbids shared caching.
    let headers = response.headers_mut();
    if let Ok(id) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        headers.insert("audit-id", id);
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-cache, private"));
    response
}

async fn route(
    state: &Arc<State>,
    req: Request<Incoming>,
    user: UserInfo,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["apis", "authentication.k8s.io", version @ ("v1" | "v1beta1"), "selfsubjectreviews"] => {
            self_subject_review(&req, version, &user)
        }
        ["api", "v1", "namespaces", ns, "pods", pod, sub @ ("exec" | "attach" | "portforward")] => {
            let kind = match *sub {
                "exec" => StreamKind::Exec,
                "attach" => StreamKind::Attach,
                _ => StreamKind::PortForward,
            };
            if state.store.get(Resource::Pods, Some(ns), pod).is_none() {
                return Err(StoreError::NotFound {
                    resource: Resource::Pods,
                    name: (*pod).to_owned(),
                }
                .into());
            }
            let target = StreamTarget {
                kind,
                namespace: (*ns).to_owned(),
                pod: (*pod).to_owned(),
                query: req.uri().query().map(str::to_owned),
                files: state.files.clone(),
            };
            Ok(crate::stream::handle(req, target).await)
        }
        ["api", "v1", rest @ ..] if !rest.is_empty() => {
            let target = rest::Target::parse(rest).ok_or_else(ApiError::path_not_found)?;
            rest::serve(state, req, target).await
        }
        // A resource of an API group the simulator does not serve (apps/v1 deployments, ...):
        // a 404 that says why, which kubectl prints ("failed to create deployment: ...").
        ["apis", group, _version, _, ..] if *group != "authentication.k8s.io" => {
            Err(ApiError::not_simulated(group))
        }
        // Everything else is answered from static documents, or is a 404.
        _ => discovery::serve(&state.discovery, &req, &segments),
    }
}

/// `POST /apis/authentication.k8s.io/{v1,v1beta1}/selfsubjectreviews`: echoes the effective
/// identity (after impersonation), which is what `kubectl auth whoami` prints.
fn self_subject_review(
    req: &Request<Incoming>,
    version: &str,
    user: &UserInfo,
) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::POST {
        return Err(ApiError::method_not_allowed());
    }
    let body = json!({
        "kind": "SelfSubjectReview",
        "apiVersion": format!("authentication.k8s.io/{version}"),
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": user},
    });
    Ok(json_response(StatusCode::CREATED, &body))
}

// === Errors and responses ===

/// A `metav1.Status` failure: the only shape in which errors leave the simulator.
#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    /// `details` of the Status (name, kind, group), when kube-apiserver fills them.
    details: Option<Value>,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, name: &str, kind: &str, group: &str) -> Self {
        let mut details = json!({"name": name, "kind": kind});
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        self.details = Some(details);
        self
    }

    fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
    }

    fn path_not_found() -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
        e.details = Some(json!({}));
        e
    }

    fn not_simulated(group: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "the server could not find the requested resource: kube-sim simulates only core v1 pods, configmaps, namespaces and events; {group} resources need a real cluster behind the relay"
            ),
        );
        e.details = Some(json!({}));
        e
    }

    fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("Internal error occurred: {message}"),
        )
    }

    fn not_acceptable() -> Self {
        Self::new(
            StatusCode::NOT_ACCEPTABLE,
            "NotAcceptable",
            "only the following media types are accepted: application/json",
        )
    }

    fn unsupported_media_type(accepted: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: {accepted}"),
        )
    }

    /// The Status object itself (also the `object` of a watch `ERROR` event).
    fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn into_response(self) -> Response<Body> {
        json_response(self.code, &self.to_status())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::NotFound { resource, name } => Self::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                message,
            )
            .with_details(&name, resource.plural(), ""),
            StoreError::AlreadyExists { resource, name } => Self::new(
                StatusCode::CONFLICT,
                "AlreadyExists",
                message,
            )
            .with_details(&name, resource.plural(), ""),
            StoreError::Conflict { resource, name } => Self::new(
                StatusCode::CONFLICT,
                "Conflict",
                message,
            )
            .with_details(&name, resource.plural(), ""),
            StoreError::Invalid {
                resource,
                name,
                message: cause,
            } => {
                // kubectl prints an Invalid error from its causes: `field: Type: detail`.
                let (field, detail) = cause.split_once(": ").unwrap_or(("", cause.as_str()));
                let reason = match detail.split(':').next().unwrap_or_default() {
                    "Required value" => "FieldValueRequired",
                    "Forbidden" => "FieldValueForbidden",
                    _ => "FieldValueInvalid",
                };
                let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
                    .with_details(&name, resource.kind(), "");
                if let Some(details) = e.details.as_mut() {
                    details["causes"] =
                        json!([{"reason": reason, "message": detail, "field": field}]);
                }
                e
            }
            StoreError::Forbidden { resource, name, .. } => Self::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                message,
            )
            .with_details(&name, resource.plural(), ""),
            StoreError::BadRequest(_) => Self::bad_request(message),
            StoreError::Expired { .. } => Self::new(StatusCode::GONE, "Expired", message),
        }
    }
}

fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// JSON with a trailing newline, as kube-apiserver's encoder writes it.
fn json_bytes(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes.into()
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    bytes_response(code, "application/json", json_bytes(value))
}

fn bytes_response(code: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = code;
    if let Ok(ct) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
}

// === Request helpers ===

/// Decoded query parameters (`+` is a space, `%XX` decoded), in order.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Self {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        Self(
            raw.unwrap_or_default()
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Go's `strconv.ParseBool`, which kube-apiserver uses for boolean parameters; anything
    /// else (or absence) is false.
    fn flag(&self, key: &str) -> bool {
        matches!(
            self.get(key),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }
}

/// One entry of an `Accept` header: `type/subtype` and its parameters (keys lower-cased).
#[derive(Debug, PartialEq, Eq)]
struct MediaRange {
    essence: String,
    params: BTreeMap<String, String>,
}

impl MediaRange {
    fn parse_list(header: &str) -> Vec<MediaRange> {
        header
            .split(',')
            .filter_map(|part| {
                let mut pieces = part.split(';').map(str::trim);
                let essence = pieces.next()?.to_ascii_lowercase();
                if essence.is_empty() {
                    return None;
                }
                let params = pieces
                    .filter_map(|p| p.split_once('='))
                    .map(|(k, v)| {
                        (
                            k.trim().to_ascii_lowercase(),
                            v.trim().trim_matches('"').to_owned(),
                        )
                    })
                    .collect();
                Some(MediaRange { essence, params })
            })
            .collect()
    }

    /// Whether this range accepts plain `application/json`.
    fn accepts_json(&self) -> bool {
        matches!(
            self.essence.as_str(),
            "application/json" | "application/*" | "*/*"
        )
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
}

fn accept_header(req: &Request<Incoming>) -> Vec<MediaRange> {
    let accept = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    if accept.trim().is_empty() {
        return vec![MediaRange {
            essence: "*/*".into(),
            params: BTreeMap::new(),
        }];
    }
    MediaRange::parse_list(&accept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding_and_flags() {
        let q = Query::parse(Some(
            "watch=1&labelSelector=app%3Dweb&x=a+b&empty&fieldSelector=metadata.name%3Dweb-0",
        ));
        assert!(q.flag("watch"));
        assert!(!q.flag("empty"));
        assert!(!q.flag("missing"));
        assert_eq!(q.get("labelSelector"), Some("app=web"));
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(q.get("fieldSelector"), Some("metadata.name=web-0"));
        assert!(Query::parse(None).0.is_empty());
        assert!(Query::parse(Some("%zz=%")).get("%zz").is_some());
    }

    #[test]
    fn accept_parsing() {
        let list = MediaRange::parse_list(
            "application/json;as=Table;v=v1;g=meta.k8s.io, application/json ;q=0.9, ,",
        );
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].param("as"), Some("Table"));
        assert_eq!(list[0].param("g"), Some("meta.k8s.io"));
        assert!(list[1].accepts_json());
    }

    #[test]
    fn status_shape() {
        let e: ApiError = StoreError::NotFound {
            resource: crate::store::Resource::Pods,
            name: "x".into(),
        }
        .into();
        assert_eq!(
            e.to_status(),
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "pods \"x\" not found", "reason": "NotFound",
                   "details": {"name": "x", "kind": "pods"}, "code": 404})
        );
        let e: ApiError = StoreError::AlreadyExists {
            resource: crate::store::Resource::ConfigMaps,
            name: "c".into(),
        }
        .into();
        assert_eq!(e.code, StatusCode::CONFLICT);
        assert_eq!(e.to_status()["reason"], "AlreadyExists");
    }

    // === End-to-end over a real socket (plain HTTP; h2 by prior knowledge) ===

    use http_body_util::Empty;
    use tokio::net::TcpStream;

    async fn sim(auth: SimAuth) -> SimHandle {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = SimConfig::new("alpha");
        cfg.auth = auth;
        start(listener, None, cfg).await.unwrap()
    }

    fn static_auth() -> SimAuth {
        let token = |token: &str, user: &str, can_impersonate| StaticToken {
            token: token.into(),
            user: UserInfo {
                username: user.into(),
                ..Default::default()
            },
            can_impersonate,
        };
        SimAuth {
            static_tokens: vec![token("t", "alice", false), token("relay", "relay", true)],
            jwt: Vec::new(),
        }
    }

    fn get(path: &str, token: Option<&str>) -> http::request::Builder {
        let b = Request::get(path).header(header::HOST, "sim");
        match token {
            Some(t) => b.header(header::AUTHORIZATION, format!("Bearer {t}")),
            None => b,
        }
    }

    /// Sends one request on a fresh HTTP/1.1 connection; returns the response with its body
    /// still streaming.
    async fn send_h1(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    }

    async fn body_json(resp: Response<Incoming>) -> Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn req(b: http::request::Builder) -> Request<Full<Bytes>> {
        b.body(Full::new(Bytes::new())).unwrap()
    }

    #[tokio::test]
    async fn rejected_requests_are_recorded_exactly() {
        let sim = sim(static_auth()).await;
        let resp = send_h1(
            sim.addr,
            req(get("/api/v1/pods?limit=1&x=%41", None).header("X-Custom", "v")),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().contains_key("audit-id"));
        let status = body_json(resp).await;
        assert_eq!(status["reason"], "Unauthorized");
        assert_eq!(status["kind"], "Status");
        let rec = sim.record.all();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].path_and_query, "/api/v1/pods?limit=1&x=%41");
        assert_eq!(rec[0].method, "GET");
        assert_eq!(rec[0].version, http::Version::HTTP_11);
        assert_eq!(rec[0].header("x-custom"), Some("v"));
        assert!(rec[0].headers.iter().any(|(n, _)| n == "x-custom"));
        assert!(rec[0].user.is_none());
        sim.shutdown();
    }

    #[tokio::test]
    async fn impersonation_reaches_self_subject_review_and_record() {
        let sim = sim(static_auth()).await;
        let r = Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
            .header(header::HOST, "sim")
            .header(header::AUTHORIZATION, "Bearer relay")
            .header("Impersonate-User", "bob@example.com")
            .header("Impersonate-Group", "devs")
            .header("Impersonate-Extra-oid", "o-1")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let resp = send_h1(sim.addr, r).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let review = body_json(resp).await;
        assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(review["status"]["userInfo"]["username"], "bob@example.com");
        assert_eq!(
            review["status"]["userInfo"]["groups"],
            json!(["devs", "system:authenticated"])
        );
        assert_eq!(review["status"]["userInfo"]["extra"]["oid"], json!(["o-1"]));
        let user = sim.record.all()[0].user.clone().unwrap();
        assert_eq!(user.username, "bob@example.com");
        let denied = send_h1(
            sim.addr,
            req(get("/api/v1/pods", Some("t")).header("Impersonate-User", "bob")),
        )
        .await;
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        assert!(sim.record.all()[1].user.is_none());
    }

    #[tokio::test]
    async fn jwt_bearer_tokens() {
        let issuer = crate::issuer::DevIssuer::generate(
            "https://login.example/tenant/v2.0",
            crate::issuer::KeyAlg::Rs256,
        )
        .unwrap();
        let auth = SimAuth {
            static_tokens: Vec::new(),
            jwt: vec![JwtIssuer {
                issuer: issuer.issuer_url(),
                audiences: vec!["kube".into()],
                jwks: issuer.jwks(),
            }],
        };
        let sim = sim(auth).await;
        let whoami = |token: String| {
            let r = Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
                .header(header::HOST, "sim")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            send_h1(sim.addr, r)
        };
        let good = issuer.mint(json!({"aud": "kube", "sub": "s-1", "oid": "o-1", "upn": "ann@example.com", "groups": ["g1"]}));
        let review = body_json(whoami(good).await).await;
        let info = &review["status"]["userInfo"];
        assert_eq!(info["username"], "ann@example.com");
        assert_eq!(info["groups"], json!(["g1", "system:authenticated"]));
        assert_eq!(info["extra"], json!({"oid": ["o-1"]}));
        assert!(info.get("uid").is_none());
        let app = issuer.mint(json!({"aud": "kube", "sub": "s-2", "oid": "o-2"}));
        assert_eq!(
            body_json(whoami(app).await).await["status"]["userInfo"]["username"],
            "o-2"
        );
        let now = crate::store::now_unix();
        for bad in [
            issuer.mint(json!({"aud": "other", "sub": "s"})),
            issuer.mint(json!({"aud": "kube", "sub": "s", "exp": now - 5})),
            issuer.mint(json!({"aud": "kube", "sub": "s", "nbf": now + 3600})),
            issuer.mint(json!({"aud": "kube", "sub": "s", "iss": "https://evil"})),
            issuer.mint(json!({"aud": "kube", "sub": "s", "exp": null})),
            "not.a.jwt".to_owned(),
        ] {
            assert_eq!(whoami(bad).await.status(), StatusCode::UNAUTHORIZED);
        }
        // A key the issuer no longer publishes (unknown kid) is rejected too.
        issuer.rotate(crate::issuer::KeyAlg::Es256).unwrap();
        let unknown_kid = issuer.mint(json!({"aud": "kube", "sub": "s"}));
        assert_eq!(whoami(unknown_kid).await.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn aggregated_discovery_content_type_and_etag() {
        let sim = sim(static_auth()).await;
        let accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        let resp = send_h1(
            sim.addr,
            req(get("/apis", Some("t")).header(header::ACCEPT, accept)),
        )
        .await;
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
        );
        let etag = resp.headers()[header::ETAG].clone();
        assert_eq!(body_json(resp).await["kind"], "APIGroupDiscoveryList");
        let again = send_h1(
            sim.addr,
            req(get("/apis", Some("t"))
                .header(header::ACCEPT, accept)
                .header(header::IF_NONE_MATCH, etag)),
        )
        .await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        let legacy = send_h1(sim.addr, req(get("/api", Some("t")))).await;
        assert_eq!(body_json(legacy).await["kind"], "APIVersions");
        let version = send_h1(sim.addr, req(get("/version", Some("t")))).await;
        assert_eq!(body_json(version).await["gitVersion"], "v1.31.2");
        let missing = send_h1(
            sim.addr,
            req(get(
                "/api/v1/namespaces/default/pods/nope/exec?command=ls",
                Some("t"),
            )),
        )
        .await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            body_json(missing).await["message"],
            "pods \"nope\" not found"
        );
    }

    #[tokio::test]
    async fn watch_streams_chunked_events() {
        let sim = sim(static_auth()).await;
        let resp = send_h1(
            sim.addr,
            req(get(
                "/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=10",
                Some("t"),
            )),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::TRANSFER_ENCODING], "chunked");
        let mut body = resp.into_body();
        sim.store()
            .create(
                crate::store::Resource::ConfigMaps,
                Some("default"),
                json!({"metadata": {"name": "w"}}),
                false,
            )
            .unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(frame.data_ref().unwrap()).unwrap();
        assert_eq!(event["type"], "ADDED");
        assert_eq!(event["object"]["metadata"]["name"], "w");
        assert_eq!(event["object"]["kind"], "ConfigMap");
        // A too-old resourceVersion: 200, then one ERROR event with a 410 Status.
        let rv = sim.store().resource_version();
        for i in 0..1005 {
            sim.store()
                .create(
                    crate::store::Resource::ConfigMaps,
                    Some("default"),
                    json!({"metadata": {"name": format!("c{i}")}}),
                    false,
                )
                .unwrap();
        }
        let old = send_h1(
            sim.addr,
            req(get(
                &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}"),
                Some("t"),
            )),
        )
        .await;
        assert_eq!(old.status(), StatusCode::OK);
        let event = body_json(old).await;
        assert_eq!(event["type"], "ERROR");
        assert_eq!(event["object"]["code"], 410);
        assert_eq!(event["object"]["reason"], "Expired");
    }

    /// Waits (bounded) until the simulator has no stream running.
    async fn streams_end(sim: &SimHandle) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while sim.open_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("a stream kept running after its client went away");
    }

    #[tokio::test]
    async fn streams_end_when_the_client_goes_away() {
        let sim = sim(static_auth()).await;
        for path in [
            "/api/v1/namespaces/default/pods?watch=true",
            "/api/v1/namespaces/default/pods/web-0/log?follow=true",
        ] {
            let resp = send_h1(sim.addr, req(get(path, Some("t")))).await;
            let mut body = resp.into_body();
            let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap();
            assert!(first.is_some_and(|f| f.is_ok()), "{path}");
            assert_eq!(sim.open_streams(), 1, "{path}");
            drop(body); // closes the connection: the client is gone
            streams_end(&sim).await;
        }
        // Shutdown ends streams too.
        let resp = send_h1(
            sim.addr,
            req(get(
                "/api/v1/namespaces/default/pods/web-0/log?follow=1",
                Some("t"),
            )),
        )
        .await;
        assert_eq!(sim.open_streams(), 1);
        sim.shutdown();
        streams_end(&sim).await;
        drop(resp);
    }

    #[tokio::test]
    async fn logs_follow_streams_new_lines() {
        let sim = sim(static_auth()).await;
        let resp = send_h1(
            sim.addr,
            req(get(
                "/api/v1/namespaces/default/pods/web-0/log?follow=true&tailLines=1",
                Some("t"),
            )),
        )
        .await;
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/plain");
        let mut body = resp.into_body();
        let mut text = String::new();
        while !text.contains("web-0 line 7\n") {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            text.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        }
        assert!(text.starts_with("web-0 line 5\nweb-0 line 6\n"), "{text}");
        // The log ends when the pod goes away.
        sim.store()
            .delete(
                crate::store::Resource::Pods,
                Some("default"),
                "web-0",
                false,
            )
            .unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .unwrap();
        assert!(rest.is_ok());
        streams_end(&sim).await;
    }

    #[tokio::test]
    async fn http2_table_list() {
        let sim = sim(static_auth()).await;
        let io = TokioIo::new(TcpStream::connect(sim.addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let r = Request::get(format!("http://{}/api/v1/namespaces/default/pods?limit=2", sim.addr))
            .header(header::AUTHORIZATION, "Bearer t")
            .header(header::ACCEPT, "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(r).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let table = body_json(resp).await;
        assert_eq!(table["kind"], "Table");
        assert_eq!(table["rows"].as_array().map(Vec::len), Some(2));
        assert!(table["metadata"]["continue"].is_string());
        assert_eq!(table["metadata"]["remainingItemCount"], 1);
        assert_eq!(sim.record.all()[0].version, http::Version::HTTP_2);
        assert_eq!(
            sim.record.all()[0].path_and_query,
            "/api/v1/namespaces/default/pods?limit=2"
        );
    }
}
