//! Live long-running streams (watch, `logs -f`, exec, attach, port-forward), so the relay can
//! close the ones a configuration change revokes and spread closes out when draining.
//!
//! Each stream registers itself with who opened it and what it does; the registration is
//! removed when the stream's guard drops, however the stream ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use parking_lot::Mutex;

use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::authz::RequestInfo;

/// What kind of stream, for drain ordering (watches first, spread out; tunnels after a grace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Watch,
    Tunnel,
}

/// Why a stream (a watch, `logs -f`, an exec / attach / port-forward tunnel) ended: the
/// audit record's `kube-relay.io/close-reason` and the tunnel log's `close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client went away (or the response was dropped) first.
    ClientGone,
    /// The cluster ended the response (a watch timeout, the pod's process exiting).
    Complete,
    /// A tunnel whose two sides both closed.
    Closed,
    /// Reading or writing failed on the cluster's side.
    UpstreamError,
    /// Reading or writing a tunnel failed.
    Error,
    /// No bytes either way for the idle limit.
    IdleTimeout,
    /// The caller's token expired (plus grace): docs/security.md A6.
    TokenExpired,
    /// A reload's rules no longer admit the caller: docs/security.md A6.
    AccessRevoked,
    /// The relay is shutting down.
    Draining,
    /// The client accepted none of the stream's bytes for `timeouts.write_stall`:
    /// docs/security.md F4.
    WriteStall,
    /// The cluster requires session recording and the recording could not be written on.
    RecordingFailed,
    /// A browser sent a WebSocket frame larger than the web terminal allows.
    FrameTooLarge,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientGone => "client_gone",
            Self::Complete => "complete",
            Self::Closed => "closed",
            Self::UpstreamError => "upstream_error",
            Self::Error => "error",
            Self::IdleTimeout => "idle_timeout",
            Self::TokenExpired => "token_expired",
            Self::AccessRevoked => "access_revoked",
            Self::Draining => "draining",
            Self::WriteStall => "write_stall",
            Self::RecordingFailed => "recording_failed",
            Self::FrameTooLarge => "frame_too_large",
        }
    }
}

/// One live stream.
pub struct StreamEntry {
    pub principal: Arc<Principal>,
    pub cluster: String,
    pub info: RequestInfo,
    pub impersonating: bool,
    pub kind: StreamKind,
    cancel: CancellationToken,
    reason: Mutex<CloseReason>,
    /// Since when the stream has bytes the client has not taken (milliseconds since [`epoch`]
    /// plus one; zero while nothing waits on the client).
    waiting: AtomicU64,
    /// How to let go of the stream if its client stops reading. `None` for tunnels, which end
    /// themselves.
    stop: Option<Stop>,
}

/// How the relay lets go of a response body the HTTP stack has stopped polling (a full socket
/// on HTTP/1.1, an exhausted stream window on h2): such a body cannot end itself.
#[derive(Debug)]
pub enum Stop {
    /// Ends this HTTP/2 stream alone (hyper then resets it); the connection's other streams go
    /// on (src/conn_streams.rs).
    Stream(crate::conn_streams::StreamEnd),
    /// Ends the client's whole connection: on HTTP/1.1 that is the one way.
    Connection(CancellationToken),
}

/// The moment write-stall times are counted from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_mark() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

impl StreamEntry {
    /// Ends the stream; `reason` goes to the audit record.
    pub fn close(&self, reason: CloseReason) {
        *self.reason.lock() = reason;
        self.cancel.cancel();
    }

    pub fn reason(&self) -> CloseReason {
        *self.reason.lock()
    }

    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Whether the relay has decided to end this stream (revoked, draining, stalled).
    pub fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The stream handed the client bytes it has not yet taken: a wait starts now.
    pub fn handed_to_client(&self) {
        self.waiting.store(now_mark(), Ordering::Relaxed);
    }

    /// A write to the client could not go on: a wait starts now, unless one already runs.
    pub fn blocked_on_client(&self) {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            self.waiting.store(now_mark(), Ordering::Relaxed);
        }
    }

    /// The client took bytes: nothing waits on it.
    pub fn client_took(&self) {
        if self.waiting.load(Ordering::Relaxed) != 0 {
            self.waiting.store(0, Ordering::Relaxed);
        }
    }

    /// How long the stream has waited on the client, if it does.
    pub fn waited(&self) -> Option<Duration> {
        match self.waiting.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(now_mark().saturating_sub(since))),
        }
    }

    /// Ends a stream whose client stopped reading: the stream's own task (a tunnel) sees its
    /// token cancelled; a response body is let go with its h2 stream, or its HTTP/1.1
    /// connection.
    fn close_stalled(&self) {
        self.close(CloseReason::WriteStall);
        match &self.stop {
            Some(Stop::Stream(s)) => s.end(),
            Some(Stop::Connection(c)) => c.cancel(),
            None => {}
        }
    }
}

/// All live streams.
#[derive(Default)]
pub struct StreamRegistry {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<StreamEntry>>>,
    /// Live streams per identity (`issuer/subject`), for the per-identity cap.
    per_identity: Mutex<HashMap<String, u32>>,
}

/// Keeps a stream registered; dropping it unregisters.
pub struct StreamGuard {
    registry: Arc<StreamRegistry>,
    id: u64,
    pub entry: Arc<StreamEntry>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.registry.entries.lock().remove(&self.id);
        let mut counts = self.registry.per_identity.lock();
        let key = self.entry.principal.user_key();
        if let Some(n) = counts.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(key);
            }
        }
    }
}

/// What a stream is, as it registers.
pub struct NewStream {
    pub principal: Arc<Principal>,
    pub cluster: String,
    pub info: RequestInfo,
    pub impersonating: bool,
    pub kind: StreamKind,
    /// How to let go of the stream if it stalls (see [`Stop`]).
    pub stop: Option<Stop>,
}

impl StreamRegistry {
    /// Registers a stream, unless its identity already holds `limit` live streams.
    pub fn register(self: &Arc<Self>, s: NewStream, limit: u32) -> Option<StreamGuard> {
        {
            let mut counts = self.per_identity.lock();
            let n = counts.entry(s.principal.user_key().to_owned()).or_insert(0);
            if *n >= limit {
                return None;
            }
            *n += 1;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(StreamEntry {
            principal: s.principal,
            cluster: s.cluster,
            info: s.info,
            impersonating: s.impersonating,
            kind: s.kind,
            cancel: CancellationToken::new(),
            reason: Mutex::new(CloseReason::Closed),
            waiting: AtomicU64::new(0),
            stop: s.stop,
        });
        self.entries.lock().insert(id, entry.clone());
        Some(StreamGuard {
            registry: self.clone(),
            id,
            entry,
        })
    }

    /// A snapshot of the live streams.
    pub fn snapshot(&self) -> Vec<Arc<StreamEntry>> {
        self.entries.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a stream of dev/alice on cluster alpha, for unit tests.
    #[cfg(test)]
    pub(crate) fn register_for_tests(
        self: &Arc<Self>,
        kind: StreamKind,
        stop: Option<Stop>,
    ) -> StreamGuard {
        let s = NewStream {
            principal: Arc::new(Principal::for_tests("dev", "alice")),
            cluster: "alpha".into(),
            info: RequestInfo::default(),
            impersonating: false,
            kind,
            stop,
        };
        self.register(s, 10).unwrap()
    }

    /// Ends every stream that has waited on its client for `limit` or longer; returns how many.
    pub fn close_stalled(&self, limit: Duration) -> usize {
        let stalled: Vec<Arc<StreamEntry>> = self
            .entries
            .lock()
            .values()
            .filter(|e| !e.is_closed() && e.waited().is_some_and(|w| w >= limit))
            .cloned()
            .collect();
        for e in &stalled {
            tracing::info!(
                cluster = %e.cluster,
                user = %e.principal.username,
                waited_ms = e.waited().map_or(0, |w| w.as_millis() as u64),
                "closing a stream whose client stopped reading"
            );
            e.close_stalled();
        }
        stalled.len()
    }
}

/// Runs until `stop`: every `limit() / 4` (within 100 ms .. 5 s) ends the streams whose client
/// has taken nothing for `limit()` (docs/security.md F4). `limit` is read on every round, so a
/// reload applies to live streams too.
pub async fn sweep_stalled(
    registry: Arc<StreamRegistry>,
    limit: impl Fn() -> Duration,
    on_close: impl Fn(usize),
    stop: CancellationToken,
) {
    loop {
        let every = (limit() / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let n = registry.close_stalled(limit());
        if n > 0 {
            on_close(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(r: &Arc<StreamRegistry>, connection: Option<CancellationToken>) -> StreamGuard {
        r.register_for_tests(StreamKind::Watch, connection.map(Stop::Connection))
    }

    #[test]
    fn only_a_stream_waiting_on_its_client_past_the_limit_is_closed() {
        let r = Arc::new(StreamRegistry::default());
        let conn = CancellationToken::new();
        let (waiting, idle, took) = (
            register(&r, Some(conn.clone())),
            register(&r, None),
            register(&r, None),
        );
        waiting.entry.handed_to_client();
        took.entry.handed_to_client();
        took.entry.client_took();
        // Not yet past a limit of an hour.
        assert_eq!(r.close_stalled(Duration::from_secs(3600)), 0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(r.close_stalled(Duration::from_millis(1)), 1);
        assert_eq!(waiting.entry.reason(), CloseReason::WriteStall);
        assert!(waiting.entry.is_closed() && conn.is_cancelled());
        assert!(!idle.entry.is_closed() && !took.entry.is_closed());
        // Closed once: a second sweep does not count it again.
        assert_eq!(r.close_stalled(Duration::from_millis(1)), 0);
    }

    #[test]
    fn a_blocked_write_keeps_the_time_its_wait_began() {
        let r = Arc::new(StreamRegistry::default());
        let g = register(&r, None);
        g.entry.blocked_on_client();
        std::thread::sleep(Duration::from_millis(20));
        // Woken and blocked again: still the same wait.
        g.entry.blocked_on_client();
        assert!(g.entry.waited().unwrap() >= Duration::from_millis(20));
        g.entry.client_took();
        assert_eq!(g.entry.waited(), None);
    }

    #[tokio::test]
    async fn the_sweeper_closes_stalled_streams_and_reports_them() {
        let r = Arc::new(StreamRegistry::default());
        let g = register(&r, None);
        g.entry.blocked_on_client();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(sweep_stalled(
            r.clone(),
            || Duration::from_millis(50),
            move |n| {
                let _ = tx.send(n);
            },
            stop.clone(),
        ));
        let n = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(n.unwrap(), Some(1));
        assert_eq!(g.entry.reason(), CloseReason::WriteStall);
        stop.cancel();
        task.await.unwrap();
    }
}
