//! Upstream connections: one pooled client per cluster, plus fresh connections for upgrades.
//!
//! - TLS to a cluster always verifies the cluster's own CA (never the system roots, never
//!   "insecure") against the host of its `server` URL, also when `connect` makes us dial an IP:
//!   the dial address and the verified name are separate inputs on purpose (design.md §3).
//! - The pooled client offers ALPN `h2` and `http/1.1` and speaks HTTP/2 when the server picks it,
//!   so many watches share few connections.
//! - Upgrades (exec/attach/port-forward) each get their own HTTP/1.1 connection that is dropped
//!   when the tunnel ends and is never returned to a pool (security.md A1, C5).
//! - hyper's client never follows redirects; a response it cannot parse fails that connection,
//!   which the pool then discards.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{ClusterConfig, RelayCredential, UpstreamAuth};
use crate::error::UpstreamFailure;

/// Request body type sent upstream: the client's body, streamed, or nothing.
pub type UpstreamBody = BoxBody<Bytes, hyper::Error>;

/// A pooled HTTPS client.
pub type PooledClient = Client<TlsDialer, UpstreamBody>;

/// Builds a rustls client config trusting exactly `roots`, with an optional client certificate.
pub fn client_tls(
    roots: &[rustls::pki_types::CertificateDer<'static>],
    client_cert: Option<&RelayCredential>,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store.add(cert.clone())?;
    }
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(store);
    let mut cfg = match client_cert {
        Some(RelayCredential::ClientCert { chain, key }) => {
            builder.with_client_auth_cert(chain.clone(), key.clone_key())?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The connection a [`TlsDialer`] yields: TLS over TCP, reporting whether h2 was negotiated so
/// the pooled client picks the right protocol.
pub struct UpstreamConn {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
}

impl UpstreamConn {
    pub fn into_io(self) -> TokioIo<TlsStream<TcpStream>> {
        self.io
    }
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for UpstreamConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Why dialing failed, kept typed so errors can be classified without string matching.
#[derive(Debug, thiserror::Error)]
#[error("{failure:?}: {detail}")]
pub struct DialError {
    pub failure: UpstreamFailure,
    pub detail: String,
}

/// Dials TCP then TLS. `dial` fixes the address (the cluster's `connect` or server host:port);
/// `server_name` fixes the name verified in the certificate. When `None`, both come from the URI
/// (used for issuer discovery and JWKS).
#[derive(Clone)]
pub struct TlsDialer {
    tls: TlsConnector,
    dial: Option<Arc<str>>,
    server_name: Option<ServerName<'static>>,
    connect_timeout: Duration,
}

impl TlsDialer {
    pub fn new(
        tls: Arc<ClientConfig>,
        dial: Option<&str>,
        server_name: Option<ServerName<'static>>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            tls: TlsConnector::from(tls),
            dial: dial.map(Arc::from),
            server_name,
            connect_timeout,
        }
    }

    /// Dials and completes the TLS handshake under one deadline.
    pub async fn dial(&self, uri: &Uri) -> Result<UpstreamConn, DialError> {
        let (addr, name) = match (&self.dial, &self.server_name) {
            (Some(d), Some(n)) => (d.to_string(), n.clone()),
            _ => {
                let host = uri.host().ok_or_else(|| DialError {
                    failure: UpstreamFailure::Protocol,
                    detail: "URI has no host".into(),
                })?;
                let port = uri.port_u16().unwrap_or(443);
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(bare.to_owned()).map_err(|e| DialError {
                    failure: UpstreamFailure::Tls,
                    detail: format!("invalid server name {bare}: {e}"),
                })?;
                (format!("{host}:{port}"), name)
            }
        };
        let work = async {
            let tcp = TcpStream::connect(&*addr).await.map_err(|e| DialError {
                failure: UpstreamFailure::ConnectRefused,
                detail: format!("connect {addr}: {e}"),
            })?;
            let _ = tcp.set_nodelay(true);
            let tls = self.tls.connect(name, tcp).await.map_err(|e| DialError {
                failure: UpstreamFailure::Tls,
                detail: format!("TLS with {addr}: {e}"),
            })?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(UpstreamConn {
                io: TokioIo::new(tls),
                h2,
            })
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(DialError {
                failure: UpstreamFailure::ConnectTimeout,
                detail: format!(
                    "connect to {addr} timed out after {:?}",
                    self.connect_timeout
                ),
            }),
        }
    }
}

impl tower_service::Service<Uri> for TlsDialer {
    type Response = UpstreamConn;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamConn, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.dial(&uri).await })
    }
}

/// Builds a pooled client over a dialer.
pub fn pooled_client(dialer: TlsDialer) -> PooledClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        // Keep h2 connections alive well under the ~4 min idle cut of Azure load balancers.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .http2_keep_alive_while_idle(true)
        .build(dialer)
}

/// Connections a cluster's long-running requests (watch, `logs -f`) spread over. An API server
/// caps the streams of one HTTP/2 connection (kube-apiserver and hyper: a few hundred), and a
/// request beyond the cap waits for a free stream, so a single shared connection would hold
/// the 201st watch until its response-header timeout. Lanes connect lazily and close when idle.
pub const LONG_RUNNING_LANES: usize = 64;

/// A cluster's pooled clients: lane 0 carries the short requests (one multiplexed connection
/// under light load), lanes `1..` carry long-running ones, round robin, so N watches need about
/// N / `LONG_RUNNING_LANES` streams per connection.
pub struct UpstreamPool {
    lanes: Vec<PooledClient>,
    next: AtomicUsize,
}

impl UpstreamPool {
    pub fn new(dialer: TlsDialer, long_running_lanes: usize) -> Self {
        let lanes = (0..=long_running_lanes)
            .map(|_| pooled_client(dialer.clone()))
            .collect();
        Self {
            lanes,
            next: AtomicUsize::new(0),
        }
    }

    /// Sends a request on the lane its kind calls for.
    pub fn request(&self, req: http::Request<UpstreamBody>) -> ResponseFuture {
        let lane = if self.lanes.len() > 1 && is_long_running(req.uri()) {
            1 + self.next.fetch_add(1, Ordering::Relaxed) % (self.lanes.len() - 1)
        } else {
            0
        };
        self.lanes[lane].request(req)
    }
}

/// `watch=` or `follow=` set to true (`true`, `1`): a request whose response stays open.
fn is_long_running(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&').any(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == "watch" || k == "follow") && (v == "true" || v == "1")
        })
    })
}

/// Everything the relay needs to talk to one cluster.
pub struct Upstream {
    pub cluster: Arc<ClusterConfig>,
    pub client: UpstreamPool,
    /// Dials fresh HTTP/1.1-only connections for upgrades.
    pub upgrade_dialer: TlsDialer,
    /// `scheme://authority` of the server, the base of every forwarded URI.
    pub authority: http::uri::Authority,
    /// What the relay presents upstream for a caller (their token, an exchanged one, or its own).
    pub credentials: Arc<crate::credentials::UpstreamCredentials>,
    /// Reachability as seen by the periodic probe.
    pub health: crate::health::SharedHealth,
}

impl Upstream {
    pub fn new(cluster: Arc<ClusterConfig>, connect_timeout: Duration) -> anyhow::Result<Self> {
        let cluster_for_creds = cluster.clone();
        let cert = match &cluster.upstream_auth {
            UpstreamAuth::Impersonate(c @ RelayCredential::ClientCert { .. }) => Some(c),
            _ => None,
        };
        let pooled_tls = client_tls(&cluster.ca, cert, &[b"h2", b"http/1.1"])?;
        let upgrade_tls = client_tls(&cluster.ca, cert, &[b"http/1.1"])?;
        let name = cluster.server_name.clone();
        let dial = cluster.dial.as_str();
        let client = UpstreamPool::new(
            TlsDialer::new(pooled_tls, Some(dial), Some(name.clone()), connect_timeout),
            LONG_RUNNING_LANES,
        );
        let upgrade_dialer = TlsDialer::new(upgrade_tls, Some(dial), Some(name), connect_timeout);
        let host = cluster.server.host_str().unwrap_or_default();
        let authority = match cluster.server.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let authority = authority.parse()?;
        Ok(Self {
            cluster,
            client,
            upgrade_dialer,
            authority,
            credentials: Arc::new(crate::credentials::UpstreamCredentials::new(
                &cluster_for_creds,
            )?),
            health: Default::default(),
        })
    }

    /// The absolute URI for a path-and-query on this cluster.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let full = format!("{}{}", self.cluster.base_path, path_and_query);
        Uri::builder()
            .scheme("https")
            .authority(self.authority.clone())
            .path_and_query(full)
            .build()
    }
}

/// Classifies a pooled-client error by walking its source chain for our typed dial error.
pub fn classify(err: &hyper_util::client::legacy::Error) -> (UpstreamFailure, String) {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = src {
        if let Some(d) = e.downcast_ref::<DialError>() {
            return (d.failure, d.detail.clone());
        }
        src = e.source();
    }
    (UpstreamFailure::Protocol, error_chain(err))
}

/// Whether the server refused the request without processing it, so it may be sent again:
/// an HTTP/2 stream above the last stream id of a graceful GOAWAY (RFC 9113 §6.8 guarantees
/// the server did not act on it), or a stream reset with REFUSED_STREAM (§8.7).
pub fn refused_unprocessed(err: &hyper_util::client::legacy::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = src {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
                    || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        src = e.source();
    }
    false
}

/// An empty request body of the pooled client's body type.
pub fn empty_body() -> UpstreamBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Formats an error and its causes on one line, for logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_running_requests_are_told_by_watch_and_follow() {
        let lr = |u: &str| is_long_running(&u.parse::<Uri>().unwrap());
        assert!(lr("https://c/api/v1/pods?watch=1"));
        assert!(lr("https://c/api/v1/pods?resourceVersion=5&watch=true"));
        assert!(lr("https://c/api/v1/namespaces/d/pods/p/log?follow=true"));
        assert!(!lr("https://c/api/v1/pods?watch=false"));
        assert!(!lr("https://c/api/v1/pods?watchx=1"));
        assert!(!lr("https://c/api/v1/pods"));
        assert!(!lr("https://c/api/v1/pods?labelSelector=watch%3D1"));
    }

    /// An HTTP/2 server that resets every stream with `reason`, and what the pooled client's
    /// error for it says about resending.
    async fn error_for_reset(reason: h2::Reason) -> hyper_util::client::legacy::Error {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                respond.send_reset(reason);
            }
        });
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http::<http_body_util::Empty<Bytes>>();
        let uri: Uri = format!("http://{addr}/api/v1/pods").parse().unwrap();
        client.get(uri).await.expect_err("the stream was reset")
    }

    #[tokio::test]
    async fn only_streams_the_server_refused_unprocessed_are_resent() {
        assert!(refused_unprocessed(
            &error_for_reset(h2::Reason::REFUSED_STREAM).await
        ));
        assert!(!refused_unprocessed(
            &error_for_reset(h2::Reason::INTERNAL_ERROR).await
        ));
        assert!(!refused_unprocessed(
            &error_for_reset(h2::Reason::CANCEL).await
        ));
    }
}
