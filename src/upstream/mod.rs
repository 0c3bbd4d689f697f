//! Upstream connections: one pooled client per cluster, plus fresh connections for upgrades.
//!
//! - TLS to a cluster always verifies the cluster's own CA (never the system roots, never
//!   "insecure") against the host of its `server` URL, also when `connect` makes us dial an IP:
//!   the dial address and the verified name are separate inputs on purpose (docs/architecture.md
//!   "Configuration").
//! - The pooled client offers ALPN `h2` and `http/1.1` and speaks HTTP/2 when the server picks it,
//!   so many watches share few connections.
//! - Upgrades (exec/attach/port-forward) each get their own HTTP/1.1 connection that is dropped
//!   when the tunnel ends and is never returned to a pool (docs/security.md A1, C5).
//! - hyper's client never follows redirects; a response it cannot parse fails that connection,
//!   which the pool then discards.

pub mod health;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::ResponseFuture;
use rustls::ClientConfig;

use crate::config::{ClusterConfig, RelayCredential, UpstreamAuth};
use crate::net::{client_tls, Trust, H2_OR_HTTP1, HTTP1};
pub use crate::net::{pooled_client, PooledClient, TlsDialer, UpstreamBody};

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
    pub health: health::SharedHealth,
}

impl Upstream {
    pub fn new(cluster: Arc<ClusterConfig>, connect_timeout: Duration) -> anyhow::Result<Self> {
        let cluster_for_creds = cluster.clone();
        let pooled_tls = cluster_tls(&cluster, H2_OR_HTTP1)?;
        let upgrade_tls = cluster_tls(&cluster, HTTP1)?;
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
}
