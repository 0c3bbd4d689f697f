//! The accept loop of the simulator's small loopback servers: the dev OIDC issuer
//! ([`crate::issuer`]), the Entra token endpoint ([`crate::token_endpoint`]) and the Microsoft
//! Graph stand-in ([`crate::graph`]).
//!
//! They differ only in how they answer a request, and all must fail the same way a real service
//! does under test: shutdown closes every connection (keep-alive ones included, and requests a
//! stand-in is holding on purpose), so it looks like an outage to clients; a client that connects
//! and then stalls its TLS handshake cannot hold a task forever; and a failing `accept` (EMFILE, a
//! connection reset before accept) does not spin or stop the server. One copy of that loop keeps
//! those guarantees alike in every stand-in.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A TLS client that connects and then stalls must not hold a task forever.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait after a failed `accept` before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `respond` on `listener` in a task of its own until `cancel` fires: over TLS when `tls`
/// is given (HTTP/2 or HTTP/1.1 as its ALPN allows), else plain HTTP/1.1 or h2c. Each connection
/// gets a task; cancelling drops them all, closing their sockets. `name` labels the log lines.
pub(crate) fn spawn_server<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    cancel: CancellationToken,
    respond: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // Shutdown wins over a pending accept.
                biased;
                () = cancel.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _peer)) => {
                    // Without it, a TLS 1.3 answer written after the session tickets waits for
                    // the client's delayed ACK of those (40 ms on Linux): the relay's key fetch
                    // from a dev issuer took ~45 ms instead of ~4, and readiness with it.
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(error) => {
                    // Back off briefly instead of spinning, and keep serving.
                    tracing::warn!(%error, "{name}: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let respond = respond.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                // Cancellation drops the connection future, which closes the socket.
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => {}
                    () = connection(name, stream, acceptor, respond) => {}
                }
            });
        }
    });
}

async fn connection<F, Fut>(
    name: &'static str,
    stream: TcpStream,
    acceptor: Option<TlsAcceptor>,
    respond: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let response = respond(request);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let result = match acceptor {
        Some(acceptor) => {
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "{name}: TLS handshake failed");
                        return;
                    }
                    Err(_elapsed) => {
                        tracing::debug!("{name}: TLS handshake timed out");
                        return;
                    }
                };
            builder.serve_connection(TokioIo::new(tls), service).await
        }
        None => {
            builder
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "{name}: connection ended with an error");
    }
}
