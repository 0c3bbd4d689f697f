//! Dialing a TLS server and the pooled hyper client over it, for every outbound HTTPS
//! request of the relay: clusters (through [`crate::upstream`]), issuers' keys, token endpoints.
//!
//! - The dial address and the name verified in the certificate are separate inputs, so a
//!   cluster reached by IP through `connect` is still verified against its `server` host.
//! - Errors stay typed ([`DialError`] with an [`UpstreamFailure`]) down the source chain, so
//!   they are classified without string matching.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{error_chain, ReadAhead};

/// Why an upstream exchange failed; the names are the `reason` label of
/// `relay_upstream_errors_total` (docs/architecture.md, "Metrics").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    ConnectRefused,
    ConnectTimeout,
    Tls,
    ResponseTimeout,
    Protocol,
    UpgradeRejected,
    /// The cluster refused the request without processing it (see [`refused_unprocessed`]),
    /// every time it was sent.
    Refused,
}

impl UpstreamFailure {
    pub fn as_label(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::Tls => "tls",
            Self::ResponseTimeout => "response_timeout",
            Self::Protocol => "protocol",
            Self::UpgradeRejected => "upgrade_rejected",
            Self::Refused => "refused",
        }
    }
}

/// Request body type sent upstream: the client's body, streamed, or nothing.
pub type UpstreamBody = BoxBody<Bytes, hyper::Error>;

/// A pooled HTTPS client.
pub type PooledClient = Client<TlsDialer, UpstreamBody>;

/// The connection a [`TlsDialer`] yields: TLS over TCP, reporting whether h2 was negotiated so
/// the pooled client picks the right protocol.
pub struct UpstreamConn {
    io: TokioIo<TlsStream<ReadAhead<TcpStream>>>,
    h2: bool,
}

impl UpstreamConn {
    pub fn into_io(self) -> TokioIo<TlsStream<ReadAhead<TcpStream>>> {
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
    /// Shared: the pooled client clones its dialer for every request, and a name is a String.
    server_name: Option<Arc<ServerName<'static>>>,
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
            server_name: server_name.map(Arc::new),
            connect_timeout,
        }
    }

    /// Dials and completes the TLS handshake under one deadline.
    pub async fn dial(&self, uri: &Uri) -> Result<UpstreamConn, DialError> {
        let (addr, name) = match (&self.dial, &self.server_name) {
            (Some(d), Some(n)) => (d.to_string(), ServerName::clone(n)),
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
            let tls = self
                .tls
                .connect(name, ReadAhead::new(tcp))
                .await
                .map_err(|e| DialError {
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
    pooled_builder().build(dialer)
}

fn pooled_builder() -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        // Keep h2 connections alive well under the ~4 min idle cut of Azure load balancers.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .http2_keep_alive_while_idle(true);
    b
}

/// Why a request to a cluster got no answer: from the HTTP/1.1 pool ([`super::http1`]) or an
/// HTTP/2 lane (hyper_util's pooled client).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    #[error(transparent)]
    Lane(#[from] hyper_util::client::legacy::Error),
}

/// Classifies a failed request: our typed dial error where there is one (the lanes' client
/// wraps it in its source chain), a refusal the request may be sent again after, else a
/// protocol failure.
pub fn classify(err: &SendError) -> (UpstreamFailure, String) {
    if refused_unprocessed(err) {
        return (UpstreamFailure::Refused, error_chain(err));
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = match err {
        SendError::Dial(d) => return (d.failure, d.detail.clone()),
        SendError::Http1(e) => Some(e),
        SendError::Lane(e) => Some(e),
    };
    while let Some(e) = src {
        if let Some(d) = e.downcast_ref::<DialError>() {
            return (d.failure, d.detail.clone());
        }
        src = e.source();
    }
    (UpstreamFailure::Protocol, error_chain(err))
}

/// Whether the request never reached the server's processing, so it may be sent again:
/// - an HTTP/2 stream above the last stream id of a graceful GOAWAY (RFC 9113 §6.8 guarantees
///   the server did not act on it), or a stream reset with REFUSED_STREAM (§8.7);
/// - a request that never left the relay: the connection it was queued on closed first, and
///   hyper hands such a request back as canceled. A GOAWAY that reaches a freshly dialed
///   connection before its first request is written ends that way; the pooled client resends
///   these by itself only on a reused connection.
///
/// (The HTTP/1.1 pool resends a request its connection never wrote by itself.)
pub fn refused_unprocessed(err: &SendError) -> bool {
    let SendError::Lane(err) = err else {
        return false;
    };
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = src {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
                    || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 server that resets every stream with `reason`, and what the pooled client's
    /// error for it says about resending.
    async fn error_for_reset(reason: h2::Reason) -> SendError {
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
        SendError::Lane(client.get(uri).await.expect_err("the stream was reset"))
    }

    /// Dials `addr`, and hands the connection over only once `ready` fires.
    #[derive(Clone)]
    struct DialWhenReady {
        addr: std::net::SocketAddr,
        ready: Arc<tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>,
    }

    impl tower_service::Service<Uri> for DialWhenReady {
        type Response = TokioIo<TcpStream>;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let tcp = TcpStream::connect(this.addr).await?;
                if let Some(ready) = this.ready.lock().await.take() {
                    let _ = ready.await;
                }
                Ok(TokioIo::new(tcp))
            })
        }
    }

    /// A freshly dialed HTTP/2 connection whose server said GOAWAY (last stream 0, NO_ERROR)
    /// before the client's first request left: the request never reached the server.
    #[tokio::test]
    async fn a_request_a_fresh_connection_closed_before_sending_is_resent() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (written, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut tcp, _) = l.accept().await.unwrap();
            // An empty SETTINGS, then GOAWAY with last stream 0 and NO_ERROR (RFC 9113 §6.5,
            // §6.8), both in the client's receive buffer before it has sent anything.
            let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
            let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            tcp.write_all(&[&settings[..], &goaway[..]].concat())
                .await
                .unwrap();
            let _ = written.send(());
            let _ = tcp.read_to_end(&mut Vec::new()).await;
        });
        let dial = DialWhenReady {
            addr,
            ready: Arc::new(tokio::sync::Mutex::new(Some(ready))),
        };
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build::<_, http_body_util::Empty<Bytes>>(dial);
        let uri: Uri = format!("http://{addr}/api/v1/pods").parse().unwrap();
        let err = SendError::Lane(client.get(uri).await.expect_err("the server went away"));
        // hyper handed the unsent request back as canceled (not an HTTP/2 stream error): the
        // pooled client does not resend it on a connection it just dialed, so the relay must.
        let mut src: Option<&(dyn std::error::Error + 'static)> = match &err {
            SendError::Lane(e) => Some(e),
            _ => None,
        };
        let mut canceled = false;
        while let Some(e) = src {
            canceled |= e
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled);
            assert!(e.downcast_ref::<h2::Error>().is_none(), "{err:?}");
            src = e.source();
        }
        assert!(canceled, "{err:?}");
        assert!(refused_unprocessed(&err));
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
