//! Upstream health: a periodic probe per cluster, so a dead cluster answers a fast 503 instead
//! of making every caller wait for the connect timeout, and `/readyz` says which cluster is down.
//!
//! A probe dials a fresh connection (never the pool, which could hide a dead endpoint behind a
//! still-open socket), completes TLS against the cluster CA and sends `GET /readyz`. Any HTTP
//! answer, 401 included, proves the API server is there. After [`FAILURES_TO_MARK_DOWN`]
//! consecutive failures the cluster is marked down; one success marks it up again.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use tokio_util::sync::CancellationToken;

use super::Upstream;

/// The probe's `User-Agent`, so cluster logs (and tests) can tell probes from user traffic.
pub const PROBE_USER_AGENT: &str = "kube-relay/health-probe";

/// Consecutive failed probes before requests fail fast.
pub const FAILURES_TO_MARK_DOWN: u32 = 2;

/// One cluster's health, shared by the prober and the request path.
#[derive(Debug)]
pub struct Health {
    up: AtomicBool,
    failures: AtomicU32,
    last_error: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        // Optimistic until proven otherwise: a starting relay must not refuse a healthy cluster.
        Self {
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            last_error: Mutex::new(None),
        }
    }
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    fn record(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.failures.store(0, Ordering::Relaxed);
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("cluster reachable again");
                }
                *self.last_error.lock() = None;
            }
            Err(e) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= FAILURES_TO_MARK_DOWN && self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cluster marked down after failed probes");
                }
                *self.last_error.lock() = Some(e);
            }
        }
    }
}

/// Probes `upstream` every `interval` until `stop`.
pub fn spawn_probe(
    upstream: &Upstream,
    interval: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    let dialer = upstream.upgrade_dialer.clone();
    let uri = match upstream.uri("/readyz") {
        Ok(u) => u,
        Err(_) => return,
    };
    let authority = upstream.authority.to_string();
    let health = upstream.health.clone();
    let cluster = upstream.cluster.name.to_string();
    tokio::spawn(async move {
        loop {
            let r = tokio::time::timeout(timeout, probe(&dialer, &uri, &authority))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
            if let Err(e) = &r {
                tracing::debug!(cluster = %cluster, error = %e, "health probe failed");
            }
            health.record(r);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    });
}

async fn probe(dialer: &super::TlsDialer, uri: &http::Uri, authority: &str) -> Result<(), String> {
    let io = dialer.dial(uri).await.map_err(|e| e.detail)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/readyz", |p| p.as_str());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, PROBE_USER_AGENT)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    sender
        .send_request(req)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Shares a [`Health`] between an [`Upstream`] and its prober.
pub type SharedHealth = Arc<Health>;
