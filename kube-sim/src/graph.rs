//! A loopback stand-in for Microsoft Graph's `checkMemberGroups` action, for tests of a relay
//! that resolves Entra group overage (a token carrying `_claim_names.groups` instead of
//! `groups`) through Graph. Nothing here talks to the internet.
//!
//! Served: `POST /v1.0/{users|servicePrincipals|directoryObjects}/{id}/checkMemberGroups`
//! (segment names matched case-insensitively as Graph does; the bound-action form
//! `microsoft.graph.checkMemberGroups` is accepted too), with a JSON body
//! `{"groupIds": ["<guid>", ...]}` (1 to 20 ids, Graph's limit per call). The answer is Graph's:
//! `{"@odata.context": "...#Collection(Edm.String)", "value": [<the requested ids the object
//! is a transitive member of, in request order>]}`.
//!
//! Checked, in Graph's order of concerns, after the [failure switch](GraphHandle::set_failure):
//! - the bearer token: signature by [`GraphConfig::token_signer`] (the key named by `kid`, in
//!   that key's algorithm: RS256 for Entra-shaped signers), `aud` == [`GraphConfig::audience`],
//!   `tid` == [`GraphConfig::tenant`], `exp` present and not passed (no leeway), `nbf` if present
//!   → else 401 `InvalidAuthenticationToken`;
//! - the body: `Content-Type: application/json` and a well-formed `groupIds` → else 400;
//! - the object: a user id under `/users`, a service principal id under `/servicePrincipals`,
//!   either under `/directoryObjects` → else 404 `Request_ResourceNotFound`.
//!
//! Every answer carries Graph's `request-id` and `client-request-id` (the client's own when it
//! sent one) headers and its OData JSON content type; errors have Graph's
//! `{"error": {"code", "message", "innerError": {"date", "request-id", "client-request-id"}}}`
//! shape. Every request to a `checkMemberGroups` path is recorded ([`GraphHandle::requests`])
//! before it is answered, including ones held by [`GraphFailure::Hang`] (status 0).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::KeyAlgorithm;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::issuer::DevIssuer;

/// Graph's resource URI: the default audience of the tokens it accepts.
pub const GRAPH_AUDIENCE: &str = "https://graph.microsoft.com";
/// Graph's limit on `groupIds` per `checkMemberGroups` call.
pub const MAX_GROUP_IDS: usize = 20;
const ODATA_CONTEXT: &str = "https://graph.microsoft.com/v1.0/$metadata#Collection(Edm.String)";
const ODATA_JSON: &str = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8";
const AGS_DIAGNOSTIC: &str = r#"{"ServerInfo":{"DataCenter":"Loopback","Slice":"E","Ring":"0","ScaleUnit":"000","RoleInstance":"kube-sim"}}"#;
const WWW_AUTHENTICATE: &str = r#"Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000""#;
const MAX_BODY: usize = 64 * 1024;

/// What the stand-in accepts.
#[derive(Clone)]
pub struct GraphConfig {
    /// Verifies the bearer token's signature (the token endpoint's signer in tests).
    pub token_signer: DevIssuer,
    /// Required `aud` of the bearer token, e.g. "https://graph.microsoft.com".
    pub audience: String,
    /// Required `tid` of the bearer token.
    pub tenant: String,
}

impl GraphConfig {
    /// Tokens for [`GRAPH_AUDIENCE`] in `tenant`, signed by `token_signer`.
    pub fn new(tenant: &str, token_signer: DevIssuer) -> Self {
        Self {
            token_signer,
            audience: GRAPH_AUDIENCE.to_owned(),
            tenant: tenant.to_owned(),
        }
    }
}

impl std::fmt::Debug for GraphConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphConfig")
            .field("token_signer", &self.token_signer)
            .field("audience", &self.audience)
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// How the stand-in answers every `checkMemberGroups` request until reset to `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GraphFailure {
    /// Answer normally.
    #[default]
    None,
    /// 429 `TooManyRequests` with `Retry-After: <retry_after_secs>`.
    Throttle { retry_after_secs: u64 },
    /// 503 `serviceNotAvailable`.
    ServerError,
    /// Never answer: the request is held until [`GraphHandle::shutdown`], which drops the
    /// connection.
    Hang,
}

/// One `checkMemberGroups` request as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphRequest {
    /// `"users"`, `"servicePrincipals"` or `"directoryObjects"` (canonical spelling, whatever
    /// case the client used).
    pub kind: String,
    /// The object id from the path, percent-decoded, as sent.
    pub id: String,
    /// The body's `groupIds` strings as sent (empty when the body did not parse).
    pub group_ids: Vec<String>,
    /// The status answered; 0 for a request held by [`GraphFailure::Hang`].
    pub status: u16,
}

/// A running stand-in. Dropping it does not stop the server; call [`shutdown`](Self::shutdown).
pub struct GraphHandle {
    pub addr: SocketAddr,
    state: Arc<State>,
    cancel: CancellationToken,
}

impl GraphHandle {
    /// Transitive memberships of a user (kind "users"); replaces any earlier set. A user with no
    /// groups still exists (answers 200 with an empty `value`).
    pub fn set_user_groups(&self, oid: &str, groups: &[&str]) {
        lock(&self.state.directory)
            .users
            .insert(oid.to_ascii_lowercase(), lowercase_all(groups));
    }

    /// Transitive memberships of a service principal (kind "servicePrincipals"); replaces any
    /// earlier set.
    pub fn set_service_principal_groups(&self, oid: &str, groups: &[&str]) {
        lock(&self.state.directory)
            .service_principals
            .insert(oid.to_ascii_lowercase(), lowercase_all(groups));
    }

    /// Applies to every request from now on until reset to [`GraphFailure::None`]. Requests
    /// already held by [`GraphFailure::Hang`] stay held.
    pub fn set_failure(&self, f: GraphFailure) {
        *lock(&self.state.failure) = f;
    }

    /// Every checkMemberGroups request received, answered or not, in order.
    pub fn requests(&self) -> Vec<GraphRequest> {
        lock(&self.state.log).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.state.log).len()
    }

    /// Waits (bounded by `timeout`, on tokio's clock) until at least `n` requests have arrived;
    /// returns whether they did.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let mut count = self.state.count.subscribe();
        // `wait_for` returns a read guard on the channel: drop it at once.
        let reached = async move { count.wait_for(|c| *c >= n).await.is_ok() };
        tokio::time::timeout(timeout, reached)
            .await
            .unwrap_or(false)
    }

    /// Stops accepting and closes every open connection (held requests are dropped).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for GraphHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Directory {
    /// Lowercased object id → lowercased group ids.
    users: HashMap<String, Vec<String>>,
    service_principals: HashMap<String, Vec<String>>,
}

struct State {
    cfg: GraphConfig,
    /// `std` locks: never held across an await, every critical section a few reads or one push.
    directory: Mutex<Directory>,
    failure: Mutex<GraphFailure>,
    log: Mutex<Vec<GraphRequest>>,
    /// The log's length, for [`GraphHandle::wait_for_requests`].
    count: watch::Sender<usize>,
    cancel: CancellationToken,
}

impl State {
    fn record(&self, request: GraphRequest) {
        let len = {
            let mut log = lock(&self.log);
            log.push(request);
            log.len()
        };
        self.count.send_modify(|c| *c = (*c).max(len));
    }
}

/// A panic while holding one of these locks cannot leave its data half-updated (each write is
/// one insert, push or store), so a poisoned lock is still safe to use.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lowercase_all(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|g| g.to_ascii_lowercase()).collect()
}

/// Serves the stand-in on `listener`, over TLS when `tls` is given, else plain HTTP.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: GraphConfig,
) -> anyhow::Result<GraphHandle> {
    let addr = listener.local_addr().context("listener address")?;
    let cancel = CancellationToken::new();
    let state = Arc::new(State {
        cfg,
        directory: Mutex::new(Directory::default()),
        failure: Mutex::new(GraphFailure::None),
        log: Mutex::new(Vec::new()),
        count: watch::Sender::new(0),
        cancel: cancel.clone(),
    });
    let handle = GraphHandle {
        addr,
        state: state.clone(),
        cancel: cancel.clone(),
    };
    // Cancellation drops the connections, closing their sockets (and any request held by
    // `Hang`).
    crate::loopback::spawn_server("graph stand-in", listener, tls, cancel, move |req| {
        let state = state.clone();
        async move { respond(&state, req).await }
    });
    Ok(handle)
}

/// The ids one answer carries (headers and `innerError`).
struct Ids {
    request: String,
    client: String,
}

impl Ids {
    fn new(headers: &HeaderMap) -> Self {
        let request = uuid::Uuid::new_v4().to_string();
        let client = headers
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 256)
            .map_or_else(|| request.clone(), str::to_owned);
        Self { request, client }
    }
}

fn json_response(status: StatusCode, body: &Value, ids: &Ids) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ODATA_JSON));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        HeaderName::from_static("x-ms-ags-diagnostic"),
        HeaderValue::from_static(AGS_DIAGNOSTIC),
    );
    for (name, value) in [
        ("request-id", &ids.request),
        ("client-request-id", &ids.client),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    r
}

/// Graph's error shape; `inner` adds members to `innerError` (throttling has a few).
fn graph_error_with(
    status: StatusCode,
    code: &str,
    message: &str,
    ids: &Ids,
    inner: &[(&str, &str)],
) -> Response<Full<Bytes>> {
    let mut inner_error = serde_json::Map::new();
    for (k, v) in inner {
        inner_error.insert((*k).to_owned(), Value::from(*v));
    }
    inner_error.insert("date".into(), Value::from(graph_date(unix_now())));
    inner_error.insert("request-id".into(), Value::from(ids.request.as_str()));
    inner_error.insert("client-request-id".into(), Value::from(ids.client.as_str()));
    json_response(
        status,
        &json!({"error": {"code": code, "message": message, "innerError": inner_error}}),
        ids,
    )
}

fn graph_error(status: StatusCode, code: &str, message: &str, ids: &Ids) -> Response<Full<Bytes>> {
    graph_error_with(status, code, message, ids, &[])
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `innerError.date`: UTC `YYYY-MM-DDTHH:MM:SS`, no zone suffix, as Graph writes it.
fn graph_date(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The object kinds `checkMemberGroups` is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Users,
    ServicePrincipals,
    DirectoryObjects,
}

impl Kind {
    fn parse(segment: &str) -> Option<Self> {
        [Self::Users, Self::ServicePrincipals, Self::DirectoryObjects]
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(segment))
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Users => "users",
            Self::ServicePrincipals => "servicePrincipals",
            Self::DirectoryObjects => "directoryObjects",
        }
    }
}

enum Route {
    CheckMemberGroups(Kind, String),
    /// Not a served path; the segment Graph would name in its message.
    Unknown(String),
}

fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let unknown = |i: usize| Route::Unknown(segments.get(i).copied().unwrap_or("").to_owned());
    if segments.first().copied() != Some("v1.0") {
        return unknown(0);
    }
    let Some(kind) = segments.get(1).and_then(|s| Kind::parse(s)) else {
        return unknown(1);
    };
    let id = segments.get(2).map(|s| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    });
    let action_ok = segments.get(3).is_some_and(|a| {
        a.eq_ignore_ascii_case("checkMemberGroups")
            || a.eq_ignore_ascii_case("microsoft.graph.checkMemberGroups")
    });
    match id {
        Some(id) if !id.is_empty() && action_ok && segments.len() == 4 => {
            Route::CheckMemberGroups(kind, id)
        }
        _ => unknown(segments.len().min(4).saturating_sub(1)),
    }
}

async fn respond(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let ids = Ids::new(req.headers());
    let (kind, id) = match route(req.uri().path()) {
        Route::CheckMemberGroups(kind, id) => (kind, id),
        Route::Unknown(segment) => {
            return graph_error(
                StatusCode::NOT_FOUND,
                "BadRequest",
                &format!("Resource not found for the segment '{segment}'."),
                &ids,
            )
        }
    };
    let (parts, body) = req.into_parts();
    if parts.method != Method::POST {
        state.record(GraphRequest {
            kind: kind.as_str().to_owned(),
            id,
            group_ids: Vec::new(),
            status: StatusCode::METHOD_NOT_ALLOWED.as_u16(),
        });
        let mut r = graph_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Request_BadRequest",
            "Specified HTTP method is not allowed for the request target.",
            &ids,
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .ok();
    let parsed: Option<Value> = body.as_ref().and_then(|b| serde_json::from_slice(b).ok());
    let group_ids: Vec<String> = parsed
        .as_ref()
        .and_then(|v| v.get("groupIds"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();

    let failure = *lock(&state.failure);
    if failure == GraphFailure::Hang {
        state.record(GraphRequest {
            kind: kind.as_str().to_owned(),
            id,
            group_ids,
            status: 0,
        });
        // Held until shutdown; the connection task drops this future then.
        state.cancel.cancelled().await;
        return graph_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "serviceNotAvailable",
            "Shutting down.",
            &ids,
        );
    }
    let response = check_member_groups(
        state,
        &ids,
        failure,
        kind,
        &id,
        &parts.headers,
        parsed.as_ref(),
    );
    state.record(GraphRequest {
        kind: kind.as_str().to_owned(),
        id,
        group_ids,
        status: response.status().as_u16(),
    });
    response
}

fn check_member_groups(
    state: &State,
    ids: &Ids,
    failure: GraphFailure,
    kind: Kind,
    id: &str,
    headers: &HeaderMap,
    body: Option<&Value>,
) -> Response<Full<Bytes>> {
    match failure {
        GraphFailure::Throttle { retry_after_secs } => {
            let mut r = graph_error_with(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Too many requests. Please try again later.",
                ids,
                &[
                    ("code", "429"),
                    ("message", "Please retry after"),
                    ("status", "429"),
                ],
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            return r;
        }
        GraphFailure::ServerError => {
            return graph_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "serviceNotAvailable",
                "The service is temporarily unavailable. Please retry later.",
                ids,
            )
        }
        GraphFailure::None | GraphFailure::Hang => {}
    }

    if let Err(message) = authenticate(&state.cfg, headers) {
        let mut r = graph_error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            message,
            ids,
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(WWW_AUTHENTICATE),
        );
        return r;
    }

    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match content_type.as_deref() {
        Some("application/json") => {}
        None => return graph_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Write requests (excluding DELETE) must contain the Content-Type header declaration.",
            ids,
        ),
        Some(other) => {
            return graph_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "BadRequest",
                &format!("The content type '{other}' is not supported."),
                ids,
            )
        }
    }
    let Some(body) = body else {
        return graph_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.",
            ids,
        );
    };
    let requested = match group_ids_of(body) {
        Ok(g) => g,
        Err(message) => {
            return graph_error(StatusCode::BAD_REQUEST, "Request_BadRequest", &message, ids)
        }
    };

    let memberships = {
        let dir = lock(&state.directory);
        let key = id.to_ascii_lowercase();
        match kind {
            Kind::Users => dir.users.get(&key).cloned(),
            Kind::ServicePrincipals => dir.service_principals.get(&key).cloned(),
            Kind::DirectoryObjects => dir
                .users
                .get(&key)
                .or_else(|| dir.service_principals.get(&key))
                .cloned(),
        }
    };
    let Some(memberships) = memberships else {
        return graph_error(
            StatusCode::NOT_FOUND,
            "Request_ResourceNotFound",
            &format!("Resource '{id}' does not exist or one of its queried reference-property objects are not present."),
            ids,
        );
    };
    let value: Vec<&str> = requested
        .iter()
        .filter(|g| memberships.contains(&g.to_ascii_lowercase()))
        .map(String::as_str)
        .collect();
    let mut r = json_response(
        StatusCode::OK,
        &json!({"@odata.context": ODATA_CONTEXT, "value": value}),
        ids,
    );
    r.headers_mut().insert(
        HeaderName::from_static("odata-version"),
        HeaderValue::from_static("4.0"),
    );
    r
}

/// A hyphenated GUID (`8-4-4-4-12` hex), the only form Graph takes for `groupIds`.
fn is_guid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok()
}

/// The body's `groupIds`, or Graph's 400 message.
fn group_ids_of(body: &Value) -> Result<Vec<String>, String> {
    let Some(ids) = body.get("groupIds") else {
        return Err("Invalid request: the 'groupIds' parameter is required.".into());
    };
    let Some(ids) = ids.as_array() else {
        return Err("Invalid request: 'groupIds' must be a collection of strings.".into());
    };
    if ids.is_empty() {
        return Err(
            "Invalid request: the 'groupIds' collection must contain at least one value.".into(),
        );
    }
    if ids.len() > MAX_GROUP_IDS {
        return Err(format!(
            "Invalid request: the 'groupIds' collection can contain at most {MAX_GROUP_IDS} values; {} were given.",
            ids.len()
        ));
    }
    ids.iter()
        .map(|v| match v.as_str() {
            Some(s) if is_guid(s) => Ok(s.to_owned()),
            Some(s) => Err(format!("Invalid object identifier '{s}'.")),
            None => Err(format!("Invalid object identifier '{v}'.")),
        })
        .collect()
}

/// Checks the `Authorization: Bearer` token; the error is the 401 message.
fn authenticate(cfg: &GraphConfig, headers: &HeaderMap) -> Result<(), &'static str> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err("Access token is empty.");
    };
    const INVALID: &str = "Access token validation failure.";
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| "Invalid JWT token. The token is malformed.")?;
    let jwks = cfg.token_signer.jwks();
    let jwk = header
        .kid
        .as_deref()
        .and_then(|kid| jwks.find(kid))
        .ok_or("Access token validation failure. Invalid signing key.")?;
    // The algorithm is the key's, never the header's: a header naming another alg is refused.
    let alg = match jwk.common.key_algorithm {
        Some(KeyAlgorithm::RS256) => Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => Algorithm::ES256,
        _ => return Err(INVALID),
    };
    if header.alg != alg {
        return Err(INVALID);
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| INVALID)?;
    let mut v = Validation::new(alg);
    v.leeway = 0;
    v.validate_nbf = true;
    v.set_audience(&[cfg.audience.as_str()]);
    v.set_required_spec_claims(&["exp", "aud"]);
    let claims = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &v)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidAudience => "Access token validation failure. Invalid audience.",
            ErrorKind::ExpiredSignature => "Lifetime validation failed, the token is expired.",
            ErrorKind::ImmatureSignature => {
                "Lifetime validation failed, the token is not yet valid."
            }
            ErrorKind::InvalidSignature => "Access token validation failure. Invalid signature.",
            _ => INVALID,
        })?
        .claims;
    let tid_ok = claims
        .get("tid")
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case(&cfg.tenant));
    if !tid_ok {
        return Err("Access token validation failure. Invalid tenant.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::issuer::KeyAlg;
    use hyper_util::rt::TokioIo;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const ALICE: &str = "11111111-1111-1111-1111-111111111111";
    const APP: &str = "22222222-2222-2222-2222-222222222222";
    const G1: &str = "aaaaaaaa-0000-0000-0000-000000000001";
    const G2: &str = "aaaaaaaa-0000-0000-0000-000000000002";
    const G3: &str = "aaaaaaaa-0000-0000-0000-000000000003";

    struct Fixture {
        signer: DevIssuer,
        graph: GraphHandle,
    }

    impl Fixture {
        async fn start() -> Self {
            crate::install_crypto_provider();
            let signer =
                DevIssuer::generate(&format!("https://sts.windows.net/{TENANT}/"), KeyAlg::Rs256)
                    .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let graph = serve(listener, None, GraphConfig::new(TENANT, signer.clone()))
                .await
                .unwrap();
            graph.set_user_groups(ALICE, &[G1, G3]);
            graph.set_service_principal_groups(APP, &[G2]);
            Self { signer, graph }
        }

        fn token(&self) -> String {
            self.token_with(json!({}))
        }

        /// A Graph token for the tenant; `overrides` replace or (with null) remove claims.
        fn token_with(&self, overrides: Value) -> String {
            let mut claims = json!({
                "aud": GRAPH_AUDIENCE,
                "tid": TENANT,
                "oid": APP,
                "roles": ["GroupMember.Read.All"],
            });
            for (k, v) in overrides.as_object().unwrap() {
                claims[k] = v.clone();
            }
            self.signer.mint(claims)
        }

        async fn check(&self, path: &str, ids: &[&str]) -> Answer {
            let body = json!({ "groupIds": ids }).to_string();
            send(
                self.graph.addr,
                "POST",
                path,
                Some(&self.token()),
                &body,
                &[],
            )
            .await
        }
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Value,
    }

    /// One HTTP/1.1 request over a fresh connection.
    async fn send(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
        extra: &[(&str, &str)],
    ) -> Answer {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "graph.microsoft.com")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (k, v) in extra {
            request = request.header(*k, *v);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }

    fn assert_graph_error(a: &Answer, status: StatusCode, code: &str) {
        assert_eq!(a.status, status, "{}", a.body);
        assert_eq!(a.body["error"]["code"], code, "{}", a.body);
        assert!(a.body["error"]["message"].is_string());
        let inner = &a.body["error"]["innerError"];
        let request_id = a.headers["request-id"].to_str().unwrap();
        assert_eq!(inner["request-id"], request_id);
        assert!(uuid::Uuid::try_parse(request_id).is_ok());
        assert!(inner["client-request-id"].is_string());
        assert_eq!(inner["date"].as_str().unwrap().len(), 19);
    }

    #[tokio::test]
    async fn answers_the_requested_groups_the_object_is_a_member_of() {
        let f = Fixture::start().await;
        let path = format!("/v1.0/users/{ALICE}/checkMemberGroups");
        // Request order is kept, and ids match case-insensitively but come back as sent.
        let g3_upper = G3.to_ascii_uppercase();
        let a = f.check(&path, &[&g3_upper, G2, G1]).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(
            a.body,
            json!({"@odata.context": ODATA_CONTEXT, "value": [g3_upper, G1]})
        );
        assert_eq!(a.headers[header::CONTENT_TYPE], ODATA_JSON);
        let request_id = a.headers["request-id"].to_str().unwrap();
        assert!(uuid::Uuid::try_parse(request_id).is_ok());
        assert_eq!(a.headers["client-request-id"], request_id);

        // A client-request-id is echoed.
        let body = json!({ "groupIds": [G1] }).to_string();
        let a = send(
            f.graph.addr,
            "POST",
            &path,
            Some(&f.token()),
            &body,
            &[("client-request-id", "5d2f0c3e-0000-4000-8000-000000000001")],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(
            a.headers["client-request-id"],
            "5d2f0c3e-0000-4000-8000-000000000001"
        );

        // Service principals under their kind and directoryObjects; no membership → empty.
        let a = f
            .check(
                &format!("/v1.0/servicePrincipals/{APP}/checkMemberGroups"),
                &[G1, G2],
            )
            .await;
        assert_eq!(a.body["value"], json!([G2]));
        let a = f
            .check(
                &format!("/v1.0/directoryObjects/{APP}/microsoft.graph.checkMemberGroups"),
                &[G2],
            )
            .await;
        assert_eq!(a.body["value"], json!([G2]));
        let a = f
            .check(
                &format!("/v1.0/directoryObjects/{ALICE}/checkMemberGroups"),
                &[G2],
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body["value"], json!([]));
        f.graph.shutdown();
    }

    #[tokio::test]
    async fn rejects_bad_group_id_lists_with_400() {
        let f = Fixture::start().await;
        let path = format!("/v1.0/users/{ALICE}/checkMemberGroups");
        let many: Vec<String> = (0..21)
            .map(|i| format!("aaaaaaaa-0000-0000-0000-{i:012}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let a = f.check(&path, &many).await;
        assert_graph_error(&a, StatusCode::BAD_REQUEST, "Request_BadRequest");
        // Twenty is fine.
        let a = f.check(&path, &many[..20]).await;
        assert_eq!(a.status, StatusCode::OK);

        let a = f.check(&path, &[]).await;
        assert_graph_error(&a, StatusCode::BAD_REQUEST, "Request_BadRequest");
        let a = f.check(&path, &[G1, "not-a-guid"]).await;
        assert_graph_error(&a, StatusCode::BAD_REQUEST, "Request_BadRequest");
        let a = send(f.graph.addr, "POST", &path, Some(&f.token()), "{}", &[]).await;
        assert_graph_error(&a, StatusCode::BAD_REQUEST, "Request_BadRequest");
        let a = send(f.graph.addr, "POST", &path, Some(&f.token()), "{", &[]).await;
        assert_graph_error(&a, StatusCode::BAD_REQUEST, "BadRequest");
        f.graph.shutdown();
    }

    #[tokio::test]
    async fn rejects_bad_tokens_with_401() {
        let f = Fixture::start().await;
        let path = format!("/v1.0/users/{ALICE}/checkMemberGroups");
        let body = json!({ "groupIds": [G1] }).to_string();
        let addr = f.graph.addr;

        let wrong_aud = f.token_with(json!({"aud": "api://kube-relay"}));
        let a = send(addr, "POST", &path, Some(&wrong_aud), &body, &[]).await;
        assert_graph_error(&a, StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
        assert_eq!(
            a.body["error"]["message"],
            "Access token validation failure. Invalid audience."
        );
        assert!(a.headers.contains_key(header::WWW_AUTHENTICATE));

        let a = send(addr, "POST", &path, None, &body, &[]).await;
        assert_graph_error(&a, StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
        assert_eq!(a.body["error"]["message"], "Access token is empty.");

        let other_tenant = f.token_with(json!({"tid": "33333333-3333-3333-3333-333333333333"}));
        let a = send(addr, "POST", &path, Some(&other_tenant), &body, &[]).await;
        assert_graph_error(&a, StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");

        let expired = f.token_with(json!({"exp": unix_now() - 10, "nbf": null, "iat": null}));
        let a = send(addr, "POST", &path, Some(&expired), &body, &[]).await;
        assert_graph_error(&a, StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
        assert!(a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"));

        let stranger = DevIssuer::generate("https://sts.windows.net/x/", KeyAlg::Rs256)
            .unwrap()
            .mint(json!({"aud": GRAPH_AUDIENCE, "tid": TENANT}));
        let a = send(addr, "POST", &path, Some(&stranger), &body, &[]).await;
        assert_graph_error(&a, StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");

        let a = send(addr, "POST", &path, Some("not.a.jwt"), &body, &[]).await;
        assert_graph_error(&a, StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
        assert_eq!(f.graph.request_count(), 6);
        assert!(f.graph.requests().iter().all(|r| r.status == 401));
        f.graph.shutdown();
    }

    #[tokio::test]
    async fn unknown_objects_are_404_per_kind() {
        let f = Fixture::start().await;
        let unknown = "44444444-4444-4444-4444-444444444444";
        let a = f
            .check(&format!("/v1.0/users/{unknown}/checkMemberGroups"), &[G1])
            .await;
        assert_graph_error(&a, StatusCode::NOT_FOUND, "Request_ResourceNotFound");
        assert_eq!(
            a.body["error"]["message"],
            format!("Resource '{unknown}' does not exist or one of its queried reference-property objects are not present.")
        );
        // A service principal is not a user, and a user is not a service principal.
        let a = f
            .check(&format!("/v1.0/users/{APP}/checkMemberGroups"), &[G2])
            .await;
        assert_graph_error(&a, StatusCode::NOT_FOUND, "Request_ResourceNotFound");
        let a = f
            .check(
                &format!("/v1.0/servicePrincipals/{ALICE}/checkMemberGroups"),
                &[G1],
            )
            .await;
        assert_graph_error(&a, StatusCode::NOT_FOUND, "Request_ResourceNotFound");
        f.graph.shutdown();
    }

    #[tokio::test]
    async fn other_paths_and_methods_get_graph_errors() {
        let f = Fixture::start().await;
        let a = send(f.graph.addr, "GET", "/v1.0/me", Some(&f.token()), "", &[]).await;
        assert_graph_error(&a, StatusCode::NOT_FOUND, "BadRequest");
        let path = format!("/v1.0/users/{ALICE}/checkMemberGroups");
        let a = send(f.graph.addr, "GET", &path, Some(&f.token()), "", &[]).await;
        assert_graph_error(&a, StatusCode::METHOD_NOT_ALLOWED, "Request_BadRequest");
        assert_eq!(a.headers[header::ALLOW], "POST");
        // Only the checkMemberGroups path is recorded.
        assert_eq!(
            f.graph.requests(),
            vec![GraphRequest {
                kind: "users".into(),
                id: ALICE.into(),
                group_ids: vec![],
                status: 405,
            }]
        );
        f.graph.shutdown();
    }

    #[tokio::test]
    async fn failures_throttle_and_503_until_reset() {
        let f = Fixture::start().await;
        let path = format!("/v1.0/users/{ALICE}/checkMemberGroups");
        f.graph.set_failure(GraphFailure::Throttle {
            retry_after_secs: 7,
        });
        for _ in 0..2 {
            let a = f.check(&path, &[G1]).await;
            assert_graph_error(&a, StatusCode::TOO_MANY_REQUESTS, "TooManyRequests");
            assert_eq!(a.headers[header::RETRY_AFTER], "7");
        }
        f.graph.set_failure(GraphFailure::ServerError);
        let a = f.check(&path, &[G1]).await;
        assert_graph_error(&a, StatusCode::SERVICE_UNAVAILABLE, "serviceNotAvailable");
        f.graph.set_failure(GraphFailure::None);
        let a = f.check(&path, &[G1]).await;
        assert_eq!(a.status, StatusCode::OK);
        let statuses: Vec<u16> = f.graph.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [429, 429, 503, 200]);
        f.graph.shutdown();
    }

    #[tokio::test]
    async fn records_every_request_in_order_and_hang_holds_until_shutdown() {
        let f = Fixture::start().await;
        assert!(
            !f.graph
                .wait_for_requests(1, Duration::from_millis(50))
                .await
        );
        let user_path = format!("/v1.0/Users/{ALICE}/checkMemberGroups");
        f.check(&user_path, &[G1, G2]).await;
        f.check(
            &format!("/v1.0/servicePrincipals/{APP}/checkMemberGroups"),
            &[G2],
        )
        .await;
        assert!(f.graph.wait_for_requests(2, Duration::from_secs(1)).await);

        f.graph.set_failure(GraphFailure::Hang);
        let addr = f.graph.addr;
        let token = f.token();
        let body = json!({ "groupIds": [G3] }).to_string();
        let held = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let request = Request::post(format!("/v1.0/users/{ALICE}/checkMemberGroups"))
                .header(header::HOST, "graph.microsoft.com")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            sender.send_request(request).await
        });
        assert!(f.graph.wait_for_requests(3, Duration::from_secs(5)).await);
        assert_eq!(
            f.graph.requests(),
            vec![
                GraphRequest {
                    kind: "users".into(),
                    id: ALICE.into(),
                    group_ids: vec![G1.into(), G2.into()],
                    status: 200,
                },
                GraphRequest {
                    kind: "servicePrincipals".into(),
                    id: APP.into(),
                    group_ids: vec![G2.into()],
                    status: 200,
                },
                GraphRequest {
                    kind: "users".into(),
                    id: ALICE.into(),
                    group_ids: vec![G3.into()],
                    status: 0,
                },
            ]
        );
        assert!(!held.is_finished());
        f.graph.shutdown();
        let answer = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("shutdown must release a held request")
            .unwrap();
        assert!(answer.is_err(), "a held request is never answered");
        assert_eq!(f.graph.request_count(), 3);
    }

    #[test]
    fn graph_dates_are_utc_without_zone() {
        assert_eq!(graph_date(0), "1970-01-01T00:00:00");
        assert_eq!(graph_date(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(graph_date(1_767_225_599), "2025-12-31T23:59:59");
    }

    #[test]
    fn routes_only_check_member_groups() {
        assert!(matches!(
            route("/v1.0/servicePrincipals/x%2Dy/checkMemberGroups"),
            Route::CheckMemberGroups(Kind::ServicePrincipals, id) if id == "x-y"
        ));
        assert!(
            matches!(route("/beta/users/x/checkMemberGroups"), Route::Unknown(s) if s == "beta")
        );
        assert!(
            matches!(route("/v1.0/groups/x/checkMemberGroups"), Route::Unknown(s) if s == "groups")
        );
        assert!(matches!(
            route("/v1.0/users/x/getMemberGroups"),
            Route::Unknown(_)
        ));
        assert!(matches!(
            route("/v1.0/users//checkMemberGroups"),
            Route::Unknown(_)
        ));
        assert!(matches!(
            route("/v1.0/users/x/checkMemberGroups/y"),
            Route::Unknown(_)
        ));
    }
}
