//! Wiring: builds the shared [`State`] from a [`Config`], binds the listeners and runs them.
//!
//! Accept loop (mini-redis shape): take a connection permit *before* accepting, so the cap
//! bounds sockets as well as tasks; then TLS under one deadline that covers the whole handshake;
//! then hyper-util's auto builder (h2 or http/1.1 by ALPN, upgrades enabled) with a timer, so the
//! header-read timeout really applies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, ConnCtx};
use crate::upstream::Upstream;

/// Everything a request needs, shared by all connections.
pub struct State {
    pub cfg: Config,
    pub upstreams: HashMap<String, Upstream>,
    pub auth: Authenticator,
    pub metrics: Metrics,
    ready: AtomicBool,
}

/// A relay with its listeners bound, ready to [`App::run`].
pub struct App {
    state: Arc<State>,
    tls: TlsAcceptor,
    listener: TcpListener,
    admin: Option<TcpListener>,
}

impl App {
    /// Builds the state and binds the listeners (so callers can learn the ports before running).
    pub async fn bind(cfg: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("listen: cannot bind {}: {e}", cfg.listen))?;
        let admin = match cfg.admin_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("admin.listen: cannot bind {a}: {e}"))?,
            ),
            None => None,
        };
        Self::with_listeners(cfg, listener, admin)
    }

    /// Builds the relay on listeners the caller already bound (dev mode binds first so the
    /// files it writes name the real ports).
    pub fn with_listeners(
        cfg: Config,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> anyhow::Result<Self> {
        let tls = TlsAcceptor::from(crate::tls::server_config(&cfg.tls)?);
        let mut upstreams = HashMap::new();
        for c in &cfg.clusters {
            upstreams.insert(
                c.name.to_string(),
                Upstream::new(c.clone(), cfg.timeouts.connect)?,
            );
        }
        let auth = Authenticator::new(&cfg.issuers)?;
        let state = Arc::new(State {
            cfg,
            upstreams,
            auth,
            metrics: Metrics::new(),
            ready: AtomicBool::new(false),
        });
        Ok(Self {
            state,
            tls,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and waits (bounded) for open
    /// connections to finish.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        if let Some(admin) = self.admin {
            tracker.spawn(serve_admin(admin, self.state.clone(), shutdown.clone()));
        }
        // Load issuer keys in the background: readiness waits for them, traffic does not block
        // start-up (a token arriving first triggers its own fetch).
        {
            let state = self.state.clone();
            tracker.spawn(async move {
                state.auth.warm_up().await;
                state.ready.store(true, Ordering::SeqCst);
            });
        }
        let permits = Arc::new(Semaphore::new(
            self.state.cfg.limits.max_connections as usize,
        ));
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let state = self.state.clone();
            let tls = self.tls.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                serve_connection(state, tls, tcp, peer, shutdown).await;
            });
        }
        tracker.close();
        // Issue-5 territory (jittered watch drain, exec grace) builds on this bounded wait.
        let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
        Ok(())
    }
}

async fn serve_connection(
    state: Arc<State>,
    tls: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let handshake = state.cfg.timeouts.handshake;
    let stream = match tokio::time::timeout(handshake, tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "TLS handshake timed out");
            return;
        }
    };
    let sni = stream
        .get_ref()
        .1
        .server_name()
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
    let conn = Arc::new(ConnCtx { peer, sni });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(250)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(Some(50))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let svc =
        service_fn(move |req: Request<Incoming>| proxy::handle(state.clone(), conn.clone(), req));
    let serving = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(serving);
    tokio::select! {
        r = serving.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            serving.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics`, plain HTTP on a private address.
async fn serve_admin(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(admin_response(&state, req.uri().path()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn admin_response(
    state: &State,
    path: &str,
) -> Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
    let (code, ctype, body) = match path {
        "/healthz" | "/livez" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let mut lines = String::new();
            let mut ok = state.ready.load(Ordering::SeqCst);
            if !ok {
                lines.push_str("[-] startup: loading issuer keys\n");
            }
            for (name, n) in state.auth.key_counts() {
                if n == 0 {
                    ok = false;
                    lines.push_str(&format!("[-] issuer {name}: no signing keys loaded\n"));
                } else {
                    lines.push_str(&format!("[+] issuer {name}: {n} keys\n"));
                }
            }
            lines.push_str(if ok { "ok\n" } else { "not ready\n" });
            let code = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, "text/plain", lines)
        }
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}
