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

mod cp;
mod files;
mod portforward;
mod process;
mod remotecommand;
mod shell;

use cp::*;
pub use files::*;
use portforward::*;
pub use process::*;
use remotecommand::*;
use shell::*;

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
