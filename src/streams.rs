//! Live long-running streams (watch, `logs -f`, exec, attach, port-forward), so the relay can
//! close the ones a configuration change revokes and spread closes out when draining.
//!
//! Each stream registers itself with who opened it and what it does; the registration is
//! removed when the stream's guard drops, however the stream ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

impl StreamRegistry {
    /// Registers a stream, unless its identity already holds `limit` live streams.
    pub fn register(
        self: &Arc<Self>,
        principal: Arc<Principal>,
        cluster: String,
        info: RequestInfo,
        impersonating: bool,
        kind: StreamKind,
        limit: u32,
    ) -> Option<StreamGuard> {
        {
            let mut counts = self.per_identity.lock();
            let n = counts.entry(principal.user_key().to_owned()).or_insert(0);
            if *n >= limit {
                return None;
            }
            *n += 1;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(StreamEntry {
            principal,
            cluster,
            info,
            impersonating,
            kind,
            cancel: CancellationToken::new(),
            reason: Mutex::new(CloseReason::Closed),
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
}
