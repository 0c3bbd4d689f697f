//! Prometheus metrics (docs/protocols.md §5.1 names). Labels never carry user ids, tokens or raw
//! paths: cluster names come from config, verbs and reasons from fixed sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub cluster: String,
    pub verb: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub cluster: String,
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LongRunningLabels {
    pub cluster: String,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub cluster: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthnLabels {
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerResultLabels {
    pub issuer: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub cluster: String,
    pub direction: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// What one cluster's credential layer has done: token requests and cache hits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CredentialStats {
    /// Token requests sent (OBO exchanges, azure_identity fetches).
    pub fetches: u64,
    /// Requests answered from the cache.
    pub cache_hits: u64,
}

/// Reads one cluster's [`CredentialStats`] at scrape time.
pub type CredentialStatsFn = Box<dyn Fn() -> CredentialStats + Send + Sync>;

/// Counts kept by each cluster's credential layer, read at scrape time so the request path
/// keeps no second copy.
#[derive(Default)]
pub struct CredentialCounts {
    clusters: std::sync::OnceLock<Vec<(String, CredentialStatsFn)>>,
}

impl std::fmt::Debug for CredentialCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCounts").finish_non_exhaustive()
    }
}

impl CredentialCounts {
    /// Called once, when the upstreams exist.
    pub fn set(&self, clusters: Vec<(String, CredentialStatsFn)>) {
        let _ = self.clusters.set(clusters);
    }
}

impl prometheus_client::collector::Collector for CredentialCounts {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        let Some(clusters) = self.clusters.get() else {
            return Ok(());
        };
        for (name, help, pick) in [
            (
                "credential_fetches",
                "Upstream token requests (on-behalf-of exchanges, Azure identity tokens) by cluster",
                (|s: &CredentialStats| s.fetches) as fn(&_) -> u64,
            ),
            (
                "credential_cache_hits",
                "Upstream tokens served from the cache by cluster",
                |s: &CredentialStats| s.cache_hits,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (cluster, creds) in clusters {
                let labels = ClusterLabels {
                    cluster: cluster.clone(),
                };
                ConstCounter::new(pick(&creds())).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// All relay metrics, registered once.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    pub longrunning: Family<LongRunningLabels, Gauge>,
    pub upstream_errors: Family<ReasonLabels, Counter>,
    pub authn: Family<AuthnLabels, Counter>,
    pub stream_bytes: Family<DirectionLabels, Counter>,
    pub ws_fallback: Family<DurationLabels, Counter>,
    pub jwks_refresh: Family<IssuerResultLabels, Counter>,
    pub denials: Family<ClusterLabels, Counter>,
    /// Requests from tokens with group overage, by issuer and how membership was known.
    pub group_overage: Family<IssuerResultLabels, Counter>,
    /// Calls to Microsoft Graph (`checkMemberGroups`), by issuer and result.
    pub graph_requests: Family<IssuerResultLabels, Counter>,
    pub audit_dropped: Counter,
    /// HTTP/1.1 requests refused for ambiguous framing before they were parsed.
    pub framing_refused: Counter,
    /// Streams ended because their client took none of their bytes for `timeouts.write_stall`.
    pub write_stalls: Counter,
    /// Requests sent again because the cluster refused them unprocessed (HTTP/2 GOAWAY).
    pub upstream_retries: Counter,
    pub reloads: Family<ResultLabels, Counter>,
    pub credentials: std::sync::Arc<CredentialCounts>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("relay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by cluster, verb and response code",
            requests.clone(),
        );
        let duration = Family::<DurationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Duration of requests that are not long-running (watch, follow and upgrades excluded)",
            duration.clone(),
        );
        let longrunning = Family::<LongRunningLabels, Gauge>::default();
        registry.register(
            "longrunning_requests",
            "Active long-running requests by protocol (watch, spdy, websocket, ws-spdy-tunnel)",
            longrunning.clone(),
        );
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by cluster and reason",
            upstream_errors.clone(),
        );
        let authn = Family::<AuthnLabels, Counter>::default();
        registry.register("authn", "Authentication results by reason", authn.clone());
        let stream_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "stream_bytes",
            "Bytes relayed through upgraded streams, by direction",
            stream_bytes.clone(),
        );
        let ws_fallback = Family::<DurationLabels, Counter>::default();
        registry.register(
            "ws_fallback",
            "Non-101 answers to WebSocket upgrades (kubectl then retries with SPDY)",
            ws_fallback.clone(),
        );
        let jwks_refresh = Family::<IssuerResultLabels, Counter>::default();
        registry.register(
            "jwks_refresh",
            "Signing-key fetches by issuer and result",
            jwks_refresh.clone(),
        );
        let denials = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "denials",
            "Authenticated requests denied by the access rules, by cluster",
            denials.clone(),
        );
        let group_overage = Family::<IssuerResultLabels, Counter>::default();
        registry.register(
            "group_overage",
            "Requests whose token could not list its groups, by issuer and result (cached, resolved through Graph, unresolved)",
            group_overage.clone(),
        );
        let graph_requests = Family::<IssuerResultLabels, Counter>::default();
        registry.register(
            "graph_requests",
            "Microsoft Graph checkMemberGroups calls by issuer and result (ok, throttled, error, transport_error, credential_error)",
            graph_requests.clone(),
        );
        let upstream_retries = Counter::default();
        registry.register(
            "upstream_retries",
            "Requests sent to a cluster again that it never processed: refused over HTTP/2 (GOAWAY or REFUSED_STREAM), or never written because their connection closed first (a GOAWAY, or a keep-alive HTTP/1.1 connection the cluster closed)",
            upstream_retries.clone(),
        );
        let framing_refused = Counter::default();
        registry.register(
            "framing_refused",
            "HTTP/1.1 requests refused for ambiguous framing (Content-Length with Transfer-Encoding, repeated framing fields, bare LF), before any parsing",
            framing_refused.clone(),
        );
        let write_stalls = Counter::default();
        registry.register(
            "write_stalls",
            "Watches, log follows and tunnels ended because the client took none of their bytes for timeouts.write_stall",
            write_stalls.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit records dropped because the writer could not keep up",
            audit_dropped.clone(),
        );
        let credentials = std::sync::Arc::new(CredentialCounts::default());
        registry.register_collector(Box::new(credentials.clone()));
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            reloads.clone(),
        );
        Self {
            registry,
            reloads,
            credentials,
            audit_dropped,
            framing_refused,
            write_stalls,
            upstream_retries,
            jwks_refresh,
            denials,
            group_overage,
            graph_requests,
            requests,
            duration,
            longrunning,
            upstream_errors,
            authn,
            stream_bytes,
            ws_fallback,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
