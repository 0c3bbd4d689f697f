//! Upstream connections: one pooled client per cluster, plus fresh connections for upgrades.
//!
//! - TLS to a cluster always verifies the cluster's own CA (never the system roots, never
//!   "insecure") against the host of its `server` URL, also when `connect` makes us dial an IP:
//!   the dial address and the verified name are separate inputs on purpose (docs/architecture.md
//!   "Configuration").
//! - Short requests go over a pool of HTTP/1.1 keep-alive connections, long-running ones over
//!   HTTP/2 lanes (ALPN `h2` and `http/1.1`), so many watches share few connections
//!   (`clusters[].upstream_protocol`, [`UpstreamPool`]).
//! - Upgrades (exec/attach/port-forward) each get their own HTTP/1.1 connection that is dropped
//!   when the tunnel ends and is never returned to a pool (docs/security.md A1, C5).
//! - hyper's client never follows redirects; a response it cannot parse fails that connection,
//!   which the pool then discards.

pub mod health;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus_client::metrics::counter::Counter;
use rustls::ClientConfig;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{ClusterConfig, RelayCredential, UpstreamAuth, UpstreamProtocol};
use crate::net::{client_tls, Trust, H2_OR_HTTP1, HTTP1};
pub use crate::net::{pooled_client, PooledClient, SendError, TlsDialer, UpstreamBody};
use crate::net::{Http1Body, Http1Pool};

/// The TLS a cluster is reached with: exactly its CA, and the relay's client certificate when
/// that is its `impersonate` credential. `doctor` checks with this same config.
pub fn cluster_tls(cluster: &ClusterConfig, alpn: &[&[u8]]) -> anyhow::Result<Arc<ClientConfig>> {
    let cert = match &cluster.upstream_auth {
        UpstreamAuth::Impersonate(RelayCredential::ClientCert { chain, key }) => {
            Some((chain.as_slice(), key))
        }
        _ => None,
    };
    client_tls(Trust::Only(&cluster.ca), cert, alpn)
}

/// Connections a cluster's long-running requests (watch, `logs -f`) spread over. An API server
/// caps the streams of one HTTP/2 connection (kube-apiserver and hyper: a few hundred), and a
/// request beyond the cap waits for a free stream, so a single shared connection would hold
/// the 201st watch until its response-header timeout. Lanes connect lazily and close when idle.
pub const LONG_RUNNING_LANES: usize = 64;

/// HTTP/1.1 connections one cluster's short requests use at once (`upstream_protocol: mixed`).
/// A request that finds them all busy goes over the cluster's HTTP/2 connection instead of
/// waiting or dialling more, so a burst of any size keeps at most this many connections to the
/// API server for short requests (a connection is back in the pool before its slot is free:
/// the body that holds both gives the connection back first). Why 256: a request that spills
/// to HTTP/2 costs far more (its header block is Huffman-coded again, a passthrough token in
/// full every time, and all of them queue on one connection's task); at 128, a fifth of the
/// fair benchmark's 320 concurrent requests spilled (docs/perf). kube-apiserver's own default
/// in-flight limits are 400 reads and 200 writes. As many idle ones are kept: a smaller idle
/// cap closes connections a busy moment later dials again, a TLS handshake each.
pub const HTTP1_CONNECTIONS: usize = 256;

/// An idle HTTP/1.1 connection closes after this long unused. kube-apiserver closes a
/// keep-alive connection after 90 s idle; letting ours go well before that keeps a request from
/// being written on a connection the server is closing at that moment (which would fail).
pub const HTTP1_IDLE: Duration = Duration::from_secs(30);

/// A cluster's pooled clients.
///
/// - Short requests: an HTTP/1.1 keep-alive pool while one of its [`HTTP1_CONNECTIONS`] slots
///   is free (`mixed`), else lane 0, one multiplexed connection under light load.
/// - Long-running requests: lanes `1..`, round robin, so N watches need about
///   N / [`LONG_RUNNING_LANES`] streams per connection.
///
/// Why HTTP/1.1 for short requests (docs/perf): on HTTP/2 every request's headers are
/// Huffman-coded again (an Entra token of 3 KB, one `Impersonate-Group` per group, none of
/// which the HPACK table can keep), and all requests queue on one connection's task; on
/// HTTP/1.1 the headers are copied as they are and requests spread over connections.
pub struct UpstreamPool {
    http1: Option<(Http1Pool, Arc<Semaphore>)>,
    lanes: Vec<PooledClient>,
    next: AtomicUsize,
}

/// Where one request goes: chosen before it is built, because only a request that may go
/// over HTTP/2 needs a copy kept for a retry (see `net::refused_unprocessed`).
pub enum Pick {
    /// The HTTP/1.1 pool; the slot is held until the response body is done.
    Http1(OwnedSemaphorePermit),
    Lane(usize),
}

impl Pick {
    /// The HTTP/1.1 slot, to be held until the response body is done.
    pub fn into_slot(self) -> Option<OwnedSemaphorePermit> {
        match self {
            Pick::Http1(slot) => Some(slot),
            Pick::Lane(_) => None,
        }
    }

    /// The request may travel over HTTP/2, where a GOAWAY can refuse it unprocessed.
    pub fn may_be_refused(&self) -> bool {
        matches!(self, Pick::Lane(_))
    }
}

impl UpstreamPool {
    /// `lanes` dial with the cluster's ALPN choice; `http1`, when set, dials HTTP/1.1 only and
    /// serves short requests first, counting in `resends` the requests it sends again.
    pub fn new(
        lanes: TlsDialer,
        http1: Option<TlsDialer>,
        long_running_lanes: usize,
        resends: Counter,
    ) -> Self {
        Self {
            http1: http1.map(|d| {
                (
                    Http1Pool::new(d, HTTP1_CONNECTIONS, HTTP1_IDLE, resends),
                    Arc::new(Semaphore::new(HTTP1_CONNECTIONS)),
                )
            }),
            lanes: (0..=long_running_lanes)
                .map(|_| pooled_client(lanes.clone()))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Chooses the connection kind a request goes over; `long_running` as the authorize phase
    /// read the query (`watch` or `follow` true, the way kube-apiserver parses it).
    pub fn pick(&self, long_running: bool) -> Pick {
        if long_running {
            if self.lanes.len() > 1 {
                let n = self.next.fetch_add(1, Ordering::Relaxed) % (self.lanes.len() - 1);
                return Pick::Lane(1 + n);
            }
            return Pick::Lane(0);
        }
        match &self.http1 {
            Some((_, slots)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Pick::Http1(slot),
                Err(_) => Pick::Lane(0),
            },
            None => Pick::Lane(0),
        }
    }

    /// Sends a request where `pick` says.
    pub async fn send(
        &self,
        pick: &Pick,
        req: http::Request<UpstreamBody>,
    ) -> Result<http::Response<ResponseBody>, SendError> {
        let lane = match (pick, &self.http1) {
            (Pick::Http1(_), Some((pool, _))) => {
                return Ok(pool.send(req).await?.map(ResponseBody::Http1));
            }
            (Pick::Lane(i), _) => (*i).min(self.lanes.len() - 1),
            // A slot is only handed out by a pool that has the HTTP/1.1 client.
            (Pick::Http1(_), None) => 0,
        };
        Ok(self.lanes[lane].request(req).await?.map(ResponseBody::Lane))
    }

    /// Short requests under way over HTTP/1.1.
    #[cfg(test)]
    fn http1_busy(&self) -> usize {
        self.http1
            .as_ref()
            .map_or(0, |(_, s)| HTTP1_CONNECTIONS - s.available_permits())
    }
}

/// An answer's body from either kind of connection.
pub enum ResponseBody {
    Http1(Http1Body),
    Lane(Incoming),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Http1(b) => std::pin::Pin::new(b).poll_frame(cx),
            Self::Lane(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(b) => b.is_end_stream(),
            Self::Lane(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(b) => b.size_hint(),
            Self::Lane(b) => b.size_hint(),
        }
    }
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
    pub health: health::SharedHealth,
}

impl Upstream {
    /// The cluster's connections; requests its HTTP/1.1 pool sends again count in `resends`.
    pub fn new(
        cluster: Arc<ClusterConfig>,
        connect_timeout: Duration,
        resends: Counter,
    ) -> anyhow::Result<Self> {
        let cluster_for_creds = cluster.clone();
        let lanes_alpn = match cluster.upstream_protocol {
            UpstreamProtocol::Mixed | UpstreamProtocol::Http2 => H2_OR_HTTP1,
            UpstreamProtocol::Http1 => HTTP1,
        };
        let pooled_tls = cluster_tls(&cluster, lanes_alpn)?;
        let upgrade_tls = cluster_tls(&cluster, HTTP1)?;
        let name = cluster.server_name.clone();
        let dial = cluster.dial.as_str();
        let upgrade_dialer =
            TlsDialer::new(upgrade_tls, Some(dial), Some(name.clone()), connect_timeout);
        let http1 =
            (cluster.upstream_protocol == UpstreamProtocol::Mixed).then(|| upgrade_dialer.clone());
        let client = UpstreamPool::new(
            TlsDialer::new(pooled_tls, Some(dial), Some(name), connect_timeout),
            http1,
            LONG_RUNNING_LANES,
            resends,
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(http1: bool) -> UpstreamPool {
        crate::install_crypto_provider();
        let tls = client_tls(Trust::Only(&[]), None, H2_OR_HTTP1).unwrap();
        let dialer = TlsDialer::new(tls, Some("127.0.0.1:1"), None, Duration::from_secs(1));
        UpstreamPool::new(
            dialer.clone(),
            http1.then_some(dialer),
            4,
            Counter::default(),
        )
    }

    #[tokio::test]
    async fn short_requests_take_http1_slots_then_share_http2_and_watches_take_lanes() {
        let p = pool(true);
        let (get, watch) = (false, true);
        let mut held = Vec::new();
        for _ in 0..HTTP1_CONNECTIONS {
            let pick = p.pick(get);
            assert!(matches!(pick, Pick::Http1(_)));
            assert!(!pick.may_be_refused());
            held.push(pick);
        }
        assert_eq!(p.http1_busy(), HTTP1_CONNECTIONS);
        // All slots busy: the next short request goes over HTTP/2 instead of waiting.
        let spill = p.pick(get);
        assert!(matches!(spill, Pick::Lane(0)) && spill.may_be_refused());
        // A slot comes back when its response is done (the pick is dropped with the body).
        held.pop();
        assert!(matches!(p.pick(get), Pick::Http1(_)));
        // Watches never use the HTTP/1.1 slots: they spread over lanes 1..=4.
        let lanes: Vec<usize> = (0..8)
            .map(|_| match p.pick(watch) {
                Pick::Lane(i) => i,
                Pick::Http1(_) => panic!("a watch took an HTTP/1.1 slot"),
            })
            .collect();
        assert_eq!(lanes, [1, 2, 3, 4, 1, 2, 3, 4]);
        drop(held);
        assert_eq!(p.http1_busy(), 0);
    }

    #[tokio::test]
    async fn without_the_http1_pool_everything_short_goes_to_lane_zero() {
        let p = pool(false);
        assert!(matches!(p.pick(false), Pick::Lane(0)));
        assert_eq!(p.http1_busy(), 0);
    }
}
