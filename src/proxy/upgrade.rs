//! exec / attach / port-forward: HTTP/1.1 upgrades to SPDY/3.1 or WebSocket, relayed as a byte
//! tunnel.
//!
//! Invariants (docs/security.md A1–A3, A5, C5):
//! - Only `websocket` and `SPDY/3.1`, only on `pods/{exec,attach,portforward}`; anything else is
//!   refused before any upstream connection is made.
//! - Each upgrade dials its own upstream HTTP/1.1 connection, never pooled before or after.
//! - The tunnel opens only after the upstream answers 101 with the same `Upgrade` token and, for
//!   WebSocket, a valid `Sec-WebSocket-Accept` and a subprotocol the client offered. Any other
//!   answer goes back to the client as it came (a 3xx becomes a 502: redirects are never passed
//!   on for upgrades) and both connections close, so bytes the client sent after its request
//!   are never read as another request.
//! - Bytes the client sent before the 101 are held by hyper and enter the tunnel only after it.
//! - The tunnel has an idle timeout (no bytes either way), never a total one; kubectl's
//!   WebSocket pings every 5 s and SPDY pings every 10 s count as activity.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::headers;
use crate::authz::RequestInfo;
use crate::body::{RelayBody, StreamBody};
use crate::error::{ProxyError, UpstreamFailure};
use crate::metrics::{DirectionLabels, DurationLabels, LongRunningLabels};
use crate::recording::{Recording, RecordingMode, SessionInfo};
use crate::state::State;
use crate::streams::{CloseReason, StreamEntry};
use crate::upstream::Upstream;

/// The upgrade protocols the relay tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeKind {
    WebSocket,
    Spdy,
}

impl UpgradeKind {
    fn token(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Spdy => "SPDY/3.1",
        }
    }
}

/// Whether `req` asks for an upgrade, refusing every upgrade the relay does not tunnel.
pub fn requested(
    req: &Request<Incoming>,
    info: &RequestInfo,
) -> Result<Option<UpgradeKind>, ProxyError> {
    let Some(value) = req.headers().get(header::UPGRADE) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ProxyError::BadRequest("malformed Upgrade header".into()))?
        .trim();
    let kind = if value.eq_ignore_ascii_case("websocket") {
        UpgradeKind::WebSocket
    } else if value.eq_ignore_ascii_case("SPDY/3.1") {
        UpgradeKind::Spdy
    } else {
        return Err(ProxyError::BadRequest(format!(
            "Upgrade: {value} is not allowed (only websocket and SPDY/3.1, for exec, attach and port-forward)"
        )));
    };
    let streaming = info.resource.as_deref() == Some("pods")
        && info.api_group.is_empty()
        && matches!(
            info.subresource.as_deref(),
            Some("exec" | "attach" | "portforward")
        );
    if !streaming {
        return Err(ProxyError::BadRequest(
            "upgrades are only allowed on pods/exec, pods/attach and pods/portforward".into(),
        ));
    }
    if req.version() != http::Version::HTTP_11 {
        return Err(ProxyError::BadRequest("upgrades need HTTP/1.1".into()));
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return Err(ProxyError::BadRequest(
            "Upgrade without Connection: upgrade".into(),
        ));
    }
    if kind == UpgradeKind::WebSocket && !req.headers().contains_key(header::SEC_WEBSOCKET_KEY) {
        return Err(ProxyError::BadRequest(
            "WebSocket upgrade without Sec-WebSocket-Key".into(),
        ));
    }
    Ok(Some(kind))
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
fn websocket_accept(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

fn upstream_err(cluster: &str, failure: UpstreamFailure, detail: impl Into<String>) -> ProxyError {
    ProxyError::Upstream {
        cluster: cluster.to_owned(),
        failure,
        detail: detail.into(),
    }
}

/// One upgrade request on its way upstream.
pub struct UpgradeRequest<'a> {
    pub req: Request<Incoming>,
    /// Headers prepared for the upstream (sanitised, credential and identity added).
    pub headers: HeaderMap,
    pub target: &'a str,
    pub kind: UpgradeKind,
    /// The client side of the upgrade, taken from the request before it is consumed.
    pub client_upgrade: OnUpgrade,
    /// The tunnel closes at this instant (the caller's token expiry plus grace).
    pub token_deadline: Instant,
    /// No bytes either way for this long closes the tunnel (`timeouts.stream_idle`, or the web
    /// terminal's shorter limit).
    pub idle: Duration,
    /// WebSocket frames from the client longer than this end the tunnel (the web terminal's
    /// browsers: docs/security.md G7); `None` for kubectl.
    pub max_client_frame: Option<u64>,
    pub audit: crate::audit::AuditBase,
    /// Registration in the live-stream registry (revocation, drain).
    pub guard: crate::streams::StreamGuard,
}

/// Performs the upgrade upstream, and on a valid 101 answers 101 and starts the tunnel.
pub async fn relay(
    state: &State,
    upstream: &Upstream,
    _admitted: crate::authz::Admitted,
    up: UpgradeRequest<'_>,
) -> Result<Response<RelayBody>, ProxyError> {
    let UpgradeRequest {
        req,
        headers: mut up_headers,
        target,
        kind,
        client_upgrade,
        token_deadline,
        idle,
        max_client_frame,
        audit,
        guard,
    } = up;
    let cluster = upstream.cluster.name.to_string();
    let uri = upstream
        .uri(target)
        .map_err(|e| ProxyError::BadRequest(format!("cannot forward this request-target: {e}")))?;
    // Opened before the cluster hears of the session: a required recording that cannot be
    // written refuses the session before anything runs in the pod.
    let (mut recording, mut recording_notes) =
        open_recording(state, upstream, &guard, target).await?;
    let client_key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let offered: Vec<String> = headers::ws_protocols(req.headers())
        .filter(|p| !p.starts_with(headers::WS_BEARER_PREFIX))
        .map(str::to_owned)
        .collect();

    let io = upstream
        .upgrade_dialer
        .dial(&uri)
        .await
        .map_err(|e| upstream_err(&cluster, e.failure, e.detail))?;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| upstream_err(&cluster, UpstreamFailure::Protocol, e.to_string()))?;
    tokio::spawn(async move {
        // Drives the connection; with upgrades it hands the socket over after a 101.
        let _ = connection.with_upgrades().await;
    });

    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut up_req = Request::new(Empty::<Bytes>::new());
    *up_req.method_mut() = req.method().clone();
    *up_req.uri_mut() = path
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid request-target".into()))?;
    up_headers.insert(
        header::HOST,
        HeaderValue::from_str(upstream.authority.as_str())
            .map_err(|_| ProxyError::Internal("invalid upstream authority".into()))?,
    );
    up_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    up_headers.insert(header::UPGRADE, HeaderValue::from_static(kind.token()));
    *up_req.headers_mut() = up_headers;

    let mut resp = tokio::time::timeout(
        state.cfg.timeouts.response_header,
        sender.send_request(up_req),
    )
    .await
    .map_err(|_| {
        upstream_err(
            &cluster,
            UpstreamFailure::ResponseTimeout,
            "no answer to the upgrade",
        )
    })?
    .map_err(|e| upstream_err(&cluster, UpstreamFailure::Protocol, e.to_string()))?;

    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        if kind == UpgradeKind::WebSocket {
            state
                .metrics
                .ws_fallback
                .get_or_create(&DurationLabels {
                    cluster: cluster.clone(),
                    verb: "CREATE".into(),
                })
                .inc();
        }
        if resp.status().is_redirection() {
            return Err(upstream_err(
                &cluster,
                UpstreamFailure::UpgradeRejected,
                format!("upstream answered the upgrade with {}", resp.status()),
            ));
        }
        // Relay the refusal as it came (kubectl falls back to SPDY on any non-101); `handle`
        // adds `Connection: close`. This upstream connection is dropped with the response.
        let (mut parts, body) = resp.into_parts();
        headers::sanitize_response(&mut parts.headers);
        return Ok(Response::from_parts(
            parts,
            StreamBody::new(body, None, None, None).boxed(),
        ));
    }

    // A 101: check it really is the protocol we asked for before trusting the socket.
    let token_ok = resp
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(kind.token()));
    if !token_ok {
        return Err(upstream_err(
            &cluster,
            UpstreamFailure::UpgradeRejected,
            "101 with a different Upgrade token",
        ));
    }
    let mut protocol = match kind {
        UpgradeKind::Spdy => "spdy",
        UpgradeKind::WebSocket => "websocket",
    };
    if kind == UpgradeKind::WebSocket {
        let expected = client_key.as_ref().map(|k| websocket_accept(k.as_bytes()));
        let got = resp
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .and_then(|v| v.to_str().ok());
        if expected.as_deref() != got {
            return Err(upstream_err(
                &cluster,
                UpstreamFailure::UpgradeRejected,
                "invalid Sec-WebSocket-Accept",
            ));
        }
        if let Some(chosen) = resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL) {
            let chosen = chosen.to_str().unwrap_or_default().trim();
            if !offered.iter().any(|o| o == chosen) {
                return Err(upstream_err(
                    &cluster,
                    UpstreamFailure::UpgradeRejected,
                    "101 with a subprotocol the client did not offer",
                ));
            }
            if chosen.starts_with("SPDY/3.1+portforward") {
                protocol = "ws-spdy-tunnel";
            }
        }
    }

    if let Some((rec, _)) = recording.as_mut() {
        let chosen = resp
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        rec.framing(match kind {
            UpgradeKind::Spdy => None,
            UpgradeKind::WebSocket => Some(chosen.unwrap_or("channel.k8s.io")),
        });
    }
    // exec and attach over WebSocket are told why when the relay ends them (EndNotice).
    let interactive = matches!(
        guard.entry.info.subresource.as_deref(),
        Some("exec" | "attach")
    );
    let notice = match kind {
        UpgradeKind::WebSocket if interactive => EndNotice::for_subprotocol(
            resp.headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok())
                .map(str::trim),
        ),
        _ => None,
    };
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let mut client_resp = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *client_resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let mut h = resp.headers().clone();
    headers::sanitize_response(&mut h);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(kind.token()));
    *client_resp.headers_mut() = h;

    let gauge = state
        .metrics
        .longrunning
        .get_or_create(&LongRunningLabels {
            cluster: cluster.clone(),
            protocol,
        })
        .clone();
    let to_up = state
        .metrics
        .stream_bytes
        .get_or_create(&DirectionLabels {
            cluster: cluster.clone(),
            direction: "to_upstream",
        })
        .clone();
    let to_client = state
        .metrics
        .stream_bytes
        .get_or_create(&DirectionLabels {
            cluster: cluster.clone(),
            direction: "to_client",
        })
        .clone();
    gauge.inc();
    let log = state.audit.clone();
    state.tunnels.spawn(async move {
        let (client_io, upstream_io) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                tracing::info!(client_ok = c.is_ok(), upstream_ok = u.is_ok(), cluster = %cluster, "upgrade did not complete");
                gauge.dec();
                return;
            }
        };
        let (rec, finished) = match recording.take() {
            Some((r, f)) => (Some(r), Some(f)),
            None => (None, None),
        };
        let (up, down, ended) = tunnel(
            TokioIo::new(client_io),
            TokioIo::new(upstream_io),
            idle,
            token_deadline,
            guard.entry.token(),
            ClientLeg {
                entry: Some(guard.entry.clone()),
                recording: rec,
                frames: max_client_frame.map(FrameGuard::new),
                notice,
            },
        )
        .await;
        // The recording's last lines reach the store before the record says it is complete.
        if let Some(f) = finished {
            match tokio::time::timeout(Duration::from_secs(10), f).await {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(failure))) => recording_notes.push(("kube-relay.io/recording-error", failure.0)),
                _ => recording_notes.push((
                    "kube-relay.io/recording-error",
                    "the store did not take the recording's last lines within 10 s".to_owned(),
                )),
            }
        }
        // Stopped from outside (revoked access, draining): the registry says which.
        let reason = ended.unwrap_or_else(|| guard.entry.reason()).as_str();
        drop(guard);
        gauge.dec();
        to_up.inc_by(up);
        to_client.inc_by(down);
        let mut notes = vec![
            ("kube-relay.io/protocol", protocol.to_owned()),
            ("kube-relay.io/bytes-to-upstream", up.to_string()),
            ("kube-relay.io/bytes-to-client", down.to_string()),
            ("kube-relay.io/close-reason", reason.to_owned()),
        ];
        notes.extend(recording_notes);
        log.emit(&audit, "ResponseComplete", 101, &notes);
        tracing::info!(cluster = %cluster, protocol, bytes_to_upstream = up, bytes_to_client = down, close = reason, "stream closed");
    });
    Ok(client_resp)
}

/// Opens the session's recording when its cluster records exec and attach: the recording and
/// its writer, plus the audit annotations that point at it (or say why there is none). A
/// required recording whose store cannot be written refuses the session.
#[allow(clippy::type_complexity)]
async fn open_recording(
    state: &State,
    upstream: &Upstream,
    guard: &crate::streams::StreamGuard,
    target: &str,
) -> Result<
    (
        Option<(Recording, crate::recording::Finished)>,
        Vec<(&'static str, String)>,
    ),
    ProxyError,
> {
    let mode = upstream.cluster.recording;
    let info = &guard.entry.info;
    let interactive = matches!(info.subresource.as_deref(), Some("exec" | "attach"));
    let (Some(store), Some(cfg), true) = (&state.recordings, &state.cfg.recording, interactive)
    else {
        return Ok((None, Vec::new()));
    };
    if mode == RecordingMode::Off {
        return Ok((None, Vec::new()));
    }
    // Read as the API server reads them (its first `container`; every `command` word).
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let command: Vec<String> = crate::authz::query_values(query, "command")
        .map(|c| c.into_owned())
        .collect();
    let container = crate::authz::query_values(query, "container")
        .next()
        .map(|c| c.into_owned());
    let session = SessionInfo {
        id: uuid::Uuid::new_v4().to_string(),
        cluster: upstream.cluster.name.to_string(),
        user: guard.entry.principal.username.clone(),
        namespace: info.namespace.clone().unwrap_or_default(),
        pod: info.name.clone().unwrap_or_default(),
        container,
        command: command.join(" "),
        stdin: cfg.stdin,
        max_bytes: cfg.max_session_bytes,
    };
    let entry = guard.entry.clone();
    let on_failure = move |why: &str| {
        tracing::warn!(cluster = %entry.cluster, error = why, "session recording failed");
        if mode == RecordingMode::Required {
            entry.close(CloseReason::RecordingFailed);
        }
    };
    match Recording::open(store.clone(), session, on_failure).await {
        Ok((rec, finished)) => {
            let notes = vec![("kube-relay.io/recording", rec.name.clone())];
            Ok((Some((rec, finished)), notes))
        }
        Err(e) if mode == RecordingMode::Required => Err(ProxyError::RecordingUnavailable {
            cluster: upstream.cluster.name.to_string(),
            detail: e.0,
        }),
        Err(e) => {
            tracing::warn!(cluster = %upstream.cluster.name, error = %e, "session not recorded (recording: optional)");
            Ok((None, vec![("kube-relay.io/recording-error", e.0)]))
        }
    }
}

/// Copies both ways until either side closes, an error, `idle` passes with no bytes, or the
/// caller's token deadline passes. Returns bytes client→upstream, upstream→client, and why it
/// closed (`None`: stopped through `stop`, whose owner knows why). Writes to the client that
/// cannot go on are reported to `entry`, whose sweeper ends the tunnel through `stop` when the
/// client stays stalled (docs/security.md F4).
async fn tunnel<A, B>(
    client: A,
    upstream: B,
    idle: Duration,
    deadline: Instant,
    stop: tokio_util::sync::CancellationToken,
    leg: ClientLeg,
) -> (u64, u64, Option<CloseReason>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let base = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let ending = leg
        .notice
        .as_ref()
        .map(|n| (n.ending.clone(), n.between.clone()));
    let entry = leg.entry.clone();
    let mut client = Activity {
        io: client,
        base,
        last: activity.clone(),
        bytes: 0,
        writes_wait_on: leg.entry,
        recording: leg.recording,
        frames: leg.frames,
        notice: leg.notice,
    };
    let mut upstream = Activity {
        io: upstream,
        base,
        last: activity.clone(),
        bytes: 0,
        writes_wait_on: None,
        recording: None,
        frames: None,
        notice: None,
    };
    let result = {
        // 64 KiB per direction instead of tokio's 8 KiB default: measured exec throughput 0.82× →
        // ~1.0× of direct and port-forward 0.73× → ~0.9× (docs/perf); the buffers bound memory
        // per tunnel and give backpressure both ways.
        let copy = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            64 * 1024,
            64 * 1024,
        );
        tokio::pin!(copy);
        let check = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        let ended = loop {
            tokio::select! {
                r = &mut copy => break Some(match r {
                    Ok(_) => CloseReason::Closed,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => CloseReason::FrameTooLarge,
                    Err(_) => CloseReason::Error,
                }),
                () = &mut expiry => break Some(CloseReason::TokenExpired),
                () = stop.cancelled() => break None,
                () = tokio::time::sleep(check) => {
                    let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                    if base.elapsed().saturating_sub(last) >= idle {
                        break Some(CloseReason::IdleTimeout);
                    }
                }
            }
        };
        // The relay ends the session (stopped from outside: the registry says why): a client
        // that can be told why gets the rest of the message it is receiving first, and nothing
        // more from it reaches the cluster meanwhile.
        let why = ended.or_else(|| entry.as_ref().map(|e| e.reason()));
        let message = why.and_then(end_status);
        if let (Some((ending, between)), Some(_)) = (&ending, &message) {
            ending.store(true, Ordering::Relaxed);
            if !between.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(FINISH_FRAME, &mut copy).await;
            }
        }
        (ended, message)
    };
    let (result, message) = result;
    let told = message.filter(|_| {
        client
            .notice
            .as_ref()
            .is_some_and(|n| n.ending.load(Ordering::Relaxed) && n.frames.at_boundary())
    });
    if let Some(message) = told {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let _ = tokio::time::timeout(FINISH_FRAME, async {
            client.io.write_all(&message).await?;
            client.io.flush().await?;
            // The client answers the close with its own and closes. Until then what it still
            // sends is read and dropped: closing with unread bytes would reset the connection,
            // and a reset can discard the Status before the client reads it.
            let mut sink = [0u8; 8192];
            while client.io.read(&mut sink).await? > 0 {}
            std::io::Result::Ok(())
        })
        .await;
    }
    (client.bytes, upstream.bytes, result)
}

/// What the tunnel does on the client's side besides copying.
#[derive(Default)]
struct ClientLeg {
    /// Told when writes to the client stall (the write-stall sweeper).
    entry: Option<Arc<StreamEntry>>,
    /// The session's recording.
    recording: Option<Recording>,
    /// A browser's frames, held to a size.
    frames: Option<FrameGuard>,
    /// Tells the client why, when the relay ends the session.
    notice: Option<EndNotice>,
}

/// Wraps a tunnel leg: records the time of the last byte read and counts bytes read; on the
/// client's leg, also when writes stall and resume.
struct Activity<T> {
    io: T,
    base: Instant,
    last: Arc<AtomicU64>,
    bytes: u64,
    writes_wait_on: Option<Arc<StreamEntry>>,
    /// The client's leg of a recorded session: sees both directions' bytes as they pass, and
    /// holds the tunnel while the recording's spool is full.
    recording: Option<Recording>,
    /// The client's leg of a browser's session: frames it sends are held to a size.
    frames: Option<FrameGuard>,
    /// The client's leg of a session that is told why the relay ends it.
    notice: Option<EndNotice>,
}

/// Follows a WebSocket byte stream's frame headers (RFC 6455 section 5.2): where each frame
/// and each message ends, without keeping any payload.
#[derive(Clone, Default)]
pub(crate) struct WsFrames {
    /// The current frame's header so far (at most 2 + 8 + 4 bytes).
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes left in the current frame.
    remaining: u64,
    /// A message's first frames passed without FIN: its continuation frames follow (control
    /// frames may come between them, nothing else may).
    fragmented: bool,
}

impl WsFrames {
    /// Takes bytes up to the end of the current header or payload: how many, and the payload
    /// length when a header completed.
    fn step(&mut self, bytes: &[u8]) -> (usize, Option<u64>) {
        if self.remaining > 0 {
            let n = self.remaining.min(bytes.len() as u64);
            self.remaining -= n;
            return (n as usize, None);
        }
        for (i, &b) in bytes.iter().enumerate() {
            self.head[self.head_len] = b;
            self.head_len += 1;
            if self.head_len < 2 {
                continue;
            }
            let ext = match self.head[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
            if self.head_len < 2 + ext + mask {
                continue;
            }
            let len = match ext {
                2 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                8 => u64::from_be_bytes(self.head[2..10].try_into().unwrap_or([0xff; 8])),
                _ => u64::from(self.head[1] & 0x7f),
            };
            // Data and continuation frames (opcodes below 8) carry messages; FIN ends one.
            if self.head[0] & 0x08 == 0 {
                self.fragmented = self.head[0] & 0x80 == 0;
            }
            self.head_len = 0;
            self.remaining = len;
            return (i + 1, Some(len));
        }
        (bytes.len(), None)
    }

    /// Follows all of `bytes`.
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (n, _) = self.step(bytes);
            bytes = &bytes[n..];
        }
    }

    /// Between messages: another message may start here.
    fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.remaining == 0 && !self.fragmented
    }

    /// How many of `bytes` end the current message: 0 between messages, all of them when they
    /// do not reach its end.
    fn to_boundary(&self, bytes: &[u8]) -> usize {
        let mut f = self.clone();
        let mut used = 0;
        while used < bytes.len() && !f.at_boundary() {
            used += f.step(&bytes[used..]).0;
        }
        used
    }
}

/// Follows the WebSocket frame headers a client sends and refuses a frame whose payload is
/// longer than the limit, before the relay passes its bytes on.
pub(crate) struct FrameGuard {
    limit: u64,
    frames: WsFrames,
}

impl FrameGuard {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            frames: WsFrames::default(),
        }
    }

    /// Passes `bytes` through the frame structure; false when a frame is too long.
    fn check(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let (n, len) = self.frames.step(bytes);
            if len.is_some_and(|len| len > self.limit) {
                return false;
            }
            bytes = &bytes[n..];
        }
        true
    }
}

/// The client leg of an exec or attach session over WebSocket with a subprotocol whose error
/// channel carries a `metav1.Status` (`v4.channel.k8s.io`, `v5.channel.k8s.io`): follows the
/// frames the client receives, so that a session the relay ends is told why on that channel,
/// as the API server tells a failed command, instead of seeing its connection drop. Without
/// it kubectl reports only an abnormal closure.
pub(crate) struct EndNotice {
    frames: WsFrames,
    /// Set as the relay ends the session: the client's current message is finished, then
    /// writes and reads stop.
    ending: Arc<AtomicBool>,
    /// The client is between messages (`frames`, for the tunnel while the copy holds them): an
    /// ending session then has nothing to finish and need not wait for more bytes.
    between: Arc<AtomicBool>,
}

impl EndNotice {
    pub(crate) fn for_subprotocol(chosen: Option<&str>) -> Option<Self> {
        matches!(chosen, Some("v4.channel.k8s.io" | "v5.channel.k8s.io")).then(|| Self {
            frames: WsFrames::default(),
            ending: Arc::new(AtomicBool::new(false)),
            between: Arc::new(AtomicBool::new(true)),
        })
    }
}

/// How long an ending session may take to finish the message its client is receiving.
const FINISH_FRAME: Duration = Duration::from_secs(1);

/// The error channel's message for a session the relay ends, by why (none when the session
/// ended by itself, or when its client no longer reads).
fn end_status(reason: CloseReason) -> Option<Vec<u8>> {
    let (code, why, message) = match reason {
        CloseReason::TokenExpired => (
            401,
            "Unauthorized",
            "kube-relay ended the session: the token it was opened with expired; run the command again with a fresh one",
        ),
        CloseReason::AccessRevoked => (
            403,
            "Forbidden",
            "kube-relay ended the session: the relay's rules for this cluster no longer allow it",
        ),
        CloseReason::Draining => (
            503,
            "ServiceUnavailable",
            "kube-relay ended the session: the relay is shutting down; run the command again",
        ),
        CloseReason::RecordingFailed => (
            503,
            "ServiceUnavailable",
            "kube-relay ended the session: this cluster requires session recording and the recording stopped (its audit record says why)",
        ),
        CloseReason::IdleTimeout => (
            504,
            "Timeout",
            "kube-relay ended the session: nothing was sent either way for the idle limit",
        ),
        _ => return None,
    };
    let status = crate::error::status_json(code, why, message);
    // One binary message on channel 3 (error), then a normal close (RFC 6455 5.5.1).
    let mut frame = Vec::with_capacity(status.len() + 16);
    frame.push(0x82);
    let len = status.len() + 1;
    if len < 126 {
        frame.push(len as u8);
    } else {
        frame.push(126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.push(3);
    frame.extend_from_slice(&status);
    frame.extend_from_slice(&[0x88, 0x02, 0x03, 0xe8]);
    Some(frame)
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(rec) = &self.recording {
            std::task::ready!(rec.poll_room(cx));
        }
        if self
            .notice
            .as_ref()
            .is_some_and(|n| n.ending.load(Ordering::Relaxed))
        {
            // Ending: nothing more from the client goes to the cluster. The tunnel stops
            // polling within FINISH_FRAME.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if let (Some(guard), true) = (self.frames.as_mut(), n > 0) {
            if !guard.check(&buf.filled()[before..]) {
                // Refused before the bytes go anywhere: the copy fails and the tunnel ends.
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a WebSocket frame from the browser is larger than the web terminal allows",
                )));
            }
        }
        if let (Some(rec), true) = (self.recording.as_mut(), n > 0) {
            rec.from_client(&buf.filled()[before..]);
        }
        if n > 0 {
            self.bytes += n as u64;
            let now = self.base.elapsed().as_millis() as u64;
            self.last.store(now, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(rec) = &self.recording {
            std::task::ready!(rec.poll_room(cx));
        }
        let mut buf = buf;
        if let Some(n) = self
            .notice
            .as_ref()
            .filter(|n| n.ending.load(Ordering::Relaxed))
        {
            // Ending: only the rest of the current message, then the copy stops.
            let rest = n.frames.to_boundary(buf);
            if rest == 0 {
                return Poll::Ready(Err(std::io::Error::other("the relay ends the session")));
            }
            buf = &buf[..rest];
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let (Some(rec), Poll::Ready(Ok(n))) = (self.recording.as_mut(), &r) {
            rec.from_server(&buf[..*n]);
        }
        if let (Some(notice), Poll::Ready(Ok(n))) = (self.notice.as_mut(), &r) {
            notice.frames.advance(&buf[..*n]);
            notice
                .between
                .store(notice.frames.at_boundary(), Ordering::Relaxed);
        }
        if let Some(entry) = &self.writes_wait_on {
            match r {
                Poll::Pending => entry.blocked_on_client(),
                Poll::Ready(_) => entry.client_took(),
            }
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_matches_rfc_example() {
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tunnel_closes_when_idle() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let (_, _, reason) = tunnel(
            a,
            b,
            Duration::from_secs(60),
            Instant::now() + Duration::from_secs(3600),
            Default::default(),
            ClientLeg::default(),
        )
        .await;
        assert_eq!(reason, Some(CloseReason::IdleTimeout));
    }

    #[test]
    fn frames_are_followed_across_any_split() {
        // Two frames: 300 bytes of payload (16-bit length), then a masked 2-byte one.
        let mut bytes = vec![0x82, 126, 0x01, 0x2c];
        bytes.extend(std::iter::repeat_n(7u8, 300));
        bytes.extend_from_slice(&[0x82, 0x82, 1, 2, 3, 4, 9, 9]);
        for split in 0..bytes.len() {
            let mut f = WsFrames::default();
            f.advance(&bytes[..split]);
            let rest = f.to_boundary(&bytes[split..]);
            let end = if split < 304 { 304 } else { bytes.len() };
            // Between frames there is nothing to finish.
            let expect = if split == 0 || split == 304 {
                0
            } else {
                end - split
            };
            assert_eq!(rest, expect, "split at {split}");
            f.advance(&bytes[split..]);
            assert!(f.at_boundary());
        }
    }

    /// A message sent in fragments ends with its FIN frame; a control frame between the
    /// fragments does not end it.
    #[test]
    fn a_fragmented_message_ends_with_its_final_frame() {
        let first = [0x02, 3, b'x', b'y', b'z'];
        let ping = [0x89, 0];
        let last = [0x80, 2, b'u', b'v'];
        let mut f = WsFrames::default();
        f.advance(&first);
        assert!(!f.at_boundary());
        let rest: Vec<u8> = ping
            .iter()
            .chain(&last)
            .chain(&[0x82, 1, 9])
            .copied()
            .collect();
        assert_eq!(f.to_boundary(&rest), ping.len() + last.len());
        f.advance(&ping);
        assert!(!f.at_boundary());
        f.advance(&last);
        assert!(f.at_boundary());
    }

    /// A session the relay ends mid-frame finishes that frame, then tells the client why on
    /// the error channel and closes; nothing after that frame reaches the client.
    #[tokio::test(start_paused = true)]
    async fn an_ended_session_finishes_its_frame_and_says_why() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (a, mut client) = tokio::io::duplex(1 << 16);
        let (b, mut cluster) = tokio::io::duplex(1 << 16);
        let tunnel = tokio::spawn(tunnel(
            a,
            b,
            Duration::from_secs(60),
            Instant::now() + Duration::from_millis(300),
            Default::default(),
            ClientLeg {
                notice: EndNotice::for_subprotocol(Some("v5.channel.k8s.io")),
                ..ClientLeg::default()
            },
        ));
        // Stdout: a 10-byte message, of which the first 4 bytes of payload arrive now.
        cluster
            .write_all(&[0x82, 10, 1, b'a', b'b', b'c'])
            .await
            .unwrap();
        let mut got = vec![0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        // The token expires (300 ms) while the client is inside that frame.
        tokio::time::sleep(Duration::from_millis(400)).await;
        cluster.write_all(b"defghi\x82\x03\x01xyz").await.unwrap();
        let (_, _, why) = tunnel.await.unwrap();
        assert_eq!(why, Some(CloseReason::TokenExpired));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(&got[..12], b"\x82\x0a\x01abcdefghi");
        let tail = &got[12..];
        assert_eq!(tail[0], 0x82);
        let len = if tail[1] == 126 {
            u16::from_be_bytes([tail[2], tail[3]]) as usize
        } else {
            tail[1] as usize
        };
        let start = if tail[1] == 126 { 4 } else { 2 };
        assert_eq!(tail[start], 3, "the error channel");
        let status: serde_json::Value =
            serde_json::from_slice(&tail[start + 1..start + len]).unwrap();
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["reason"], "Unauthorized");
        assert!(status["message"].as_str().unwrap().contains("expired"));
        assert_eq!(&tail[start + len..], &[0x88, 0x02, 0x03, 0xe8]);
    }

    /// A session ended between messages is told at once: nothing to finish, no waiting.
    #[tokio::test(start_paused = true)]
    async fn an_idle_ended_session_is_told_at_once() {
        use tokio::io::AsyncReadExt as _;
        let (a, mut client) = tokio::io::duplex(1 << 16);
        let (b, _cluster) = tokio::io::duplex(1 << 16);
        let started = Instant::now();
        let tunnel = tokio::spawn(tunnel(
            a,
            b,
            Duration::from_secs(60),
            started + Duration::from_millis(300),
            Default::default(),
            ClientLeg {
                notice: EndNotice::for_subprotocol(Some("v4.channel.k8s.io")),
                ..ClientLeg::default()
            },
        ));
        // The client reads the Status and the close, then closes as a WebSocket client does.
        let mut got = Vec::new();
        while !got.ends_with(&[0x88, 0x02, 0x03, 0xe8]) {
            let mut buf = [0u8; 4096];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the close frame: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got[0], 0x82);
        drop(client);
        let (_, _, why) = tunnel.await.unwrap();
        assert_eq!(why, Some(CloseReason::TokenExpired));
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    /// docs/security.md F4: the cluster streams, the client reads nothing; the tunnel's
    /// copy blocks on the client and the sweeper ends it.
    #[tokio::test]
    async fn a_tunnel_whose_client_stops_reading_ends_as_a_write_stall() {
        use tokio::io::AsyncWriteExt;
        let registry = Arc::new(crate::streams::StreamRegistry::default());
        let guard = registry.register_for_tests(crate::streams::StreamKind::Tunnel, None);
        let (a, _client_never_reads) = tokio::io::duplex(1 << 16);
        let (b, mut cluster) = tokio::io::duplex(1 << 16);
        let feeder = tokio::spawn(async move {
            let chunk = vec![b'x'; 1 << 16];
            while cluster.write_all(&chunk).await.is_ok() {}
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let sweeper = tokio::spawn(crate::streams::sweep_stalled(
            registry.clone(),
            || Duration::from_millis(200),
            |_| {},
            stop.clone(),
        ));
        let (_, down, reason) = tokio::time::timeout(
            Duration::from_secs(20),
            tunnel(
                a,
                b,
                Duration::from_secs(3600),
                Instant::now() + Duration::from_secs(3600),
                guard.entry.token(),
                ClientLeg {
                    entry: Some(guard.entry.clone()),
                    ..ClientLeg::default()
                },
            ),
        )
        .await
        .expect("the stalled tunnel ends");
        assert_eq!(reason, None, "ended from outside");
        assert_eq!(guard.entry.reason(), CloseReason::WriteStall);
        // What the buffers hold, never the endless stream.
        assert!(down < 1 << 20, "{down} bytes were read from the cluster");
        stop.cancel();
        sweeper.await.unwrap();
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn tunnel_closes_at_the_token_deadline_even_when_busy() {
        use tokio::io::AsyncWriteExt;
        let (a, mut a_peer) = tokio::io::duplex(1 << 16);
        let (b, _b_peer) = tokio::io::duplex(1 << 16);
        let deadline = Instant::now() + Duration::from_secs(10);
        let feeder = tokio::spawn(async move {
            for _ in 0..100 {
                if a_peer.write_all(b"ping").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let (_, _, reason) = tunnel(
            a,
            b,
            Duration::from_secs(60),
            deadline,
            Default::default(),
            ClientLeg::default(),
        )
        .await;
        assert_eq!(reason, Some(CloseReason::TokenExpired));
        feeder.abort();
    }
}
