//! Wiring: builds the shared [`State`] from a [`Config`], binds the listeners and runs them.
//!
//! Accept loop (mini-redis shape): take a connection permit *before* accepting, so the cap
//! bounds sockets as well as tasks; then TLS under one deadline that covers the whole handshake;
//! then hyper-util's auto builder (h2 or http/1.1 by ALPN, upgrades enabled) with a timer, so the
//! header-read timeout really applies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy;
use crate::state::{ConnCtx, State};
use crate::upstream::Upstream;

/// The relay across generations: the current [`State`], and what outlives reloads.
pub struct Relay {
    current: ArcSwap<State>,
    config_path: Option<PathBuf>,
    draining: std::sync::atomic::AtomicBool,
    /// Serialises reloads (SIGHUP and file changes may race).
    reloading: tokio::sync::Mutex<()>,
}

impl Relay {
    /// The generation requests should use now.
    pub fn state(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Re-reads the configuration file and swaps in a new generation: certificates, issuers,
    /// clusters and credentials together, or nothing. An invalid file is rejected whole (logged,
    /// counted) and the running configuration keeps serving. Live streams survive unless the new
    /// rules no longer admit them.
    pub async fn reload(&self) -> Result<(), String> {
        let _serial = self.reloading.lock().await;
        let old = self.state();
        let result = self.try_reload(&old).await;
        let outcome = if result.is_ok() { "success" } else { "failure" };
        old.metrics
            .reloads
            .get_or_create(&crate::metrics::ResultLabels { result: outcome })
            .inc();
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "configuration reload rejected; the previous configuration keeps serving")
            }
        }
        result
    }

    async fn try_reload(&self, old: &Arc<State>) -> Result<(), String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or("this relay was not started from a configuration file")?;
        let cfg = crate::config::load(path).map_err(|e| e.to_string().replace('\n', "; "))?;
        if cfg.listen != old.cfg.listen || cfg.admin_listen != old.cfg.admin_listen {
            tracing::warn!("listen and admin.listen changes take effect only after a restart");
        }
        let new = Arc::new(build_state(cfg, Some(old)).map_err(|e| format!("{e:#}"))?);
        new.auth.adopt_keys(&old.auth);
        new.auth.spawn_refresh(new.generation.clone());
        spawn_probes(&new);
        self.current.store(new.clone());
        old.generation.cancel();
        revoke_streams(&new);
        Ok(())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Starts the health probes of a generation; they stop with it.
fn spawn_probes(state: &State) {
    for u in state.upstreams.values() {
        crate::upstream::health::spawn_probe(
            u,
            state.cfg.timeouts.health_interval,
            state.cfg.timeouts.connect,
            state.generation.clone(),
        );
    }
}

/// Closes live streams the (new) rules no longer admit (docs/security.md A6).
fn revoke_streams(state: &State) {
    for s in state.streams.snapshot() {
        let allowed = match state.upstreams.get(&s.cluster) {
            Some(u) => {
                let membership = state.groups.membership_cached(&s.principal);
                crate::authz::authorize(
                    &s.principal,
                    &u.cluster,
                    &s.info,
                    s.impersonating,
                    &membership,
                )
                .is_ok()
            }
            None => false,
        };
        if !allowed {
            tracing::info!(cluster = %s.cluster, user = %s.principal.user_key(), "closing a stream whose access was revoked");
            s.close(crate::streams::CloseReason::AccessRevoked);
        }
    }
}

/// Builds one generation. `previous` supplies what must persist (metrics, limits, live
/// streams, the audit writer when its sink is unchanged).
fn build_state(cfg: Config, previous: Option<&State>) -> anyhow::Result<State> {
    let tls = TlsAcceptor::from(crate::tls::server_config(&cfg.tls)?);
    let metrics = previous.map_or_else(|| Arc::new(Metrics::new()), |p| p.metrics.clone());
    let mut upstreams = HashMap::new();
    for c in &cfg.clusters {
        upstreams.insert(
            c.name.to_string(),
            Upstream::new(
                c.clone(),
                cfg.timeouts.connect,
                metrics.upstream_retries.clone(),
            )?,
        );
    }
    let audit = match previous {
        Some(p) if p.cfg.audit == cfg.audit && p.cfg.audit_mode == cfg.audit_mode => {
            p.audit.clone()
        }
        _ => crate::audit::AuditLog::start(&cfg.audit, cfg.audit_mode, metrics.clone())?,
    };
    let auth_failures = previous.map_or_else(
        || {
            Arc::new(crate::limits::FailureLimiter::new(
                cfg.limits.auth_failures_per_minute,
                Duration::from_secs(60),
            ))
        },
        |p| p.auth_failures.clone(),
    );
    let streams = previous.map_or_else(Default::default, |p| p.streams.clone());
    let tunnels = previous.map_or_else(TaskTracker::new, |p| p.tunnels.clone());
    // Buckets persist across reloads unless the limits themselves change.
    let identity_rate = match previous {
        Some(p)
            if p.cfg.limits.per_identity_requests_per_second
                == cfg.limits.per_identity_requests_per_second
                && p.cfg.limits.per_identity_burst == cfg.limits.per_identity_burst =>
        {
            p.identity_rate.clone()
        }
        _ => Arc::new(crate::limits::IdentityRate::new(
            cfg.limits.per_identity_requests_per_second,
            cfg.limits.per_identity_burst,
        )),
    };
    let auth = Arc::new(Authenticator::new(&cfg.issuers, metrics.clone())?);
    metrics.credentials.set(
        upstreams
            .iter()
            .map(|(name, u): (&String, &Upstream)| {
                let creds = u.credentials.clone();
                let read: crate::metrics::CredentialStatsFn = Box::new(move || creds.stats());
                (name.clone(), read)
            })
            .collect(),
    );
    let portal = crate::auth::sso::Portal::build(&cfg)?;
    let groups = crate::groups::GroupResolver::new(&cfg, &metrics)?;
    if let Some(p) = previous {
        groups.adopt(&p.groups);
    }
    let recordings = match &cfg.recording {
        Some(r) => Some(Arc::new(crate::recording::RecordingStore::new(&r.store)?)),
        None => None,
    };
    Ok(State {
        groups: Arc::new(groups),
        recordings,
        cfg,
        upstreams,
        auth,
        audit,
        portal,
        tls,
        generation: CancellationToken::new(),
        metrics,
        auth_failures,
        identity_rate,
        streams,
        tunnels,
    })
}

/// A relay with its listeners bound, ready to [`App::run`].
pub struct App {
    relay: Arc<Relay>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    /// SIGHUP, registered by [`App::reload_from`]: from then on the signal reloads instead of
    /// killing the process (its default), even before `run` starts.
    hup: Option<Hup>,
}

#[cfg(unix)]
type Hup = tokio::signal::unix::Signal;
/// No SIGHUP elsewhere: file changes still reload.
#[cfg(not(unix))]
type Hup = std::convert::Infallible;

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
        let state = Arc::new(build_state(cfg, None)?);
        Ok(Self {
            relay: Arc::new(Relay {
                current: ArcSwap::new(state),
                config_path: None,
                draining: std::sync::atomic::AtomicBool::new(false),
                reloading: tokio::sync::Mutex::new(()),
            }),
            listener,
            admin,
            hup: None,
        })
    }

    /// Reloads from `path` on SIGHUP and when the file changes (checked every two seconds).
    /// Must be called within the runtime: the signal handler is installed here, so a SIGHUP
    /// that arrives before `run` is not fatal.
    pub fn reload_from(mut self, path: PathBuf) -> Self {
        if let Some(r) = Arc::get_mut(&mut self.relay) {
            r.config_path = Some(path);
            // Only with a file to reload: a handler nobody polls would swallow SIGHUP for good.
            #[cfg(unix)]
            {
                self.hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            }
        }
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> Arc<State> {
        self.relay.state()
    }

    /// A handle for reloads and readiness (tests, signals).
    pub fn relay(&self) -> Arc<Relay> {
        self.relay.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains (design notes in [`drain`]).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let relay = self.relay.clone();
        let stop_accepting = CancellationToken::new();
        let close_connections = CancellationToken::new();
        if let Some(admin) = self.admin {
            tracker.spawn(serve_admin(admin, relay.clone(), stop_accepting.clone()));
        }
        // Issuer keys load in the background: readiness waits for them, start-up does not (a
        // token arriving first triggers its own, rate-limited fetch).
        {
            let st = relay.state();
            st.auth.spawn_refresh(st.generation.clone());
            spawn_probes(&st);
        }
        if relay.config_path.is_some() {
            tokio::spawn(watch_config(relay.clone(), shutdown.clone(), self.hup));
        }
        {
            // The registry and metrics outlive reloads; the limit is the current generation's.
            let st = relay.state();
            let (limit_of, stalls) = (relay.clone(), st.metrics.write_stalls.clone());
            tokio::spawn(crate::streams::sweep_stalled(
                st.streams.clone(),
                move || limit_of.state().cfg.timeouts.write_stall,
                move |n| {
                    stalls.inc_by(n as u64);
                },
                shutdown.clone(),
            ));
        }
        {
            let (relay, shutdown, stop, close) = (
                relay.clone(),
                shutdown.clone(),
                stop_accepting.clone(),
                close_connections.clone(),
            );
            tokio::spawn(async move {
                shutdown.cancelled().await;
                drain(&relay, &stop, &close).await;
            });
        }
        let permits = Arc::new(Semaphore::new(
            relay.state().cfg.limits.max_connections as usize,
        ));
        let sources = Arc::new(crate::limits::SourceConnections::default());
        loop {
            let permit = tokio::select! {
                () = stop_accepting.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (tcp, peer) = tokio::select! {
                () = stop_accepting.cancelled() => break,
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
            let relay = relay.clone();
            let close = close_connections.clone();
            let sources = sources.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let limit = relay.state().cfg.limits.max_connections_per_source;
                // Over the per-source cap: close before TLS, so a flood costs no handshake.
                let Some(_slot) = sources.acquire(peer.ip(), limit) else {
                    tracing::debug!(peer = %peer, "per-source connection limit reached");
                    return;
                };
                serve_connection(relay, tcp, peer, close).await;
            });
        }
        drop(self.listener);
        tracker.close();
        let st = relay.state();
        st.tunnels.close();
        let deadline = st.cfg.timeouts.drain_timeout;
        let everything = async {
            tracker.wait().await;
            st.tunnels.wait().await;
        };
        if tokio::time::timeout(deadline, everything).await.is_err() {
            tracing::warn!(
                ?deadline,
                "drain deadline reached with connections still open"
            );
        }
        // The writer is a detached thread; what the last streams logged must reach the disk
        // before the process exits. Bounded, so a stuck disk cannot hold the exit forever.
        if tokio::time::timeout(Duration::from_secs(5), st.audit.flush())
            .await
            .is_err()
        {
            tracing::warn!("audit log did not flush within 5s of shutdown");
        }
        Ok(())
    }
}

/// Graceful drain (docs/security.md scenario 7): readiness fails at once so load balancers stop
/// sending; new connections are still accepted for `drain_delay` (they may already be on their
/// way); HTTP/2 connections get GOAWAY and HTTP/1.1 ones lose keep-alive, so in-flight REST
/// completes; watches are closed at random moments spread over `drain_window` so clients do not
/// relist all at once; exec and port-forward tunnels get the whole window, then close. `run`
/// then waits for the remaining connections up to `drain_timeout`.
async fn drain(
    relay: &Relay,
    stop_accepting: &CancellationToken,
    close_connections: &CancellationToken,
) {
    relay
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let st = relay.state();
    let t = st.cfg.timeouts.clone();
    tracing::info!(delay = ?t.drain_delay, window = ?t.drain_window, "draining");
    close_connections.cancel();
    schedule_drain_closes(&st, &t);
    tokio::time::sleep(t.drain_delay).await;
    stop_accepting.cancel();
    // Streams opened during the delay were not in the first list; they get the same treatment
    // (closing one twice is harmless), so none of them holds the exit until drain_timeout.
    schedule_drain_closes(&relay.state(), &t);
}

/// Closes every live stream with reason "draining": watches at random moments within
/// `drain_window`, tunnels at its end.
fn schedule_drain_closes(st: &State, t: &crate::config::Timeouts) {
    let window_ms = t.drain_window.as_millis().max(1) as u64;
    for s in st.streams.snapshot() {
        let at = match s.kind {
            crate::streams::StreamKind::Watch => Duration::from_millis(
                (uuid::Uuid::new_v4().as_u128() % u128::from(window_ms)) as u64,
            ),
            crate::streams::StreamKind::Tunnel => t.drain_window,
        };
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            s.close(crate::streams::CloseReason::Draining);
        });
    }
}

/// Reloads on SIGHUP and when the configuration file's modification time or size changes.
async fn watch_config(relay: Arc<Relay>, shutdown: CancellationToken, mut hup: Option<Hup>) {
    let Some(path) = relay.config_path.clone() else {
        return;
    };
    let stamp = |p: &PathBuf| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&path);
    loop {
        #[cfg(unix)]
        let hup_fired = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fired = {
            let _ = &mut hup;
            std::future::pending::<()>()
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = hup_fired => {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = relay.reload().await;
                last = stamp(&path);
            }
            () = tokio::time::sleep(Duration::from_secs(2)) => {
                let now = stamp(&path);
                if now != last {
                    last = now;
                    tracing::info!(path = %path.display(), "configuration file changed: reloading");
                    let _ = relay.reload().await;
                }
            }
        }
    }
}

async fn serve_connection(
    relay: Arc<Relay>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    close: CancellationToken,
) {
    // The generation at accept time chooses the certificate; each request then uses the
    // generation current when it arrives.
    let state = relay.state();
    let handshake = state.cfg.timeouts.handshake;
    let tcp = crate::net::ReadAhead::new(tcp);
    let stream = match tokio::time::timeout(handshake, state.tls.accept(tcp)).await {
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
    drop(state);
    let sni = stream
        .get_ref()
        .1
        .server_name()
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
    // HTTP/1.1 request heads are checked for ambiguous framing before hyper reads them
    // (src/framing.rs); h2 frames its messages itself.
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let refused = relay.state().metrics.framing_refused.clone();
    let stream = crate::framing::StrictHttp1::new(stream, !h2, true, handshake, move |why| {
        refused.inc();
        tracing::info!(peer = %peer, reason = why, "request refused: ambiguous HTTP/1.1 framing");
    });
    let conn = Arc::new(ConnCtx::new(peer, sni));
    let abort = conn.abort.clone();
    // A connection accepted while draining (during `drain_delay`) is served, one request per
    // HTTP/1.1 connection; asking it to shut down at once would drop its first request unread.
    let late = relay.is_draining();
    // HTTP/2 streams run in this connection's task (src/conn_streams.rs).
    let streams = crate::conn_streams::ConnStreams::new();
    let mut builder = auto::Builder::new(streams.clone());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake)
        .keep_alive(!late)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(250)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(Some(50))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let ends = streams.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        // hyper hands an HTTP/2 request's stream to `streams` right after this call: a watch
        // whose client stops reading can then be ended alone (src/conn_streams.rs).
        let own_stream = (req.version() == http::Version::HTTP_2).then(|| ends.next_stream_end());
        proxy::handle(relay.state(), conn.clone(), req, own_stream)
    });
    let mut serving =
        streams.serve(builder.serve_connection_with_upgrades(TokioIo::new(stream), svc));
    // `abort` drops the connection mid-way: an HTTP/1.1 watch whose client stopped reading
    // cannot be ended any other way (src/streams.rs; an HTTP/2 one is reset alone). Its
    // requests are still polled until hyper ends them.
    tokio::select! {
        r = &mut serving => {
            if let Some(Err(e)) = r {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
            return;
        }
        () = abort.cancelled() => {}
        () = close.cancelled(), if !late => {
            // GOAWAY on h2, no more keep-alive on h1; in-flight requests finish. Long-running
            // ones are closed by the drain schedule.
            if let Some(conn) = serving.conn() {
                conn.graceful_shutdown();
            }
            tokio::select! {
                _ = &mut serving => return,
                () = abort.cancelled() => {}
            }
        }
    }
    serving.drop_conn();
    serving.await;
}

/// `/healthz`, `/readyz` and `/metrics`, plain HTTP on a private address.
async fn serve_admin(listener: TcpListener, relay: Arc<Relay>, shutdown: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let refused = relay.state().metrics.framing_refused.clone();
        // The admin listener never switches protocols: Upgrade requests are inspected too.
        let tcp = crate::framing::StrictHttp1::new(
            tcp,
            true,
            false,
            Duration::from_secs(10),
            move |why| {
                refused.inc();
                tracing::info!(peer = %peer, reason = why, "admin request refused: ambiguous HTTP/1.1 framing");
            },
        );
        let relay = relay.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let relay = relay.clone();
                async move {
                    if let Some(why) = req.headers().get(crate::framing::REFUSED_HEADER) {
                        return Ok::<_, std::convert::Infallible>(admin_refusal(why));
                    }
                    Ok::<_, std::convert::Infallible>(admin_response(&relay, req.uri().path()))
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

/// The admin listener's answer to a request head refused by the framing check.
fn admin_refusal(
    why: &http::HeaderValue,
) -> Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
    let body = crate::error::status_json(
        400,
        "BadRequest",
        &crate::framing::refusal_message(why.to_str().unwrap_or("ambiguous framing")),
    );
    let mut resp = Response::new(http_body_util::Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

fn admin_response(
    relay: &Relay,
    path: &str,
) -> Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
    let (code, ctype, body) = match path {
        "/healthz" | "/livez" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let state = relay.state();
            let mut lines = String::new();
            let mut ok = true;
            if relay.is_draining() {
                ok = false;
                lines.push_str("[-] draining: shutting down\n");
            }
            for (name, iss, n) in state.auth.key_status() {
                if n == 0 {
                    ok = false;
                    lines.push_str(&format!(
                        "[-] issuer {name} ({iss}): no usable signing keys (loading, IdP unreachable, or older than max_key_staleness)\n"
                    ));
                } else {
                    lines.push_str(&format!("[+] issuer {name} ({iss}): {n} keys\n"));
                }
            }
            // A down cluster does not make the relay unready (the others still work): it is
            // listed for operators.
            let mut clusters: Vec<_> = state.upstreams.iter().collect();
            clusters.sort_by(|a, b| a.0.cmp(b.0));
            for (name, u) in clusters {
                match u.health.last_error() {
                    Some(e) if !u.health.is_up() => {
                        lines.push_str(&format!("[-] cluster {name}: down ({e})\n"))
                    }
                    _ => lines.push_str(&format!("[+] cluster {name}: reachable\n")),
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
            relay.state().metrics.encode(),
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
