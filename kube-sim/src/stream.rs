//! exec / attach / cp / port-forward, as kube-apiserver (and the kubelet behind it) speak them.
//!
//! [`handle`] is called by the server for an authenticated request on an existing pod's
//! `exec`, `attach` or `portforward` subresource. It negotiates the protocol, answers
//! `101 Switching Protocols` and runs the session on the upgraded connection in a spawned task,
//! or answers a `metav1.Status` error.
//!
//! Protocols (sources: kubernetes `staging/src/k8s.io/` `kubelet/pkg/cri/streaming/{remotecommand,
//! portforward}`, `apiserver/pkg/util/proxy/{streamtranslator,streamtunnel,websocket}.go`,
//! `apimachinery/pkg/util/httpstream/{httpstream.go,wsstream/conn.go}`, `client-go/tools/
//! {remotecommand,portforward}`, at v0.33):
//!
//! | request | answer |
//! |---|---|
//! | SPDY (`Upgrade: SPDY/3.1`) exec/attach, `X-Stream-Protocol-Version` list | first client-offered of `v4`, `v3`, `v2.channel.k8s.io`, `channel.k8s.io` (the kubelet's list: kubectl ≥1.30 offers `v5` first, which the kubelet does not know over SPDY) |
//! | SPDY port-forward | `portforward.k8s.io` |
//! | WebSocket exec/attach | first client-offered of `v5.channel.k8s.io` (apiserver translator, ≥1.30), `v4.channel.k8s.io`, `v4.base64.channel.k8s.io`, `channel.k8s.io`, `base64.channel.k8s.io`, no subprotocol (kubelet), plus `v3`/`v2.channel.k8s.io` as pre-v4 binary (a sim extension: the kubelet refuses those two) |
//! | WebSocket port-forward, `SPDY/3.1+portforward.k8s.io` | the SPDY session tunnelled in binary messages (kubectl ≥1.31) |
//! | WebSocket port-forward, `v4.channel.k8s.io`, `v4.base64.channel.k8s.io` or none, `?ports=` | channel 2i data / 2i+1 error per port, first message on each = port little-endian (Python, client-node) |
//!
//! Failures before the upgrade: 400 for a request that is no upgrade or lacks the negotiation
//! header, 403 when no subprotocol is common (the kubelet's `httpstream.Handshake` and
//! `x/net/websocket` answers), 405 for a WebSocket upgrade that is not a GET. kubectl falls back
//! from WebSocket to SPDY on any non-101 answer.
//!
//! The pod side is simulated: a handful of commands (`echo`, `cat [FILE]`, `env`, `true`,
//! `false`, `sleep N`, `test`/`[`, `ls`, `mkdir`, `hostname`, `tar` as `kubectl cp` drives it,
//! `gen N` writing N bytes of [`GEN_PATTERN`] for throughput tests, `tail`/`head`/`wc` as pipeline
//! filters, unknown commands → 127) and a small `sh` (`-c SCRIPT` or lines on stdin; `;`, `&&`,
//! `||`, `|`, quotes, `exit N`, `>`, `>>`, `<`, `2>&1`, `>&2`, `>/dev/null`) over an in-memory
//! filesystem per pod ([`PodFiles`]). With a TTY, a reduced line discipline: stderr joins
//! stdout, output `\n` → `\r\n`, input `\r` → `\n`, ^D ends input, ^C exits 130, no echo.
//! Attach echoes stdin like `cat` (without stdin it waits for the client to detach); every
//! forwarded port is an echo server.
//!
//! Invariants: nothing here panics on client input; a malformed frame or message ends that
//! session (the SPDY layer sends GOAWAY, WebSocket sessions close). Every wait on the client is
//! bounded or ends when the connection does.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::spdy;

/// Which subresource was called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Exec,
    Attach,
    PortForward,
}

/// What [`handle`] acts on: the subresource, the pod, the raw query string and the pods' files.
#[derive(Clone)]
pub struct StreamTarget {
    pub kind: StreamKind,
    pub namespace: String,
    pub pod: String,
    /// The raw query string (without `?`), as received.
    pub query: Option<String>,
    pub files: PodFiles,
}

/// Kubelet's `streamCreationTimeout` default: how long the client has to open its streams.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long we wait for the WebSocket peer's Close reply once we sent ours.
const WS_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Largest archive `tar -x` accepts on stdin (kept in memory).
const MAX_TAR_INPUT: usize = 1 << 30;

const SPDY_REMOTECOMMAND_PROTOCOLS: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
const PORTFORWARD_PROTOCOL: &str = "portforward.k8s.io";
const TUNNEL_PREFIX: &str = "SPDY/3.1+";

/// Exec/attach and port-forward over SPDY and WebSocket. See the module docs for the table.
pub async fn handle(
    mut req: Request<hyper::body::Incoming>,
    target: StreamTarget,
) -> Response<crate::Body> {
    let query = Query::parse(target.query.as_deref().unwrap_or(""));
    let headers = req.headers();
    if !header_contains(headers, &CONNECTION, "upgrade") {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Upgrade request required",
        );
    }
    let upgrade = header_str(headers, &UPGRADE).to_ascii_lowercase();
    let is_websocket = upgrade == "websocket";
    let is_spdy = upgrade.contains("spdy/3.1");
    if !is_websocket && !is_spdy {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "unable to upgrade: unsupported Upgrade header {:?}",
                header_str(headers, &UPGRADE)
            ),
        );
    }

    let plan = match target.kind {
        StreamKind::Exec | StreamKind::Attach => {
            let opts = match ExecOptions::from_query(target.kind, &query) {
                Ok(o) => o,
                Err(msg) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", msg),
            };
            if is_websocket {
                match negotiate_websocket_exec(headers) {
                    Ok(proto) => Plan::WsExec(opts, proto),
                    Err(resp) => return *resp,
                }
            } else {
                match negotiate_spdy(headers, &SPDY_REMOTECOMMAND_PROTOCOLS) {
                    Ok(proto) => Plan::SpdyExec(opts, RemoteVersion::from_name(&proto), proto),
                    Err(resp) => return *resp,
                }
            }
        }
        StreamKind::PortForward => {
            if is_websocket {
                let offered = websocket_protocols(headers);
                if offered.iter().any(|p| is_tunnel_protocol(p)) {
                    // apiserver streamtunnel.go: strip the prefix and negotiate the inner SPDY
                    // protocol with the kubelet, which knows only portforward.k8s.io.
                    let wanted = format!("{TUNNEL_PREFIX}{PORTFORWARD_PROTOCOL}");
                    if offered.contains(&wanted) {
                        Plan::WsTunnel(wanted)
                    } else {
                        return forbidden_protocols(&offered, &[wanted.as_str()]);
                    }
                } else {
                    let ports = match query.ports() {
                        Ok(p) => p,
                        Err(msg) => {
                            return status_response(StatusCode::BAD_REQUEST, "BadRequest", msg)
                        }
                    };
                    match negotiate_websocket(
                        headers,
                        &["", "v4.channel.k8s.io", "v4.base64.channel.k8s.io"],
                    ) {
                        Ok(proto) => Plan::WsPortForward(ports, proto),
                        Err(resp) => return *resp,
                    }
                }
            } else {
                match negotiate_spdy(headers, &[PORTFORWARD_PROTOCOL]) {
                    Ok(proto) => Plan::SpdyPortForward(proto),
                    Err(resp) => return *resp,
                }
            }
        }
    };

    if is_websocket {
        if let Err(resp) = check_websocket_handshake(req.method(), headers) {
            return *resp;
        }
    }
    let accept_key = headers
        .get("sec-websocket-key")
        .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()));

    let on_upgrade = hyper::upgrade::on(&mut req);
    let pod = PodCtx {
        namespace: target.namespace,
        pod: target.pod,
        files: target.files,
    };
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    match &plan {
        Plan::SpdyExec(_, _, proto) | Plan::SpdyPortForward(proto) => {
            h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
            if let Ok(v) = HeaderValue::from_str(proto) {
                h.insert("x-stream-protocol-version", v);
            }
        }
        Plan::WsExec(_, proto) => {
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            set_ws_protocol(h, proto.name);
        }
        Plan::WsPortForward(_, proto) => {
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            set_ws_protocol(h, proto.name);
        }
        Plan::WsTunnel(proto) => {
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            set_ws_protocol(h, proto);
        }
    }
    if let Some(accept) = accept_key.and_then(|k| HeaderValue::from_str(&k).ok()) {
        h.insert("sec-websocket-accept", accept);
    }

    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "stream upgrade failed");
                return;
            }
        };
        match plan {
            Plan::SpdyExec(opts, version, _) => spdy_exec(upgraded, opts, version, pod).await,
            Plan::SpdyPortForward(_) => spdy_port_forward(upgraded).await,
            Plan::WsExec(opts, proto) => {
                let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
                ws_exec(ws, opts, proto, pod).await
            }
            Plan::WsPortForward(ports, proto) => {
                let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
                ws_port_forward(ws, ports, proto).await
            }
            Plan::WsTunnel(_) => {
                let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
                ws_tunnel_port_forward(ws).await
            }
        }
    });
    resp
}

/// What to run once upgraded; decided before answering 101.
enum Plan {
    SpdyExec(ExecOptions, RemoteVersion, String),
    SpdyPortForward(String),
    WsExec(ExecOptions, WsProtocol),
    WsPortForward(Vec<u16>, WsProtocol),
    WsTunnel(String),
}

// === Negotiation ===

fn header_str<'a>(headers: &'a HeaderMap, name: &http::header::HeaderName) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn header_contains(headers: &HeaderMap, name: &http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.to_ascii_lowercase().contains(token))
            .unwrap_or(false)
    })
}

/// All values of a comma-separated, possibly repeated header, trimmed, in order.
fn header_list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// A refused upgrade, boxed because a `Response` is large.
type Rejection = Box<Response<crate::Body>>;

/// `httpstream.Handshake`: the first client protocol the server knows; 400 without the header,
/// 403 (with `X-Accepted-Stream-Protocol-Versions`) when nothing is common.
fn negotiate_spdy(headers: &HeaderMap, server: &[&str]) -> Result<String, Rejection> {
    if headers.get("x-stream-protocol-version").is_none() {
        return Err(Box::new(status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "unable to upgrade: header X-Stream-Protocol-Version does not exist in request",
        )));
    }
    let offered = header_list(headers, "x-stream-protocol-version");
    if offered.is_empty() {
        return Err(Box::new(status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "unable to upgrade: header X-Stream-Protocol-Version contains no valid protocols",
        )));
    }
    if let Some(p) = offered.iter().find(|p| server.contains(&p.as_str())) {
        return Ok(p.clone());
    }
    let mut resp = status_response(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {server:?}"
        ),
    );
    for p in server {
        if let Ok(v) = HeaderValue::from_str(p) {
            resp.headers_mut()
                .append("x-accepted-stream-protocol-versions", v);
        }
    }
    Err(Box::new(resp))
}

/// The offered WebSocket subprotocols, minus the browser bearer-token entry
/// (`base64url.bearer.authorization.k8s.io.<token>`), which the API server's authenticator
/// consumes before the request goes on: a request offering only that entry negotiates "".
fn websocket_protocols(headers: &HeaderMap) -> Vec<String> {
    header_list(headers, "sec-websocket-protocol")
        .into_iter()
        .filter(|p| !p.starts_with("base64url.bearer.authorization.k8s.io."))
        .collect()
}

fn is_tunnel_protocol(p: &str) -> bool {
    // wsstream.protocolSupportsWebsocketTunneling
    p.starts_with(TUNNEL_PREFIX) && p.ends_with(".k8s.io")
}

/// A negotiated remotecommand (or port-forward) WebSocket subprotocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WsProtocol {
    /// What we echo in `Sec-WebSocket-Protocol` ("" = no subprotocol was requested).
    name: &'static str,
    /// base64 variants: text messages, ASCII-digit channel, base64 payload.
    base64: bool,
    version: RemoteVersion,
}

const WS_EXEC_PROTOCOLS: [&str; 8] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
    "",
];

fn negotiate_websocket_exec(headers: &HeaderMap) -> Result<WsProtocol, Rejection> {
    negotiate_websocket(headers, &WS_EXEC_PROTOCOLS)
}

/// `x/net/websocket` handshake as wsstream uses it: the first client-offered protocol the
/// server supports; no header means the "" protocol; nothing common is a 403.
fn negotiate_websocket(
    headers: &HeaderMap,
    server: &[&'static str],
) -> Result<WsProtocol, Rejection> {
    let mut offered = websocket_protocols(headers);
    if offered.is_empty() {
        offered.push(String::new());
    }
    for p in &offered {
        if let Some(name) = server.iter().find(|s| **s == p.as_str()) {
            return Ok(WsProtocol {
                name,
                base64: name.contains("base64"),
                version: RemoteVersion::from_name(name),
            });
        }
    }
    Err(Box::new(forbidden_protocols(&offered, server)))
}

fn forbidden_protocols(offered: &[String], server: &[&str]) -> Response<crate::Body> {
    status_response(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!("requested protocol(s) are not supported: {offered:?}; supports {server:?}"),
    )
}

/// The RFC 6455 checks `x/net/websocket` and gorilla make before upgrading.
fn check_websocket_handshake(method: &http::Method, headers: &HeaderMap) -> Result<(), Rejection> {
    if method != http::Method::GET {
        return Err(Box::new(status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "websocket: the client is not using the websocket protocol: request method is not GET",
        )));
    }
    if header_str(headers, &http::header::SEC_WEBSOCKET_VERSION) != "13" {
        let mut resp = status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header",
        );
        resp.headers_mut().insert(
            http::header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(Box::new(resp));
    }
    if headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .is_none_or(|k| k.is_empty())
    {
        return Err(Box::new(status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header is missing or blank",
        )));
    }
    Ok(())
}

fn set_ws_protocol(h: &mut HeaderMap, proto: &str) {
    if proto.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(proto) {
        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, v);
    }
}

/// The remotecommand protocol generation: what the error channel carries and whether resize
/// and CLOSE exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum RemoteVersion {
    V1,
    V2,
    V3,
    V4,
    V5,
}

impl RemoteVersion {
    fn from_name(name: &str) -> Self {
        match name {
            n if n.starts_with("v5.") => Self::V5,
            n if n.starts_with("v4.") => Self::V4,
            n if n.starts_with("v3.") => Self::V3,
            n if n.starts_with("v2.") => Self::V2,
            _ => Self::V1,
        }
    }
}

// === Query and options ===

/// A decoded query string, keys in order (repeated keys kept).
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Self(
            raw.split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// apimachinery `Convert_Slice_string_To_bool`: absent → default; "0"/"false" → false;
    /// anything else (even empty) → true.
    fn flag(&self, key: &str, default: bool) -> bool {
        match self.all(key).next() {
            None => default,
            Some(v) => !(v == "0" || v.eq_ignore_ascii_case("false")),
        }
    }

    /// Ports for WebSocket port-forward: `ports=` (the API) or `port=` (the kubelet), repeated
    /// or comma-separated, each 1..=65535.
    fn ports(&self) -> Result<Vec<u16>, String> {
        let raw: Vec<&str> = self.all("ports").chain(self.all("port")).collect();
        if raw.is_empty() {
            return Err("query parameter \"port\" is required".into());
        }
        let mut ports = Vec::new();
        for value in raw {
            if value.is_empty() {
                return Err("query parameter \"port\" cannot be empty".into());
            }
            for p in value.split(',') {
                match p.trim().parse::<u16>() {
                    Ok(port) if port > 0 => ports.push(port),
                    Ok(_) => return Err(format!("port {value:?} must be > 0")),
                    Err(e) => return Err(format!("unable to parse {value:?} as a port: {e}")),
                }
            }
        }
        Ok(ports)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `PodExecOptions` / `PodAttachOptions` after defaulting (stdout and stderr default to true,
/// `SetDefaults_PodExecOptions`) and the kubelet's rule that a TTY has no separate stderr.
#[derive(Clone, Debug)]
struct ExecOptions {
    kind: StreamKind,
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl ExecOptions {
    fn from_query(kind: StreamKind, q: &Query) -> Result<Self, String> {
        let command: Vec<String> = q.all("command").map(str::to_owned).collect();
        if kind == StreamKind::Exec && command.is_empty() {
            return Err("you must specify at least one command for the container".into());
        }
        let tty = q.flag("tty", false);
        let stdin = q.flag("stdin", false);
        let stdout = q.flag("stdout", true);
        let stderr = q.flag("stderr", true) && !tty;
        if !stdin && !stdout && !stderr {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        Ok(Self {
            kind,
            command,
            stdin,
            stdout,
            stderr,
            tty,
        })
    }
}

// === Status ===

/// `metav1.Status` with Go's field order and omitempty rules, so the bytes match what the
/// kubelet writes on the error channel.
#[derive(serde::Serialize)]
struct Status {
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(rename = "apiVersion", skip_serializing_if = "Option::is_none")]
    api_version: Option<&'static str>,
    metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "str::is_empty")]
    status: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    message: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<StatusDetails>,
    #[serde(skip_serializing_if = "is_zero")]
    code: u16,
}

#[derive(serde::Serialize)]
struct StatusDetails {
    causes: Vec<StatusCause>,
}

#[derive(serde::Serialize)]
struct StatusCause {
    reason: &'static str,
    message: String,
}

fn is_zero(c: &u16) -> bool {
    *c == 0
}

/// An HTTP error answer: a full `Status` object (kind, apiVersion, code), as the API server sends.
fn status_response(
    code: StatusCode,
    reason: &'static str,
    message: impl Into<String>,
) -> Response<crate::Body> {
    let status = Status {
        kind: Some("Status"),
        api_version: Some("v1"),
        metadata: serde_json::Map::new(),
        status: "Failure",
        message: message.into(),
        reason,
        details: None,
        code: code.as_u16(),
    };
    let body = serde_json::to_vec(&status).unwrap_or_default();
    let mut resp = Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn empty_body() -> crate::Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// How the process ended, as written to the error channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Code(i32),
    /// The client went away before the process finished.
    Aborted,
}

/// The error-channel payload for `code`, or `None` when the protocol sends nothing (pre-v4
/// success). v4 is what the kubelet writes (`ServeExec`); v5 is re-encoded by the apiserver's
/// stream translator from the v4 status it received, hence its different message.
fn exit_status_bytes(code: i32, version: RemoteVersion, argv: &[String]) -> Option<Vec<u8>> {
    let message = match version {
        RemoteVersion::V5 => format!(
            "command terminated with non-zero exit code: command terminated with exit code {code}"
        ),
        _ => format!(
            "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
            argv.join(" ")
        ),
    };
    if version < RemoteVersion::V4 {
        // v1WriteStatusFunc: nothing on success, the bare message on failure.
        return (code != 0).then(|| message.into_bytes());
    }
    let status = if code == 0 {
        Status {
            kind: None,
            api_version: None,
            metadata: serde_json::Map::new(),
            status: "Success",
            message: String::new(),
            reason: "",
            details: None,
            code: 0,
        }
    } else {
        Status {
            kind: None,
            api_version: None,
            metadata: serde_json::Map::new(),
            status: "Failure",
            message,
            reason: "NonZeroExitCode",
            details: Some(StatusDetails {
                causes: vec![StatusCause {
                    reason: "ExitCode",
                    message: code.to_string(),
                }],
            }),
            code: 0,
        }
    };
    serde_json::to_vec(&status).ok()
}

// === PodFiles: the pods' filesystems ===

/// An in-memory filesystem per (namespace, pod), shared by every session of one server, so
/// `kubectl cp` into a pod and back out returns the same bytes. Cheap to clone.
#[derive(Clone, Default)]
pub struct PodFiles {
    inner: Arc<Mutex<HashMap<(String, String), PodFs>>>,
}

impl PodFiles {
    /// A file's contents, if `path` (absolute, or relative to `/`) is a regular file.
    pub fn read_file(&self, namespace: &str, pod: &str, path: &str) -> Option<Vec<u8>> {
        self.with(namespace, pod, |fs| match fs.nodes.get(&normalize(path)) {
            Some(Node::File { data, .. }) => Some(data.to_vec()),
            _ => None,
        })
    }

    /// Creates or replaces a file, creating parent directories as needed.
    pub fn write_file(&self, namespace: &str, pod: &str, path: &str, data: &[u8]) {
        self.with(namespace, pod, |fs| {
            fs.write(&normalize(path), Bytes::copy_from_slice(data), 0o644)
        });
    }

    /// Whether `path` is a directory in the pod.
    pub fn is_dir(&self, namespace: &str, pod: &str, path: &str) -> bool {
        self.with(namespace, pod, |fs| fs.is_dir(&normalize(path)))
    }

    fn with<R>(&self, namespace: &str, pod: &str, f: impl FnOnce(&mut PodFs) -> R) -> R {
        let mut map = self.lock();
        let fs = map
            .entry((namespace.to_owned(), pod.to_owned()))
            .or_insert_with(|| PodFs::new(pod));
        f(fs)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), PodFs>> {
        // Short, non-async critical sections; a panicked holder must not wedge the others.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Debug)]
enum Node {
    Dir { mtime: u64 },
    File { data: Bytes, mode: u32, mtime: u64 },
}

/// Absolute normalised paths ("/", "/tmp/a") to nodes; parents always exist.
struct PodFs {
    nodes: BTreeMap<String, Node>,
}

impl PodFs {
    fn new(pod: &str) -> Self {
        let mut fs = Self {
            nodes: BTreeMap::new(),
        };
        for dir in [
            "/", "/bin", "/dev", "/etc", "/home", "/root", "/tmp", "/usr", "/usr/bin", "/var",
        ] {
            fs.nodes.insert(dir.to_owned(), Node::Dir { mtime: now() });
        }
        fs.write("/etc/hostname", Bytes::from(format!("{pod}\n")), 0o644);
        fs
    }

    fn is_dir(&self, path: &str) -> bool {
        matches!(self.nodes.get(path), Some(Node::Dir { .. }))
    }

    fn exists(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    /// `mkdir -p`; fails if a file is in the way.
    fn mkdir_all(&mut self, path: &str) -> Result<(), String> {
        let mut current = String::from("/");
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if current != "/" {
                current.push('/');
            }
            current.push_str(part);
            match self.nodes.get(&current) {
                Some(Node::Dir { .. }) => {}
                Some(Node::File { .. }) => return Err(format!("{current}: Not a directory")),
                None => {
                    self.nodes
                        .insert(current.clone(), Node::Dir { mtime: now() });
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, path: &str, data: Bytes, mode: u32) {
        let parent = parent_of(path);
        // A file in the way of a parent is replaced by a directory, like `tar -x` recreating it.
        if self.mkdir_all(&parent).is_err() {
            let mut current = String::new();
            for part in parent.split('/').filter(|p| !p.is_empty()) {
                current.push('/');
                current.push_str(part);
                if !self.is_dir(&current) {
                    self.nodes
                        .insert(current.clone(), Node::Dir { mtime: now() });
                }
            }
        }
        self.nodes.insert(
            path.to_owned(),
            Node::File {
                data,
                mode,
                mtime: now(),
            },
        );
    }

    /// Direct children of a directory, by name.
    fn children(&self, dir: &str) -> Vec<String> {
        let prefix = if dir == "/" {
            "/".to_owned()
        } else {
            format!("{dir}/")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, _)| {
                let rest = &k[prefix.len()..];
                (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_owned())
            })
            .collect()
    }

    /// Everything at and under `path`, in tar order (parents before children).
    fn walk(&self, path: &str) -> Vec<(String, Node)> {
        let mut out = Vec::new();
        let Some(node) = self.nodes.get(path) else {
            return out;
        };
        out.push((path.to_owned(), node.clone()));
        if matches!(node, Node::Dir { .. }) {
            for child in self.children(path) {
                let child_path = if path == "/" {
                    format!("/{child}")
                } else {
                    format!("{path}/{child}")
                };
                out.extend(self.walk(&child_path));
            }
        }
        out
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Resolves `path` against `/` and removes `.`, `..` and repeated slashes.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

fn join_path(dir: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        normalize(rel)
    } else {
        normalize(&format!("{dir}/{rel}"))
    }
}

fn parent_of(path: &str) -> String {
    match path.rfind('/') {
        Some(0) | None => "/".to_owned(),
        Some(i) => path[..i].to_owned(),
    }
}

// === Processes ===

/// The pod a process runs in.
#[derive(Clone)]
struct PodCtx {
    namespace: String,
    pod: String,
    files: PodFiles,
}

/// Output of a process, in order: (1 = stdout, 2 = stderr, bytes).
type OutTx = mpsc::Sender<(u8, Bytes)>;

/// A simulated process's standard streams. Stdin ends (returns `None`) at the client's EOF.
struct ProcIo {
    stdin: mpsc::Receiver<Bytes>,
    out: OutTx,
    stdout: bool,
    stderr: bool,
    /// A terminal: stderr joins stdout, output `\n` becomes `\r\n` (ONLCR), input `\r` becomes
    /// `\n` (ICRNL), ^D at any point ends input and ^C interrupts (a much reduced line
    /// discipline: no echo, no line editing).
    tty: bool,
    stdin_eof: bool,
    interrupted: bool,
    /// How many shells deep this process is (see [`MAX_SHELL_DEPTH`]).
    depth: u32,
}

/// Nested `sh` invocations allowed in one exec.
const MAX_SHELL_DEPTH: u32 = 16;

impl ProcIo {
    async fn write(&self, fd: u8, data: impl Into<Bytes>) {
        let mut data: Bytes = data.into();
        let fd = if self.tty { 1 } else { fd };
        let wanted = if fd == 1 { self.stdout } else { self.stderr };
        if !wanted || data.is_empty() {
            return;
        }
        if self.tty && data.contains(&b'\n') {
            let mut crlf = BytesMut::with_capacity(data.len() + data.len() / 8);
            for &b in data.iter() {
                if b == b'\n' {
                    crlf.put_u8(b'\r');
                }
                crlf.put_u8(b);
            }
            data = crlf.freeze();
        }
        // A closed output means the session is ending; the process just stops being heard.
        let _ = self.out.send((fd, data)).await;
    }

    async fn out(&self, data: impl Into<Bytes>) {
        self.write(1, data).await
    }

    async fn err(&self, data: impl Into<Bytes>) {
        self.write(2, data).await
    }

    async fn read(&mut self) -> Option<Bytes> {
        if self.stdin_eof {
            return None;
        }
        let Some(chunk) = self.stdin.recv().await else {
            self.stdin_eof = true;
            return None;
        };
        if !self.tty {
            return Some(chunk);
        }
        let mut data = BytesMut::with_capacity(chunk.len());
        for &b in chunk.iter() {
            match b {
                0x04 => {
                    self.stdin_eof = true;
                    break;
                }
                0x03 => {
                    self.interrupted = true;
                    self.stdin_eof = true;
                    break;
                }
                b'\r' => data.put_u8(b'\n'),
                b => data.put_u8(b),
            }
        }
        Some(data.freeze())
    }

    async fn read_all(&mut self, limit: usize) -> Result<Vec<u8>, ()> {
        let mut all = Vec::new();
        while let Some(chunk) = self.read().await {
            if all.len() + chunk.len() > limit {
                return Err(());
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    /// Same outputs and terminal, other stdin: for pipeline stages and scripts.
    fn with_stdin(&self, stdin: mpsc::Receiver<Bytes>, out: OutTx) -> ProcIo {
        ProcIo {
            stdin,
            out,
            stdout: true,
            stderr: self.stderr,
            tty: self.tty,
            stdin_eof: false,
            interrupted: false,
            depth: self.depth,
        }
    }
}

/// A stdin that is already at EOF.
fn closed_stdin() -> mpsc::Receiver<Bytes> {
    mpsc::channel(1).1
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs the container's side of an exec (argv) or attach (argv empty).
async fn run_process(argv: Vec<String>, kind: StreamKind, mut io: ProcIo, pod: PodCtx) -> i32 {
    if kind == StreamKind::Attach {
        // The main process of the simulated container echoes its stdin, like `cat`. Without
        // stdin it runs on, silent, until the client detaches (as attaching to a server does).
        if io.stdin_eof {
            std::future::pending::<()>().await;
        }
        return cat(&mut io).await;
    }
    run_argv(&argv, &mut io, &pod).await.code()
}

/// Result of running a command inside the mini shell: `exit` must stop the whole script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Status(i32),
    Exit(i32),
}

impl Flow {
    fn code(self) -> i32 {
        match self {
            Flow::Status(c) | Flow::Exit(c) => c,
        }
    }
}

fn run_argv<'a>(argv: &'a [String], io: &'a mut ProcIo, pod: &'a PodCtx) -> BoxFut<'a, Flow> {
    Box::pin(async move {
        match parse_redirects(argv) {
            Ok(Some((argv, redirects))) => return run_redirected(&argv, redirects, io, pod).await,
            Ok(None) => {}
            Err(e) => {
                io.err(format!("sh: 1: {e}\n")).await;
                return Flow::Status(2);
            }
        }
        let Some(first) = argv.first() else {
            return Flow::Status(0);
        };
        let name = first.rsplit('/').next().unwrap_or(first).to_owned();
        let args = &argv[1..];
        let code = match name.as_str() {
            "exit" => {
                return Flow::Exit(args.first().and_then(|a| a.parse().ok()).unwrap_or(0) & 0xff)
            }
            "true" | ":" => 0,
            "false" => 1,
            "echo" => {
                let (newline, words) = match args.first().map(String::as_str) {
                    Some("-n") => (false, &args[1..]),
                    _ => (true, args),
                };
                let mut line = words.join(" ");
                if newline {
                    line.push('\n');
                }
                io.out(line).await;
                0
            }
            "cat" => {
                if args.is_empty() || args.iter().all(|a| a == "-") {
                    cat(io).await
                } else {
                    let mut code = 0;
                    for a in args {
                        let path = normalize(a);
                        let got = pod.files.with(&pod.namespace, &pod.pod, |fs| {
                            match fs.nodes.get(&path) {
                                Some(Node::File { data, .. }) => Ok(data.clone()),
                                Some(Node::Dir { .. }) => Err("Is a directory"),
                                None => Err("No such file or directory"),
                            }
                        });
                        match got {
                            Ok(data) => io.out(data).await,
                            Err(why) => {
                                io.err(format!("cat: {a}: {why}\n")).await;
                                code = 1;
                            }
                        }
                    }
                    code
                }
            }
            "env" | "printenv" => {
                let mut env = String::from(
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
                );
                env.push_str(&format!("HOSTNAME={}\n", pod.pod));
                if io.tty {
                    env.push_str("TERM=xterm\n");
                }
                env.push_str("KUBERNETES_SERVICE_HOST=10.96.0.1\n");
                env.push_str("KUBERNETES_SERVICE_PORT=443\n");
                env.push_str("KUBERNETES_PORT=tcp://10.96.0.1:443\n");
                env.push_str("HOME=/root\n");
                io.out(env).await;
                0
            }
            "hostname" => {
                io.out(format!("{}\n", pod.pod)).await;
                0
            }
            "sleep" => {
                let secs: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(-1.0);
                if !(0.0..=1e7).contains(&secs) {
                    io.err("sleep: invalid time interval\n").await;
                    1
                } else {
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    0
                }
            }
            "gen" => match args.first().and_then(|a| parse_size(a)) {
                Some(n) => {
                    gen(io, n).await;
                    0
                }
                None => {
                    io.err("gen: usage: gen BYTES\n").await;
                    2
                }
            },
            "test" | "[" => {
                let args: Vec<&str> = args
                    .iter()
                    .map(String::as_str)
                    .filter(|a| !(name == "[" && *a == "]"))
                    .collect();
                test(&args, pod)
            }
            "ls" => ls(args, io, pod).await,
            "mkdir" => {
                let mut code = 0;
                for a in args.iter().filter(|a| !a.starts_with('-')) {
                    let path = normalize(a);
                    if let Err(e) = pod
                        .files
                        .with(&pod.namespace, &pod.pod, |fs| fs.mkdir_all(&path))
                    {
                        io.err(format!("mkdir: cannot create directory '{a}': {e}\n"))
                            .await;
                        code = 1;
                    }
                }
                code
            }
            "tar" => tar(args, io, pod).await,
            "tail" | "head" | "wc" => filter(&name, args, io).await,
            "sh" | "bash" | "ash" | "dash" => {
                // Each nested shell adds a level of (boxed) futures; bound it so a script or an
                // interactive stdin full of `sh` lines cannot exhaust the stack.
                if io.depth >= MAX_SHELL_DEPTH {
                    io.err("sh: too many nested shells\n").await;
                    return Flow::Status(2);
                }
                io.depth += 1;
                let flow = shell(args, io, pod).await;
                io.depth -= 1;
                return flow;
            }
            _ => {
                io.err(format!("sh: 1: {first}: not found\n")).await;
                127
            }
        };
        Flow::Status(code)
    })
}

/// Where a redirected descriptor goes (`>&2`, `2>&1`, `>/dev/null`, `> FILE`, `>> FILE`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Redirect {
    Fd(u8),
    Null,
    File { path: String, append: bool },
}

/// The redirections for stdout and stderr, and `< FILE` for stdin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Redirects {
    out: [Option<Redirect>; 2],
    stdin: Option<String>,
}

/// Splits shell redirections off `argv`; `None` when there are none.
fn parse_redirects(argv: &[String]) -> Result<Option<(Vec<String>, Redirects)>, String> {
    let mut words = Vec::new();
    let mut r = Redirects::default();
    let mut found = false;
    let mut it = argv.iter();
    while let Some(w) = it.next() {
        let (fd, rest) = match w.as_bytes() {
            [b'1' | b'2', b'>', ..] => (usize::from(w.as_bytes()[0] - b'1'), &w[1..]),
            [b'>', ..] => (0, &w[..]),
            [b'<', ..] => {
                found = true;
                let target = if w.len() > 1 {
                    Some(w[1..].to_owned())
                } else {
                    it.next().cloned()
                };
                r.stdin = Some(target.ok_or("Syntax error: newline unexpected")?);
                continue;
            }
            _ => {
                words.push(w.clone());
                continue;
            }
        };
        found = true;
        let (append, target) = match rest.strip_prefix(">>") {
            Some(t) => (true, t),
            None => (false, rest.strip_prefix('>').unwrap_or(rest)),
        };
        let target = if target.is_empty() {
            it.next()
                .cloned()
                .ok_or("Syntax error: newline unexpected")?
        } else {
            target.to_owned()
        };
        r.out[fd] = Some(match target.as_str() {
            "&1" => Redirect::Fd(1),
            "&2" => Redirect::Fd(2),
            "/dev/null" => Redirect::Null,
            t if t.starts_with('&') => return Err(format!("{t}: bad file descriptor")),
            t => Redirect::File {
                path: t.to_owned(),
                append,
            },
        });
    }
    Ok(found.then_some((words, r)))
}

/// Runs `argv` with its outputs (and maybe stdin) redirected.
async fn run_redirected(
    argv: &[String],
    redirects: Redirects,
    io: &mut ProcIo,
    pod: &PodCtx,
) -> Flow {
    let file_input = match &redirects.stdin {
        Some(path) => {
            let path = normalize(path);
            let data = pod
                .files
                .with(&pod.namespace, &pod.pod, |fs| match fs.nodes.get(&path) {
                    Some(Node::File { data, .. }) => Some(data.clone()),
                    _ => None,
                });
            match data {
                Some(d) => Some(d),
                None => {
                    io.err(format!(
                        "sh: 1: cannot open {}: No such file\n",
                        redirects.stdin.as_deref().unwrap_or("")
                    ))
                    .await;
                    return Flow::Status(2);
                }
            }
        }
        None => None,
    };
    let stdin = match file_input {
        Some(data) => {
            let (tx, rx) = mpsc::channel(1);
            if !data.is_empty() {
                let _ = tx.try_send(data);
            }
            rx
        }
        None => std::mem::replace(&mut io.stdin, closed_stdin()),
    };
    let (tx, mut rx) = mpsc::channel::<(u8, Bytes)>(16);
    let mut inner = io.with_stdin(stdin, tx);
    inner.stdout = true;
    inner.stderr = true;
    let outer = io.out.clone();
    let (stdout_wanted, stderr_wanted) = (io.stdout, io.stderr);
    let targets = redirects.out.clone();
    let collect = async move {
        let mut files: Vec<(String, bool, Vec<u8>)> = Vec::new();
        while let Some((fd, data)) = rx.recv().await {
            let idx = usize::from(fd.saturating_sub(1).min(1));
            let dest = match &targets[idx] {
                None => Redirect::Fd(fd),
                Some(d) => d.clone(),
            };
            match dest {
                Redirect::Fd(n) => {
                    let wanted = if n == 1 { stdout_wanted } else { stderr_wanted };
                    if wanted {
                        let _ = outer.send((n, data)).await;
                    }
                }
                Redirect::Null => {}
                Redirect::File { path, append } => {
                    match files.iter_mut().find(|(p, _, _)| *p == path) {
                        Some((_, _, buf)) => buf.extend_from_slice(&data),
                        None => files.push((path, append, data.to_vec())),
                    }
                }
            }
        }
        files
    };
    let run = async move {
        let f = run_argv(argv, &mut inner, pod).await;
        let stdin = std::mem::replace(&mut inner.stdin, closed_stdin());
        drop(inner);
        (f, stdin)
    };
    let ((flow, stdin), files) = tokio::join!(run, collect);
    if redirects.stdin.is_none() {
        io.stdin = stdin;
    }
    // `> FILE` creates the file even when nothing was written.
    let mut files = files;
    for r in redirects.out.iter().flatten() {
        if let Redirect::File { path, append } = r {
            if !files.iter().any(|(p, _, _)| p == path) {
                files.push((path.clone(), *append, Vec::new()));
            }
        }
    }
    pod.files.with(&pod.namespace, &pod.pod, |fs| {
        for (path, append, data) in files {
            let path = normalize(&path);
            let mut content = Vec::new();
            if append {
                if let Some(Node::File { data: old, .. }) = fs.nodes.get(&path) {
                    content.extend_from_slice(old);
                }
            }
            content.extend_from_slice(&data);
            fs.write(&path, Bytes::from(content), 0o644);
        }
    });
    flow
}

/// `cat` of stdin (also the attach target). ^C on a terminal ends it like SIGINT (130).
async fn cat(io: &mut ProcIo) -> i32 {
    while let Some(chunk) = io.read().await {
        io.out(chunk).await;
    }
    if io.interrupted {
        130
    } else {
        0
    }
}

/// The `gen` pattern: printable and position-dependent, so a test can check every byte.
pub const GEN_PATTERN: &[u8; 64] =
    b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.\n";

/// Writes `n` bytes of [`GEN_PATTERN`] repeated (byte i is `GEN_PATTERN[i % 64]`).
async fn gen(io: &ProcIo, n: u64) {
    const CHUNK: usize = 64 * 1024;
    let block: Bytes = GEN_PATTERN.iter().copied().cycle().take(CHUNK).collect();
    let mut left = n;
    while left > 0 {
        let take = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        io.out(block.slice(..take)).await;
        left -= take as u64;
        if io.out.is_closed() {
            return;
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

fn test(args: &[&str], pod: &PodCtx) -> i32 {
    if args.first() == Some(&"!") {
        // `test ! EXPR` negates (not recursive: any number of `!` is fine).
        let negations = args.iter().take_while(|a| **a == "!").count();
        let code = test(&args[negations..], pod);
        return if code > 1 || negations % 2 == 0 {
            code
        } else {
            1 - code
        };
    }
    let ok = match args {
        [] => false,
        [s] => !s.is_empty(),
        [op, path] => {
            let path = normalize(path);
            pod.files.with(&pod.namespace, &pod.pod, |fs| match *op {
                "-d" => fs.is_dir(&path),
                "-f" => matches!(fs.nodes.get(&path), Some(Node::File { .. })),
                "-e" => fs.exists(&path),
                "-s" => {
                    matches!(fs.nodes.get(&path), Some(Node::File { data, .. }) if !data.is_empty())
                }
                "-n" => !path.is_empty(),
                _ => false,
            })
        }
        [a, "=", b] => a == b,
        [a, "!=", b] => a != b,
        _ => return 2,
    };
    i32::from(!ok)
}

async fn ls(args: &[String], io: &ProcIo, pod: &PodCtx) -> i32 {
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let paths: Vec<String> = if paths.is_empty() {
        vec!["/".to_owned()]
    } else {
        paths.into_iter().cloned().collect()
    };
    let mut code = 0;
    for p in paths {
        let path = normalize(&p);
        let listing = pod
            .files
            .with(&pod.namespace, &pod.pod, |fs| match fs.nodes.get(&path) {
                Some(Node::Dir { .. }) => Some(fs.children(&path)),
                Some(Node::File { .. }) => Some(vec![p.clone()]),
                None => None,
            });
        match listing {
            Some(names) => {
                let mut text = names.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                io.out(text).await;
            }
            None => {
                io.err(format!(
                    "ls: cannot access '{p}': No such file or directory\n"
                ))
                .await;
                code = 2;
            }
        }
    }
    code
}

/// The few filters pipelines need: `tail -c +N`, `tail -c N`, `head -c N`, `wc -c`.
async fn filter(name: &str, args: &[String], io: &mut ProcIo) -> i32 {
    let Ok(input) = io.read_all(MAX_TAR_INPUT).await else {
        io.err(format!("{name}: input too large\n")).await;
        return 1;
    };
    // Accept "-c+N", "-c +N", "-cN", "-c N".
    let joined = args.join(" ");
    let spec = joined.trim_start_matches("-c").trim().to_owned();
    let output = match name {
        "wc" => format!("{}\n", input.len()).into_bytes(),
        "tail" => {
            if let Some(from) = spec.strip_prefix('+').and_then(|n| n.parse::<usize>().ok()) {
                // tail -c +N: output starting with byte N (1-based).
                input
                    .get(from.saturating_sub(1)..)
                    .unwrap_or_default()
                    .to_vec()
            } else if let Ok(n) = spec.parse::<usize>() {
                input[input.len().saturating_sub(n)..].to_vec()
            } else {
                input
            }
        }
        _ => match spec.parse::<usize>() {
            Ok(n) => input[..n.min(input.len())].to_vec(),
            Err(_) => input,
        },
    };
    io.out(output).await;
    0
}

// === The mini shell (`sh -c`) ===

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    /// `;`, newline, `&&`, `||`, `|`
    Op(&'static str),
}

/// Splits a script into words and operators, honouring '…', "…" and backslashes.
fn tokenize(script: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let flush = |tokens: &mut Vec<Token>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            tokens.push(Token::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => return Err("Syntax error: Unterminated quoted string".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => word.push(ch),
                            Some(ch) => {
                                word.push('\\');
                                word.push(ch);
                            }
                            None => return Err("Syntax error: Unterminated quoted string".into()),
                        },
                        Some(ch) => word.push(ch),
                        None => return Err("Syntax error: Unterminated quoted string".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(ch) = chars.next() {
                    if ch != '\n' {
                        word.push(ch);
                    }
                }
            }
            ' ' | '\t' => flush(&mut tokens, &mut word, &mut in_word),
            ';' | '\n' => {
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Op(";"));
            }
            '&' if chars.peek() == Some(&'&') => {
                chars.next();
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Op("&&"));
            }
            '|' if chars.peek() == Some(&'|') => {
                chars.next();
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Op("||"));
            }
            '|' => {
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Op("|"));
            }
            '#' if !in_word => {
                // A comment runs to the end of the line.
                for ch in chars.by_ref() {
                    if ch == '\n' {
                        tokens.push(Token::Op(";"));
                        break;
                    }
                }
            }
            ch => {
                in_word = true;
                word.push(ch);
            }
        }
    }
    flush(&mut tokens, &mut word, &mut in_word);
    Ok(tokens)
}

/// `sh -c SCRIPT`, or an interactive `sh` reading commands from stdin line by line.
async fn shell(args: &[String], io: &mut ProcIo, pod: &PodCtx) -> Flow {
    if let Some(pos) = args.iter().position(|a| a == "-c") {
        let Some(script) = args.get(pos + 1) else {
            io.err("sh: 0: -c requires an argument\n").await;
            return Flow::Status(2);
        };
        return Flow::Status(run_script(script, io, pod).await.code());
    }
    // Interactive: one line at a time, `exit` ends it.
    let mut pending = Vec::new();
    let mut last = 0;
    loop {
        if io.tty {
            io.out("# ").await;
        }
        let line = loop {
            if let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let rest = pending.split_off(i + 1);
                break Some(std::mem::replace(&mut pending, rest));
            }
            match io.read().await {
                Some(chunk) => pending.extend_from_slice(&chunk),
                None if pending.is_empty() => break None,
                None => break Some(std::mem::take(&mut pending)),
            }
        };
        let Some(line) = line else {
            return Flow::Status(if io.interrupted { 130 } else { last });
        };
        match run_script(&String::from_utf8_lossy(&line), io, pod).await {
            Flow::Exit(c) => return Flow::Status(c),
            Flow::Status(c) => last = c,
        }
    }
}

fn run_script<'a>(script: &'a str, io: &'a mut ProcIo, pod: &'a PodCtx) -> BoxFut<'a, Flow> {
    Box::pin(async move {
        let tokens = match tokenize(script) {
            Ok(t) => t,
            Err(e) => {
                io.err(format!("sh: 1: {e}\n")).await;
                return Flow::Status(2);
            }
        };
        // Split into pipelines joined by ; && ||.
        let mut last = 0;
        let mut connector = ";";
        let mut pipeline: Vec<Vec<String>> = vec![Vec::new()];
        let mut items: Vec<(&'static str, Vec<Vec<String>>)> = Vec::new();
        for t in tokens {
            match t {
                Token::Word(w) => {
                    if let Some(cmd) = pipeline.last_mut() {
                        cmd.push(w);
                    }
                }
                Token::Op("|") => pipeline.push(Vec::new()),
                Token::Op(op) => {
                    items.push((
                        connector,
                        std::mem::replace(&mut pipeline, vec![Vec::new()]),
                    ));
                    connector = op;
                }
            }
        }
        items.push((connector, pipeline));
        for (connector, stages) in items {
            let stages: Vec<Vec<String>> = stages.into_iter().filter(|s| !s.is_empty()).collect();
            if stages.is_empty() {
                continue;
            }
            let skip = match connector {
                "&&" => last != 0,
                "||" => last == 0,
                _ => false,
            };
            if skip {
                continue;
            }
            match run_pipeline(&stages, io, pod).await {
                Flow::Exit(c) => return Flow::Exit(c),
                Flow::Status(c) => last = c,
            }
        }
        Flow::Status(last)
    })
}

/// Runs `a | b | c`: each stage's stdout is buffered and fed to the next (fine for the small
/// pipelines `kubectl cp --retries` uses). The first stage reads the real stdin, the last
/// writes the real stdout; stderr always goes straight out.
async fn run_pipeline(stages: &[Vec<String>], io: &mut ProcIo, pod: &PodCtx) -> Flow {
    if stages.len() == 1 {
        return run_argv(&stages[0], io, pod).await;
    }
    let mut input: Option<Vec<u8>> = None;
    let mut flow = Flow::Status(0);
    for (i, argv) in stages.iter().enumerate() {
        let last = i + 1 == stages.len();
        let stdin = match input.take() {
            None => std::mem::replace(&mut io.stdin, closed_stdin()),
            Some(data) => {
                let (tx, rx) = mpsc::channel(1);
                if !data.is_empty() {
                    let _ = tx.try_send(Bytes::from(data));
                }
                rx
            }
        };
        let first = i == 0;
        if last {
            let mut stage = io.with_stdin(stdin, io.out.clone());
            stage.stdout = io.stdout;
            flow = run_argv(argv, &mut stage, pod).await;
        } else {
            let (tx, mut rx) = mpsc::channel::<(u8, Bytes)>(16);
            let mut stage = io.with_stdin(stdin, tx);
            let outer = io.out.clone();
            let collect = async move {
                let mut buf = Vec::new();
                while let Some((fd, data)) = rx.recv().await {
                    if fd == 1 {
                        buf.extend_from_slice(&data);
                    } else {
                        let _ = outer.send((fd, data)).await;
                    }
                }
                buf
            };
            let run = async move {
                let f = run_argv(argv, &mut stage, pod).await;
                drop(stage);
                f
            };
            let (f, buf) = tokio::join!(run, collect);
            if let Flow::Exit(_) = f {
                return f;
            }
            input = Some(buf);
        }
        if first {
            // The real stdin was consumed by the first stage; later reads see EOF.
            io.stdin_eof = true;
        }
    }
    flow
}

// === tar, as `kubectl cp` runs it ===

/// `tar cf - PATH…` (copy from the pod) and `tar [--no-same-*] -xmf - -C DIR` (copy into it):
/// the two forms kubectl's cp.go uses (with `-C` optional), in old (`cf`) or dashed (`-xmf`)
/// option style. Messages and exit codes follow GNU tar.
async fn tar(args: &[String], io: &mut ProcIo, pod: &PodCtx) -> i32 {
    let mut mode = None;
    let mut archive = None;
    let mut dir = String::from("/");
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if let Some(long) = a.strip_prefix("--") {
            match long.split_once('=') {
                Some(("directory", d)) => dir = join_path(&dir, d),
                Some(("file", f)) => archive = Some(f.to_owned()),
                _ => match long {
                    "extract" | "get" => mode = Some('x'),
                    "create" => mode = Some('c'),
                    // --no-same-permissions, --no-same-owner, --touch…: no effect in the sim.
                    _ => {}
                },
            }
            continue;
        }
        // The first argument may be old-style bundled options without a dash ("cf").
        let bundle = if let Some(b) = a.strip_prefix('-') {
            b
        } else if i == 1 {
            a.as_str()
        } else {
            operands.push(a.clone());
            continue;
        };
        for c in bundle.chars() {
            match c {
                'x' | 'c' | 't' => mode = Some(c),
                'f' => {
                    archive = args.get(i).cloned();
                    i += 1;
                }
                'C' => {
                    if let Some(d) = args.get(i) {
                        dir = join_path(&dir, d);
                    }
                    i += 1;
                }
                'z' | 'j' | 'J' => {
                    io.err("tar: compression is not supported by this simulator\n")
                        .await;
                    return 2;
                }
                _ => {} // m, p, o, v, …
            }
        }
    }
    if archive.as_deref().is_some_and(|f| f != "-") {
        io.err("tar: only '-' (stdin/stdout) archives are supported by this simulator\n")
            .await;
        return 2;
    }
    match mode {
        Some('c') => tar_create(&operands, &dir, io, pod).await,
        Some('x') => tar_extract(&dir, io, pod).await,
        Some('t') => tar_list(io).await,
        _ => {
            io.err("tar: You must specify one of the '-Acdtrux', '--delete' or '--test-label' options\nTry 'tar --help' or 'tar --usage' for more information.\n").await;
            2
        }
    }
}

async fn tar_create(operands: &[String], dir: &str, io: &ProcIo, pod: &PodCtx) -> i32 {
    if operands.is_empty() {
        io.err("tar: Cowardly refusing to create an empty archive\nTry 'tar --help' or 'tar --usage' for more information.\n").await;
        return 2;
    }
    let mut stderr = String::new();
    let mut failed = false;
    let mut builder = tar::Builder::new(Vec::new());
    let mut warned = false;
    for operand in operands {
        // GNU tar keeps the operand as given, minus leading slashes (and says so once).
        let member = operand.trim_start_matches('/');
        if member.len() != operand.len() && !warned {
            stderr.push_str("tar: Removing leading `/' from member names\n");
            warned = true;
        }
        let path = join_path(dir, operand);
        let entries = pod
            .files
            .with(&pod.namespace, &pod.pod, |fs| fs.walk(&path));
        if entries.is_empty() {
            stderr.push_str(&format!(
                "tar: {operand}: Cannot stat: No such file or directory\n"
            ));
            failed = true;
            continue;
        }
        let member = member.trim_end_matches('/');
        for (p, node) in entries {
            let rel = &p[path.len()..];
            let mut name = if member.is_empty() {
                rel.trim_start_matches('/').to_owned()
            } else {
                format!("{member}{rel}")
            };
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            let _ = header.set_username("root");
            let _ = header.set_groupname("root");
            let result = match node {
                Node::Dir { mtime } => {
                    if name.is_empty() {
                        continue;
                    }
                    name.push('/');
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_mtime(mtime);
                    header.set_size(0);
                    builder.append_data(&mut header, &name, std::io::empty())
                }
                Node::File { data, mode, mtime } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(mode);
                    header.set_mtime(mtime);
                    header.set_size(data.len() as u64);
                    builder.append_data(&mut header, &name, &data[..])
                }
            };
            if let Err(e) = result {
                stderr.push_str(&format!("tar: {name}: {e}\n"));
                failed = true;
            }
        }
    }
    let archive = builder.into_inner().unwrap_or_default();
    if !stderr.is_empty() {
        io.err(stderr).await;
    }
    io.out(archive).await;
    if failed {
        io.err("tar: Exiting with failure status due to previous errors\n")
            .await;
        2
    } else {
        0
    }
}

/// One member read from an archive on stdin.
enum Member {
    Dir(String),
    File(String, Vec<u8>, u32),
    Skipped(String, &'static str),
}

fn read_archive(data: &[u8]) -> Result<Vec<Member>, String> {
    let mut archive = tar::Archive::new(data);
    let entries = archive
        .entries()
        .map_err(|_| "This does not look like a tar archive".to_owned())?;
    let mut members = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("Skipping to next header: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("invalid member name: {e}"))?
            .to_string_lossy()
            .into_owned();
        let name = raw.trim_start_matches('/').trim_end_matches('/').to_owned();
        if name.split('/').any(|c| c == "..") {
            members.push(Member::Skipped(raw, "Member name contains '..'"));
            continue;
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => members.push(Member::Dir(name)),
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mode = entry.header().mode().unwrap_or(0o644);
                let mut content = Vec::new();
                entry
                    .read_to_end(&mut content)
                    .map_err(|e| format!("{name}: {e}"))?;
                members.push(Member::File(name, content, mode));
            }
            _ => members.push(Member::Skipped(
                name,
                "links and special files are not supported by this simulator",
            )),
        }
    }
    Ok(members)
}

async fn tar_extract(dir: &str, io: &mut ProcIo, pod: &PodCtx) -> i32 {
    let dir_exists = pod
        .files
        .with(&pod.namespace, &pod.pod, |fs| fs.is_dir(dir));
    if !dir_exists {
        // GNU tar checks -C before reading the archive.
        io.err(format!(
            "tar: {dir}: Cannot open: No such file or directory\ntar: Error is not recoverable: exiting now\n"
        ))
        .await;
        return 2;
    }
    let Ok(data) = io.read_all(MAX_TAR_INPUT).await else {
        io.err("tar: write error: No space left on device\n").await;
        return 2;
    };
    if data.is_empty() {
        return 0;
    }
    let members = match read_archive(&data) {
        Ok(m) => m,
        Err(e) => {
            io.err(format!(
                "tar: {e}\ntar: Exiting with failure status due to previous errors\n"
            ))
            .await;
            return 2;
        }
    };
    let mut stderr = String::new();
    pod.files.with(&pod.namespace, &pod.pod, |fs| {
        for m in members {
            match m {
                Member::Dir(name) => {
                    if let Err(e) = fs.mkdir_all(&join_path(dir, &name)) {
                        stderr.push_str(&format!("tar: {name}: Cannot mkdir: {e}\n"));
                    }
                }
                Member::File(name, content, mode) => {
                    let path = join_path(dir, &name);
                    if fs.is_dir(&path) {
                        stderr.push_str(&format!("tar: {name}: Cannot open: Is a directory\n"));
                    } else {
                        fs.write(&path, Bytes::from(content), mode);
                    }
                }
                Member::Skipped(name, why) => {
                    stderr.push_str(&format!("tar: {name}: {why}\n"));
                }
            }
        }
    });
    if stderr.is_empty() {
        0
    } else {
        io.err(stderr).await;
        io.err("tar: Exiting with failure status due to previous errors\n")
            .await;
        2
    }
}

async fn tar_list(io: &mut ProcIo) -> i32 {
    let Ok(data) = io.read_all(MAX_TAR_INPUT).await else {
        return 2;
    };
    match read_archive(&data) {
        Ok(members) => {
            let mut out = String::new();
            for m in members {
                match m {
                    Member::Dir(n) => out.push_str(&format!("{n}/\n")),
                    Member::File(n, ..) | Member::Skipped(n, _) => {
                        out.push_str(&n);
                        out.push('\n');
                    }
                }
            }
            io.out(out).await;
            0
        }
        Err(e) => {
            io.err(format!("tar: {e}\n")).await;
            2
        }
    }
}

// === Sessions: remotecommand ===

/// Starts the process with its stdin fed from `stdin_rx`, returns its output receiver and the
/// join handle of its exit code.
fn spawn_process(
    opts: &ExecOptions,
    pod: PodCtx,
    stdin_rx: mpsc::Receiver<Bytes>,
) -> (mpsc::Receiver<(u8, Bytes)>, tokio::task::JoinHandle<i32>) {
    let (out_tx, out_rx) = mpsc::channel(64);
    let io = ProcIo {
        stdin: stdin_rx,
        out: out_tx,
        stdout: opts.stdout,
        stderr: opts.stderr || opts.tty,
        tty: opts.tty,
        stdin_eof: !opts.stdin,
        interrupted: false,
        depth: 0,
    };
    let argv = opts.command.clone();
    let kind = opts.kind;
    let task = tokio::spawn(run_process(argv, kind, io, pod));
    (out_rx, task)
}

/// Exec/attach over SPDY, the kubelet's `createHTTPStreamStreams` + `ServeExec`.
async fn spdy_exec<IO>(io: IO, opts: ExecOptions, version: RemoteVersion, pod: PodCtx)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (session, mut incoming) = spdy::serve(io, |h| {
        // The kubelet replies to every stream and sorts them by `streamType` afterwards;
        // unknown types are dropped, which we do up front.
        matches!(
            h.get("streamtype"),
            Some("error" | "stdin" | "stdout" | "stderr" | "resize")
        )
    });
    // Expected streams: error, plus each requested one, plus resize for a TTY from v3 on.
    let expected = 1
        + usize::from(opts.stdin)
        + usize::from(opts.stdout)
        + usize::from(opts.stderr)
        + usize::from(opts.tty && version >= RemoteVersion::V3);
    let mut streams: HashMap<String, spdy::Stream> = HashMap::new();
    let mut received = 0;
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while received < expected {
        tokio::select! {
            s = incoming.recv() => match s {
                Some(s) => {
                    let ty = s.headers().get("streamtype").unwrap_or("").to_owned();
                    streams.insert(ty, s);
                    received += 1;
                }
                None => return, // the client went away
            },
            _ = &mut deadline => {
                tracing::debug!("timed out waiting for client to create streams");
                session.go_away().await;
                return;
            }
        }
    }

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let consumes_stdin = opts.stdin && process_reads_stdin(&opts);
    let mut resets = Vec::new();
    if let Some(stdin) = streams.remove("stdin") {
        let (mut rx, tx) = stdin.split();
        resets.push(tx);
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                // A process that never reads stdin must not stall the session: discard.
                if consumes_stdin && stdin_tx.send(chunk).await.is_err() {
                    break;
                }
            }
            // Dropping stdin_tx is EOF for the process.
        });
    } else {
        drop(stdin_tx);
    }
    if let Some(resize) = streams.remove("resize") {
        let (mut rx, tx) = resize.split();
        resets.push(tx);
        // Resize events are JSON {"Width":…,"Height":…}; the simulated terminal has no size.
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
    }
    let stdout = streams.remove("stdout").map(|s| s.sender());
    let stderr = streams.remove("stderr").map(|s| s.sender());
    let error = streams.remove("error").map(|s| s.sender());

    let (mut out_rx, process) = spawn_process(&opts, pod, stdin_rx);
    let abort = process.abort_handle();
    let pump = async {
        while let Some((fd, data)) = out_rx.recv().await {
            let target = if fd == 1 { &stdout } else { &stderr };
            if let Some(s) = target {
                let _ = s.send(data).await;
            }
        }
    };
    let exit = tokio::select! {
        (code, _) = async { tokio::join!(process, pump) } => match code {
            Ok(c) => Exit::Code(c),
            Err(_) => Exit::Code(126),
        },
        _ = session.closed() => Exit::Aborted,
    };
    let Exit::Code(code) = exit else {
        abort.abort();
        return;
    };
    // ServeExec's end: output streams closed, the status written, every other stream reset
    // and GOAWAY (conn.Close).
    for s in stdout.iter().chain(stderr.iter()) {
        let _ = s.finish().await;
    }
    if let Some(err) = &error {
        if let Some(bytes) = exit_status_bytes(code, version, &opts.command) {
            let _ = err.send(Bytes::from(bytes)).await;
        }
        let _ = err.finish().await;
    }
    for s in resets {
        let _ = s.reset(spdy::rst::CANCEL).await;
    }
    session.go_away().await;
    session.closed().await;
}

/// Whether the simulated command reads stdin at all (others get their stdin discarded).
fn process_reads_stdin(opts: &ExecOptions) -> bool {
    if opts.kind == StreamKind::Attach {
        return true;
    }
    let name = opts
        .command
        .first()
        .map(|c| c.rsplit('/').next().unwrap_or(c))
        .unwrap_or("");
    matches!(
        name,
        "cat" | "tar" | "sh" | "bash" | "ash" | "dash" | "tail" | "head" | "wc"
    )
}

/// Encoding of remotecommand WebSocket messages (`wsstream.Conn`).
fn ws_encode(proto: WsProtocol, channel: u8, data: &[u8]) -> Message {
    if proto.base64 {
        let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
        text.push(char::from(b'0'.wrapping_add(channel)));
        base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
        Message::Text(text.into())
    } else {
        let mut frame = BytesMut::with_capacity(1 + data.len());
        frame.put_u8(channel);
        frame.extend_from_slice(data);
        Message::Binary(frame.freeze())
    }
}

/// What a client message means on a channel protocol.
#[derive(Debug, PartialEq, Eq)]
enum WsInput {
    Data(u8, Bytes),
    /// v5 CLOSE: `[255, channel]`, half-close of that channel.
    Close(u8),
    /// Nothing to do (empty message, undecodable base64: the kubelet logs and continues).
    Ignore,
    /// A protocol error that ends the session (a malformed v5 CLOSE).
    Fatal,
}

fn ws_decode(proto: WsProtocol, msg: &[u8]) -> WsInput {
    let Some((&first, rest)) = msg.split_first() else {
        return WsInput::Ignore;
    };
    if proto.version == RemoteVersion::V5 && first == 255 {
        return match rest {
            [channel] => WsInput::Close(*channel),
            _ => WsInput::Fatal,
        };
    }
    if proto.base64 {
        let channel = first.wrapping_sub(b'0');
        match base64::engine::general_purpose::STANDARD.decode(rest) {
            Ok(data) => WsInput::Data(channel, Bytes::from(data)),
            Err(_) => WsInput::Ignore,
        }
    } else {
        WsInput::Data(first, Bytes::copy_from_slice(rest))
    }
}

type WsSink<S> = futures_util::stream::SplitSink<WebSocketStream<S>, Message>;
type WsSource<S> = futures_util::stream::SplitStream<WebSocketStream<S>>;

fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// Ends a WebSocket session as `x/net/websocket`'s `Conn.Close` does for the kubelet: a Close
/// frame (1000; tungstenite turns it into the reply if the peer closed first), then, once the
/// reader saw the peer's Close or a grace period passed, the TLS stream is shut down
/// (close_notify) instead of dropped.
async fn ws_close<S>(mut sink: WsSink<S>, reader: tokio::task::JoinHandle<WsSource<S>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // After the peer's Close, tungstenite refuses to send another but has queued the reply:
    // closing the sink flushes it.
    if sink.send(normal_close()).await.is_err() {
        let _ = sink.close().await;
    }
    let abort = reader.abort_handle();
    match tokio::time::timeout(WS_CLOSE_GRACE, reader).await {
        Ok(Ok(source)) => {
            if let Ok(mut ws) = sink.reunite(source) {
                let _ = tokio::time::timeout(WS_CLOSE_GRACE, ws.get_mut().shutdown()).await;
            }
        }
        _ => abort.abort(),
    }
}

/// Exec/attach over WebSocket: the kubelet's `createWebSocketStreams` (v1–v4) and the
/// apiserver's stream translator (v5, which alone has CLOSE).
async fn ws_exec<S>(ws: WebSocketStream<S>, opts: ExecOptions, proto: WsProtocol, pod: PodCtx)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    // "Send an empty message to the lowest writable channel to notify the client the
    // connection is established."
    let hello = if opts.stdout {
        1
    } else if opts.stderr {
        2
    } else {
        3
    };
    if sink.send(ws_encode(proto, hello, &[])).await.is_err() {
        return;
    }

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let consumes_stdin = opts.stdin && process_reads_stdin(&opts);
    let client_gone = CancellationToken::new();
    let reader = {
        let client_gone = client_gone.clone();
        let want_stdin = opts.stdin;
        tokio::spawn(async move {
            let mut stdin_tx = Some(stdin_tx);
            while let Some(msg) = source.next().await {
                // x/net/websocket's Message.Receive into []byte takes text and binary frames
                // alike; the subprotocol alone decides the codec.
                let payload = match msg {
                    Ok(Message::Binary(b)) => b,
                    Ok(Message::Text(t)) => Bytes::from(t.as_str().to_owned()),
                    // tungstenite answers pings itself while we read.
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                    Ok(Message::Close(_)) | Err(_) => break,
                };
                match ws_decode(proto, &payload) {
                    WsInput::Data(0, data) if want_stdin => {
                        if let Some(tx) = &stdin_tx {
                            if consumes_stdin && tx.send(data).await.is_err() {
                                stdin_tx = None;
                            }
                        }
                    }
                    WsInput::Close(0) => stdin_tx = None,
                    // Resize (4) is accepted and ignored; other channels are not readable.
                    WsInput::Data(..) | WsInput::Close(_) | WsInput::Ignore => {}
                    WsInput::Fatal => break,
                }
            }
            drop(stdin_tx);
            client_gone.cancel();
            source
        })
    };

    let (mut out_rx, process) = spawn_process(&opts, pod, stdin_rx);
    let abort = process.abort_handle();
    let mut send_failed = false;
    let pump = async {
        while let Some((fd, data)) = out_rx.recv().await {
            if !send_failed && sink.send(ws_encode(proto, fd, &data)).await.is_err() {
                send_failed = true;
            }
        }
    };
    let exit = tokio::select! {
        (code, _) = async { tokio::join!(process, pump) } => match code {
            Ok(c) => Exit::Code(c),
            Err(_) => Exit::Code(126),
        },
        _ = client_gone.cancelled() => Exit::Aborted,
    };
    match exit {
        Exit::Code(code) => {
            if let Some(bytes) = exit_status_bytes(code, proto.version, &opts.command) {
                let _ = sink.send(ws_encode(proto, 3, &bytes)).await;
            }
        }
        // The client closed first: stop the process, answer its Close.
        Exit::Aborted => abort.abort(),
    }
    ws_close(sink, reader).await;
}

// === Sessions: port-forward ===

/// The pod end of a forwarded port: an echo server.
async fn echo_port(data: spdy::Stream, error: spdy::Stream) {
    let (mut rx, tx) = data.split();
    while let Some(chunk) = rx.recv().await {
        if tx.send(chunk).await.is_err() {
            break;
        }
    }
    // Client FIN (its local connection closed) or reset: close ours, then the error stream
    // with nothing written (= success), like the kubelet's deferred Close calls.
    let _ = tx.finish().await;
    let _ = error.sender().finish().await;
}

/// Port-forward over SPDY (also used inside the WebSocket tunnel): the kubelet's
/// `httpStreamHandler`. Streams pair up by `requestID` (or the stream-id rule for clients
/// that send none) and each pair is an echo connection.
async fn spdy_port_forward<IO>(io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (session, mut incoming) = spdy::serve(io, |h| {
        // httpStreamReceived: port required, 1..65535; streamType error or data.
        let port_ok = h
            .get("port")
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p > 0);
        port_ok && matches!(h.get("streamtype"), Some("error" | "data"))
    });
    let mut pending: HashMap<String, (Option<spdy::Stream>, Option<spdy::Stream>)> = HashMap::new();
    while let Some(stream) = incoming.recv().await {
        let ty = stream.headers().get("streamtype").unwrap_or("").to_owned();
        let request_id = match stream.headers().get("requestid") {
            Some(id) if !id.is_empty() => id.to_owned(),
            // No requestID: error stream id, data stream id - 2 (kubelet requestID()).
            _ if ty == "error" => stream.id().to_string(),
            _ => stream.id().saturating_sub(2).to_string(),
        };
        let entry = pending.entry(request_id.clone()).or_default();
        let slot = if ty == "error" {
            &mut entry.0
        } else {
            &mut entry.1
        };
        if slot.is_some() {
            // "error/data stream already assigned": report on the error stream if any.
            let msg = format!(
                "error processing stream for request {request_id}: {ty} stream already assigned"
            );
            if let Some(err) = &entry.0 {
                let _ = err.sender().send(Bytes::from(msg)).await;
            }
            let _ = stream.sender().reset(spdy::rst::CANCEL).await;
            continue;
        }
        *slot = Some(stream);
        let complete = entry.0.is_some() && entry.1.is_some();
        if complete {
            if let Some((Some(error), Some(data))) = pending.remove(&request_id) {
                tokio::spawn(echo_port(data, error));
            }
        }
        // A half pair that never completes stays until the session ends (the kubelet reports
        // it after streamCreationTimeout; kubectl always sends both streams back to back).
    }
    // The peer closed the connection (or sent GOAWAY and closed).
    session.go_away().await;
}

/// kubectl ≥1.31: the SPDY port-forward session inside a WebSocket, one binary message per
/// chunk of SPDY bytes in each direction (`tunneling_connection.go`).
async fn ws_tunnel_port_forward<S>(ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    let (spdy_side, bridge_side) = tokio::io::duplex(256 * 1024);
    let (mut bridge_read, mut bridge_write) = tokio::io::split(bridge_side);
    let session = tokio::spawn(spdy_port_forward(spdy_side));
    // WebSocket → SPDY.
    let inbound = {
        tokio::spawn(async move {
            while let Some(msg) = source.next().await {
                match msg {
                    Ok(Message::Binary(b)) => {
                        if bridge_write.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    // The tunnel carries binary only; anything else is a protocol error.
                    Ok(Message::Text(_)) => break,
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                    Ok(Message::Close(_)) | Err(_) => break,
                }
            }
            let _ = bridge_write.shutdown().await;
            source
        })
    };
    // SPDY → WebSocket, until the SPDY session shuts its write half.
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        buf.reserve(32 * 1024);
        match bridge_read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if sink
                    .send(Message::Binary(buf.split().freeze()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    ws_close(sink, inbound).await;
    session.abort();
}

/// Port-forward over the channel protocols (Python, client-node): per requested port i,
/// channel 2i is data (read-write) and 2i+1 the error channel (write-only); the first message
/// on each carries the port, little-endian (`handleWebSocketStreams`). Each port echoes.
async fn ws_port_forward<S>(mut ws: WebSocketStream<S>, ports: Vec<u16>, proto: WsProtocol)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    for (i, port) in ports.iter().enumerate() {
        let Ok(data_ch) = u8::try_from(2 * i) else {
            break;
        };
        for ch in [data_ch, data_ch.wrapping_add(1)] {
            if ws
                .send(ws_encode(proto, ch, &port.to_le_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let channels = ports.len() * 2;
    // No CLOSE on these protocols: a port's stream lives as long as the connection. Echoing
    // inline keeps the order of each channel's bytes.
    while let Some(msg) = ws.next().await {
        let payload = match msg {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Text(t)) => Bytes::from(t.as_str().to_owned()),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => break,
        };
        if let WsInput::Data(ch, data) = ws_decode(proto, &payload) {
            if usize::from(ch) < channels
                && ch % 2 == 0
                && !data.is_empty()
                && ws.send(ws_encode(proto, ch, &data)).await.is_err()
            {
                break;
            }
        }
    }
    // The peer closed (or the connection broke): answer its Close, then close the stream.
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await;
    let _ = tokio::time::timeout(WS_CLOSE_GRACE, ws.get_mut().shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> PodCtx {
        PodCtx {
            namespace: "default".into(),
            pod: "web-0".into(),
            files: PodFiles::default(),
        }
    }

    /// Runs argv with the given stdin; returns (exit code, stdout, stderr).
    async fn run(pod: &PodCtx, argv: &[&str], stdin: &[u8], tty: bool) -> (i32, Vec<u8>, Vec<u8>) {
        let (in_tx, in_rx) = mpsc::channel(4);
        let opts = ExecOptions {
            kind: StreamKind::Exec,
            command: argv.iter().map(|s| s.to_string()).collect(),
            stdin: true,
            stdout: true,
            stderr: !tty,
            tty,
        };
        let (mut out_rx, task) = spawn_process(&opts, pod.clone(), in_rx);
        let data = Bytes::copy_from_slice(stdin);
        tokio::spawn(async move {
            if !data.is_empty() {
                let _ = in_tx.send(data).await;
            }
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some((fd, d)) = out_rx.recv().await {
            if fd == 1 {
                out.extend_from_slice(&d)
            } else {
                err.extend_from_slice(&d)
            }
        }
        (task.await.unwrap(), out, err)
    }

    #[test]
    fn query_flags_follow_apimachinery_rules() {
        let q = Query::parse("command=sh&command=-c&command=exit%203&stdin=True&stdout=0&tty=");
        let opts = ExecOptions::from_query(StreamKind::Exec, &q).unwrap();
        assert_eq!(opts.command, vec!["sh", "-c", "exit 3"]);
        assert!(opts.stdin);
        assert!(!opts.stdout);
        // tty= (empty) is true, and a TTY drops stderr (the kubelet's NewOptions).
        assert!(opts.tty);
        assert!(!opts.stderr);
        // stdout/stderr default to true (SetDefaults_PodExecOptions).
        let q = Query::parse("command=ls");
        let opts = ExecOptions::from_query(StreamKind::Exec, &q).unwrap();
        assert!(opts.stdout && opts.stderr && !opts.stdin);
        assert!(ExecOptions::from_query(StreamKind::Exec, &Query::parse("stdin=1")).is_err());
        assert!(ExecOptions::from_query(
            StreamKind::Attach,
            &Query::parse("stdout=false&stderr=false")
        )
        .is_err());
        assert_eq!(
            Query::parse("ports=8080,9090&ports=10").ports().unwrap(),
            vec![8080, 9090, 10]
        );
        assert!(Query::parse("ports=0").ports().is_err());
        assert!(Query::parse("").ports().is_err());
        assert_eq!(percent_decode("a%2Fb+c%zz%4"), "a/b c%zz%4");
    }

    #[test]
    fn status_bytes_match_the_kubelet() {
        let argv = vec!["sh".to_string(), "-c".into(), "exit 3".into()];
        assert_eq!(
            String::from_utf8(exit_status_bytes(0, RemoteVersion::V4, &argv).unwrap()).unwrap(),
            r#"{"metadata":{},"status":"Success"}"#
        );
        assert_eq!(
            String::from_utf8(exit_status_bytes(3, RemoteVersion::V4, &argv).unwrap()).unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
        assert!(exit_status_bytes(0, RemoteVersion::V2, &argv).is_none());
        assert!(
            String::from_utf8(exit_status_bytes(3, RemoteVersion::V1, &argv).unwrap())
                .unwrap()
                .starts_with("command terminated with non-zero exit code")
        );
    }

    #[test]
    fn channel_codecs() {
        let bin = WsProtocol {
            name: "v5.channel.k8s.io",
            base64: false,
            version: RemoteVersion::V5,
        };
        assert_eq!(
            ws_encode(bin, 1, b"hi"),
            Message::Binary(Bytes::from_static(&[1, b'h', b'i']))
        );
        assert_eq!(
            ws_decode(bin, &[0, b'x']),
            WsInput::Data(0, Bytes::from_static(b"x"))
        );
        assert_eq!(ws_decode(bin, &[255, 0]), WsInput::Close(0));
        assert_eq!(ws_decode(bin, &[255, 0, 1]), WsInput::Fatal);
        assert_eq!(ws_decode(bin, &[]), WsInput::Ignore);
        let b64 = WsProtocol {
            name: "v4.base64.channel.k8s.io",
            base64: true,
            version: RemoteVersion::V4,
        };
        assert_eq!(
            ws_encode(b64, 1, b"foo\n"),
            Message::Text("1Zm9vCg==".into())
        );
        assert_eq!(
            ws_decode(b64, b"0Zm9vCg=="),
            WsInput::Data(0, Bytes::from_static(b"foo\n"))
        );
        assert_eq!(ws_decode(b64, b"0!!!"), WsInput::Ignore);
        // v4 has no CLOSE: 255 is just an (invalid) channel.
        let v4 = WsProtocol {
            name: "v4.channel.k8s.io",
            base64: false,
            version: RemoteVersion::V4,
        };
        assert_eq!(
            ws_decode(v4, &[255, 0]),
            WsInput::Data(255, Bytes::from_static(&[0]))
        );
    }

    #[test]
    fn random_client_input_never_panics() {
        let mut x: u64 = 0x9e37_79b9;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let protos = [
            WsProtocol {
                name: "v5.channel.k8s.io",
                base64: false,
                version: RemoteVersion::V5,
            },
            WsProtocol {
                name: "v4.base64.channel.k8s.io",
                base64: true,
                version: RemoteVersion::V4,
            },
        ];
        for _ in 0..5000 {
            let len = (next() % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for p in protos {
                let _ = ws_decode(p, &bytes);
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let _ = Query::parse(&text).ports();
            let _ = ExecOptions::from_query(StreamKind::Exec, &Query::parse(&text));
            let _ = tokenize(&text);
            let _ = parse_redirects(&[text.clone(), ">".into()]);
            let _ = normalize(&text);
            let _ = read_archive(&bytes);
            let _ = parse_size(&text);
        }
    }

    #[test]
    fn websocket_negotiation_picks_first_client_offer() {
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("v4.channel.k8s.io, v3.channel.k8s.io, channel.k8s.io"),
        );
        assert_eq!(
            negotiate_websocket_exec(&h).unwrap().name,
            "v4.channel.k8s.io"
        );
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(
                "base64url.bearer.authorization.k8s.io.abc, v5.channel.k8s.io",
            ),
        );
        assert_eq!(
            negotiate_websocket_exec(&h).unwrap().name,
            "v5.channel.k8s.io"
        );
        // The bearer entry is consumed by authentication: alone, it leaves "no subprotocol".
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("base64url.bearer.authorization.k8s.io.abc"),
        );
        assert_eq!(negotiate_websocket_exec(&h).unwrap().name, "");
        h.insert("sec-websocket-protocol", HeaderValue::from_static("foo"));
        assert_eq!(
            negotiate_websocket_exec(&h).unwrap_err().status(),
            StatusCode::FORBIDDEN
        );
        let mut h = HeaderMap::new();
        h.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v5.channel.k8s.io"),
        );
        h.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        assert_eq!(
            negotiate_spdy(&h, &SPDY_REMOTECOMMAND_PROTOCOLS).unwrap(),
            "v4.channel.k8s.io"
        );
        let err = negotiate_spdy(&HeaderMap::new(), &SPDY_REMOTECOMMAND_PROTOCOLS).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn shell_tokenizer() {
        let t = tokenize(r#"echo 'a b' "c\"d" e\ f; exit 3 && x || y | z # c"#).unwrap();
        let w = |s: &str| Token::Word(s.into());
        assert_eq!(
            t,
            vec![
                w("echo"),
                w("a b"),
                w("c\"d"),
                w("e f"),
                Token::Op(";"),
                w("exit"),
                w("3"),
                Token::Op("&&"),
                w("x"),
                Token::Op("||"),
                w("y"),
                Token::Op("|"),
                w("z"),
            ]
        );
        assert!(tokenize("echo 'open").is_err());
    }

    #[tokio::test]
    async fn commands_behave_like_a_small_container() {
        let pod = ctx();
        assert_eq!(
            run(&pod, &["echo", "a", "b"], b"", false).await,
            (0, b"a b\n".to_vec(), vec![])
        );
        assert_eq!(run(&pod, &["cat"], b"xyz", false).await.1, b"xyz");
        assert_eq!(run(&pod, &["sh", "-c", "exit 3"], b"", false).await.0, 3);
        let (code, out, _) = run(&pod, &["sh", "-c", "echo x; exit 4; echo no"], b"", false).await;
        assert_eq!((code, out), (4, b"x\n".to_vec()));
        assert_eq!(
            run(&pod, &["sh", "-c", "false || echo y && true"], b"", false)
                .await
                .1,
            b"y\n"
        );
        assert_eq!(run(&pod, &["false"], b"", false).await.0, 1);
        let mut script = String::from("echo deep");
        for _ in 0..8 {
            script = format!(
                "sh -c \"{}\"",
                script.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        assert_eq!(
            run(&pod, &["sh", "-c", &script], b"", false).await.1,
            b"deep\n"
        );
        for _ in 0..10 {
            script = format!(
                "sh -c \"{}\"",
                script.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        let (code, _, err) = run(&pod, &["sh", "-c", &script], b"", false).await;
        assert_eq!(code, 2);
        assert!(String::from_utf8_lossy(&err).contains("too many nested shells"));
        assert_eq!(
            run(&pod, &["test", "!", "!", "-d", "/tmp"], b"", false)
                .await
                .0,
            0
        );
        assert_eq!(
            run(&pod, &["test", "!", "-d", "/tmp"], b"", false).await.0,
            1
        );
        let (code, out, err) = run(
            &pod,
            &[
                "sh",
                "-c",
                "echo out; echo err >&2; echo gone 2>/dev/null 1>&2",
            ],
            b"",
            false,
        )
        .await;
        assert_eq!(
            (code, out, err),
            (0, b"out\n".to_vec(), b"err\ngone\n".to_vec())
        );
        let (_, out, _) = run(
            &pod,
            &[
                "sh",
                "-c",
                "echo a > /tmp/r; echo b >> /tmp/r; cat < /tmp/r",
            ],
            b"",
            false,
        )
        .await;
        assert_eq!(out, b"a\nb\n");
        let (code, _, err) = run(&pod, &["nope"], b"", false).await;
        assert_eq!(code, 127);
        assert!(String::from_utf8_lossy(&err).contains("nope: not found"));
        let env = run(&pod, &["env"], b"", false).await.1;
        assert!(String::from_utf8_lossy(&env).contains("HOSTNAME=web-0\n"));
        let gen = run(&pod, &["gen", "100000"], b"", false).await.1;
        assert_eq!(gen.len(), 100_000);
        assert!(gen
            .iter()
            .enumerate()
            .all(|(i, b)| *b == GEN_PATTERN[i % 64]));
        assert_eq!(run(&pod, &["test", "-d", "/tmp"], b"", false).await.0, 0);
        assert_eq!(run(&pod, &["test", "-d", "/nope"], b"", false).await.0, 1);
        // A terminal: \n → \r\n on output, \r → \n and ^D ends input.
        let (code, out, _) = run(&pod, &["cat"], b"hi\r\x04ignored", true).await;
        assert_eq!((code, out), (0, b"hi\r\n".to_vec()));
        assert_eq!(run(&pod, &["cat"], b"x\x03", true).await.0, 130);
        assert_eq!(
            run(&pod, &["sh", "-c", "gen 10 | tail -c+4"], b"", false)
                .await
                .1,
            b"defghij"
        );
        assert_eq!(
            run(&pod, &["sh"], b"echo 1\nexit 5\necho 2\n", false).await,
            (5, b"1\n".to_vec(), vec![])
        );
    }

    #[tokio::test]
    async fn tar_round_trip_through_pod_files() {
        let pod = ctx();
        // Build an archive the way kubectl cp does (a file under the destination name).
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "dir/f.txt", &b"hello"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "../evil", &b"x"[..]).unwrap_or(());
        let archive = b.into_inner().unwrap();
        let (code, _, err) = run(
            &pod,
            &[
                "tar",
                "--no-same-permissions",
                "--no-same-owner",
                "-xmf",
                "-",
                "-C",
                "/tmp",
            ],
            &archive,
            false,
        )
        .await;
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
        assert_eq!(
            pod.files
                .read_file("default", "web-0", "/tmp/dir/f.txt")
                .unwrap(),
            b"hello"
        );
        assert!(pod.files.is_dir("default", "web-0", "/tmp/dir"));

        let (code, out, err) = run(&pod, &["tar", "cf", "-", "/tmp/dir"], b"", false).await;
        assert_eq!(code, 0);
        assert_eq!(
            String::from_utf8_lossy(&err),
            "tar: Removing leading `/' from member names\n"
        );
        let members = read_archive(&out).unwrap();
        let names: Vec<String> = members
            .iter()
            .map(|m| match m {
                Member::Dir(n) => format!("{n}/"),
                Member::File(n, data, _) => format!("{n}={}", String::from_utf8_lossy(data)),
                Member::Skipped(n, _) => n.clone(),
            })
            .collect();
        assert_eq!(names, vec!["tmp/dir/", "tmp/dir/f.txt=hello"]);

        let (code, _, err) = run(&pod, &["tar", "cf", "-", "/nope"], b"", false).await;
        assert_eq!(code, 2);
        assert!(String::from_utf8_lossy(&err).contains("Cannot stat"));
        let (code, _, _) = run(
            &pod,
            &["tar", "-xmf", "-", "-C", "/missing"],
            &archive,
            false,
        )
        .await;
        assert_eq!(code, 2);
        let (code, _, _) = run(
            &pod,
            &["tar", "xf", "-"],
            b"not a tar archive at all, just text",
            false,
        )
        .await;
        assert_eq!(code, 2);
        // `--retries`: tar | tail -c+N resumes the stream.
        let (_, full, _) = run(&pod, &["tar", "cf", "-", "tmp/dir/f.txt"], b"", false).await;
        let (_, rest, _) = run(
            &pod,
            &["sh", "-c", "tar cf - tmp/dir/f.txt | tail -c+101"],
            b"",
            false,
        )
        .await;
        assert_eq!(rest, full[100..]);
    }

    // --- handle() behind a bare hyper connection (no API server): the upgrade plumbing ---

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    /// Serves `handle` for one pod on 127.0.0.1; every request is for `kind`.
    async fn serve_handler(kind: StreamKind) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let files = PodFiles::default();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let files = files.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let target = StreamTarget {
                                kind,
                                namespace: "default".into(),
                                pod: "web-0".into(),
                                query: req.uri().query().map(str::to_owned),
                                files: files.clone(),
                            };
                            async move { Ok::<_, std::convert::Infallible>(handle(req, target).await) }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        addr
    }

    /// Sends a raw HTTP/1.1 upgrade request; returns the stream positioned after the headers.
    async fn upgrade(
        addr: std::net::SocketAddr,
        request: &str,
    ) -> (u16, String, tokio::io::BufReader<tokio::net::TcpStream>) {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut r = tokio::io::BufReader::new(tcp);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
                .await
                .unwrap()
                .unwrap();
            if n == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, head.to_ascii_lowercase(), r)
    }

    struct SpdyClient<R, W> {
        r: R,
        w: W,
        enc: spdy::FrameEncoder,
        dec: spdy::FrameDecoder,
        buf: BytesMut,
    }

    impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> SpdyClient<R, W> {
        fn new(r: R, w: W) -> Self {
            Self {
                r,
                w,
                enc: spdy::FrameEncoder::new().unwrap(),
                dec: spdy::FrameDecoder::new(),
                buf: BytesMut::new(),
            }
        }

        async fn send(&mut self, f: spdy::Frame) {
            let mut wire = BytesMut::new();
            self.enc.encode(&f, &mut wire).unwrap();
            self.w.write_all(&wire).await.unwrap();
        }

        async fn syn(&mut self, id: u32, headers: &[(&str, &str)], flags: u8) {
            let mut h = spdy::Headers::new();
            for (k, v) in headers {
                h.push(k, v);
            }
            self.send(spdy::Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags,
                headers: h,
            })
            .await;
        }

        async fn next(&mut self) -> Option<spdy::Frame> {
            loop {
                if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                let n =
                    tokio::time::timeout(Duration::from_secs(5), self.r.read_buf(&mut self.buf))
                        .await
                        .expect("timed out waiting for a SPDY frame")
                        .unwrap();
                if n == 0 {
                    return None;
                }
            }
        }

        /// Collects frames until GOAWAY or EOF.
        async fn until_goaway(&mut self) -> Vec<spdy::Frame> {
            let mut frames = Vec::new();
            while let Some(f) = self.next().await {
                let end = matches!(f, spdy::Frame::GoAway { .. });
                frames.push(f);
                if end {
                    break;
                }
            }
            frames
        }
    }

    fn data_of(frames: &[spdy::Frame], id: u32) -> (Vec<u8>, bool) {
        let mut data = Vec::new();
        let mut fin = false;
        for f in frames {
            if let spdy::Frame::Data {
                stream_id,
                flags,
                data: d,
            } = f
            {
                if *stream_id == id {
                    data.extend_from_slice(d);
                    fin |= flags & spdy::FLAG_FIN != 0;
                }
            }
        }
        (data, fin)
    }

    #[tokio::test]
    async fn spdy_exec_session_like_kubelet() {
        let addr = serve_handler(StreamKind::Exec).await;
        let (code, head, r) = upgrade(
            addr,
            "POST /exec?command=sh&command=-c&command=cat%3B%20exit%202&stdin=true&stdout=true&stderr=true HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v5.channel.k8s.io\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(code, 101, "{head}");
        assert!(head.contains("upgrade: spdy/3.1"), "{head}");
        assert!(
            head.contains("x-stream-protocol-version: v4.channel.k8s.io"),
            "{head}"
        );
        let (rd, wr) = tokio::io::split(r);
        let mut c = SpdyClient::new(rd, wr);
        // kubectl's order: error, stdin, stdout, stderr, each waiting for its SYN_REPLY.
        for (id, ty) in [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")] {
            c.syn(id, &[("streamtype", ty)], 0).await;
            assert!(
                matches!(c.next().await, Some(spdy::Frame::SynReply { stream_id, .. }) if stream_id == id)
            );
        }
        c.send(spdy::Frame::Ping { id: 1 }).await;
        assert_eq!(c.next().await, Some(spdy::Frame::Ping { id: 1 }));
        c.send(spdy::Frame::Data {
            stream_id: 3,
            flags: 0,
            data: Bytes::from_static(b"abc"),
        })
        .await;
        c.send(spdy::Frame::Data {
            stream_id: 3,
            flags: spdy::FLAG_FIN,
            data: Bytes::new(),
        })
        .await;
        let frames = c.until_goaway().await;
        assert_eq!(data_of(&frames, 5), (b"abc".to_vec(), true));
        assert_eq!(data_of(&frames, 7), (vec![], true));
        let (status, fin) = data_of(&frames, 1);
        assert!(fin);
        assert_eq!(
            String::from_utf8(status).unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c cat; exit 2], exit code 2","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"2"}]}}"#
        );
        assert!(frames.contains(&spdy::Frame::RstStream {
            stream_id: 3,
            status: spdy::rst::CANCEL
        }));
        assert!(matches!(
            frames.last(),
            Some(spdy::Frame::GoAway { status: 0, .. })
        ));
    }

    #[tokio::test]
    async fn malformed_spdy_ends_the_session_with_goaway() {
        let addr = serve_handler(StreamKind::PortForward).await;
        let (code, _, r) = upgrade(
            addr,
            "POST /portforward HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(code, 101);
        let (rd, mut wr) = tokio::io::split(r);
        // A SYN_STREAM whose header block is not zlib data.
        wr.write_all(&[
            0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9,
        ])
        .await
        .unwrap();
        let mut c = SpdyClient::new(rd, wr);
        assert_eq!(
            c.next().await,
            Some(spdy::Frame::GoAway {
                last_good_stream_id: 0,
                status: spdy::goaway::PROTOCOL_ERROR
            })
        );
        assert_eq!(c.next().await, None, "the server closes after GOAWAY");
    }

    fn ws_request(path: &str, protocols: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n")
    }

    async fn ws_client(
        r: tokio::io::BufReader<tokio::net::TcpStream>,
    ) -> WebSocketStream<tokio::io::BufReader<tokio::net::TcpStream>> {
        WebSocketStream::from_raw_socket(r, Role::Client, None).await
    }

    #[tokio::test]
    async fn websocket_v5_exec_with_close() {
        let addr = serve_handler(StreamKind::Exec).await;
        let (code, head, r) = upgrade(
            addr,
            &ws_request(
                "/exec?command=cat&stdin=true&stdout=true&stderr=true",
                "v5.channel.k8s.io",
            ),
        )
        .await;
        assert_eq!(code, 101, "{head}");
        assert!(
            head.contains("sec-websocket-protocol: v5.channel.k8s.io"),
            "{head}"
        );
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        let mut ws = ws_client(r).await;
        ws.send(Message::Binary(Bytes::from_static(b"\x00hello")))
            .await
            .unwrap();
        ws.send(Message::Binary(Bytes::from_static(&[255, 0])))
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(Ok(msg)) = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            match msg {
                Message::Binary(b) => got.push(b.to_vec()),
                Message::Close(frame) => {
                    assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal));
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(
            got,
            vec![
                vec![1],
                b"\x01hello".to_vec(),
                [&[3u8][..], br#"{"metadata":{},"status":"Success"}"#].concat()
            ]
        );
    }

    #[tokio::test]
    async fn websocket_tunnel_port_forward_echoes() {
        let addr = serve_handler(StreamKind::PortForward).await;
        let (code, head, r) = upgrade(
            addr,
            &ws_request("/portforward", "SPDY/3.1+portforward.k8s.io"),
        )
        .await;
        assert_eq!(code, 101, "{head}");
        assert!(
            head.contains("sec-websocket-protocol: spdy/3.1+portforward.k8s.io"),
            "{head}"
        );
        let ws = ws_client(r).await;
        let (mut sink, mut source) = ws.split();
        // Bridge the client's SPDY bytes through binary messages, as tunneling_connection.go.
        let (client_side, bridge) = tokio::io::duplex(1 << 16);
        let (mut br, mut bw) = tokio::io::split(bridge);
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            while br.read_buf(&mut buf).await.unwrap_or(0) > 0 {
                if sink
                    .send(Message::Binary(buf.split().freeze()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(Ok(Message::Binary(b))) = source.next().await {
                if bw.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        let (rd, wr) = tokio::io::split(client_side);
        let mut c = SpdyClient::new(rd, wr);
        // handleConnection: the error stream (closed at once by the client), then data.
        c.syn(
            1,
            &[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", "0"),
            ],
            spdy::FLAG_FIN,
        )
        .await;
        c.syn(
            3,
            &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
            0,
        )
        .await;
        // A stream with an invalid port is refused.
        c.syn(
            5,
            &[("streamtype", "data"), ("port", "0"), ("requestid", "1")],
            0,
        )
        .await;
        c.send(spdy::Frame::Data {
            stream_id: 3,
            flags: spdy::FLAG_FIN,
            data: Bytes::from_static(b"echo me"),
        })
        .await;
        let mut frames = Vec::new();
        while !matches!(data_of(&frames, 1), (_, true)) {
            frames.push(c.next().await.expect("frame"));
        }
        assert_eq!(data_of(&frames, 3), (b"echo me".to_vec(), true));
        assert_eq!(data_of(&frames, 1), (vec![], true));
        assert!(frames.contains(&spdy::Frame::RstStream {
            stream_id: 5,
            status: spdy::rst::CANCEL
        }));
    }

    #[tokio::test]
    async fn refusals_before_upgrade() {
        let addr = serve_handler(StreamKind::Exec).await;
        let (code, head, mut r) = upgrade(
            addr,
            &ws_request("/exec?command=true&stdout=true", "nope.k8s.io"),
        )
        .await;
        assert_eq!(code, 403, "{head}");
        let mut body = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), r.read(&mut body))
            .await
            .unwrap()
            .unwrap();
        let body = String::from_utf8_lossy(&body[..n]);
        assert!(
            body.contains(r#""kind":"Status""#) && body.contains(r#""code":403"#),
            "{body}"
        );
        let (code, _, _) = upgrade(
            addr,
            "POST /exec?command=true HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(code, 400);
        let (code, _, _) =
            upgrade(addr, &ws_request("/exec?stdout=true", "v5.channel.k8s.io")).await;
        assert_eq!(code, 400);
    }
}
