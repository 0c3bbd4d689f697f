//! `kube-relay doctor --config FILE`: checks, from where the relay runs, every path a request
//! takes, and prints one table row per check (README.md "Commands").
//!
//! Per cluster, in order — a failed step skips the steps that need it, never the others:
//! 1. `dns`: resolve the host the relay dials (`connect`, else the `server` host);
//! 2. `tcp`: connect to it;
//! 3. `tls`: handshake with exactly the relay's upstream TLS settings (the cluster CA only, the
//!    `server` host as the verified name, the client certificate if any), telling "unknown CA"
//!    apart from "certificate not valid for name X" — the two problems look alike in a 502;
//! 4. `credential`: the relay's own upstream credential (a token file still readable, a client
//!    certificate present, an Azure identity token acquired, or for on_behalf_of a
//!    client-credentials grant with the relay's client authentication), with Entra's error
//!    text when it fails; passthrough clusters use the caller's token, so there is none;
//! 5. `version`: `GET /version` over the same pooled client the relay uses ([`Upstream`]),
//!    with the relay's credential where it has one; anonymous for passthrough, where a 401/403
//!    still proves the HTTP path works.
//!
//! Per issuer: `discovery` (the document the relay fetches, and its `issuer` / `jwks_uri`),
//! `keys` (how many usable RS256/ES256 keys the JWKS holds) and, with `group_overage: {resolve:
//! graph}`, `graph` (one `checkMemberGroups` call with the relay's own Graph token).
//!
//! With `recording`: `store` (the recording directory takes a file, or the Blob container
//! answers a listing with the relay's own identity).
//!
//! Invariants: every check runs under [`Options::timeout`], so a black-holed address cannot
//! hang the command; nothing here prints secrets (token contents never appear in a row).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use rustls::{CertificateError, ClientConfig};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::Instant;
use url::Url;

use crate::config::{
    ClusterConfig, Config, IssuerConfig, IssuerKind, RelayCredential, UpstreamAuth,
};
use crate::net::{client_tls, error_chain, pooled_client, TlsDialer, Trust, H2_OR_HTTP1, HTTP1};
use crate::upstream::Upstream;

/// Largest `/version`, discovery or JWKS body read.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How the checks run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Upper bound for each single check (DNS, TCP, TLS, one HTTP request).
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
        }
    }
}

/// The result of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Fail,
    /// Not run (an earlier step failed) or not applicable; never a failure by itself.
    Skip,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Fail => "FAIL",
            Self::Skip => "skip",
        }
    }
}

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Check {
    /// `config`, `cluster/<name>` or `issuer/<name>`.
    pub target: String,
    /// `load`, `dns`, `tcp`, `tls`, `credential`, `version`, `discovery`, `keys`.
    pub check: &'static str,
    pub outcome: Outcome,
    pub detail: String,
}

/// Every check's result, in the order they were listed.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    fn push(
        &mut self,
        target: &str,
        check: &'static str,
        outcome: Outcome,
        detail: impl Into<String>,
    ) {
        self.checks.push(Check {
            target: target.to_owned(),
            check,
            outcome,
            detail: detail.into(),
        });
    }

    /// True when no check failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    /// The row for `target` / `check`, if there is one.
    pub fn find(&self, target: &str, check: &str) -> Option<&Check> {
        self.checks
            .iter()
            .find(|c| c.target == target && c.check == check)
    }

    /// The human-readable table, with a closing summary line.
    pub fn render(&self) -> String {
        let tw = self
            .checks
            .iter()
            .map(|c| c.target.len())
            .chain(["TARGET".len()])
            .max()
            .unwrap_or(0);
        let cw = self
            .checks
            .iter()
            .map(|c| c.check.len())
            .chain(["CHECK".len()])
            .max()
            .unwrap_or(0);
        let mut out = format!(
            "{:tw$}  {:cw$}  {:6}  DETAIL\n",
            "TARGET", "CHECK", "STATUS"
        );
        for c in &self.checks {
            out.push_str(&format!(
                "{:tw$}  {:cw$}  {:6}  {}\n",
                c.target,
                c.check,
                c.outcome.label(),
                c.detail
            ));
        }
        let count = |o: Outcome| self.checks.iter().filter(|c| c.outcome == o).count();
        out.push_str(&format!(
            "\n{} checks: {} ok, {} failed, {} skipped\n",
            self.checks.len(),
            count(Outcome::Ok),
            count(Outcome::Fail),
            count(Outcome::Skip)
        ));
        out
    }
}

/// Loads `path` with the relay's own loader and runs every check. A configuration that does not
/// load is itself the report: one failed `config` row per problem, with its key path.
pub async fn run_file(path: &Path, opts: &Options) -> Report {
    match crate::config::load(path) {
        Ok(cfg) => {
            let mut report = Report::default();
            report.push(
                "config",
                "load",
                Outcome::Ok,
                format!(
                    "{}: {} cluster(s), {} issuer(s)",
                    path.display(),
                    cfg.clusters.len(),
                    cfg.issuers.len()
                ),
            );
            // `serve` refuses a chain and key that do not pair; say so here too.
            match crate::tls::server_config(&cfg.tls) {
                Ok(_) => report.push(
                    "config",
                    "serving-cert",
                    Outcome::Ok,
                    "certificate and key pair up",
                ),
                Err(e) => report.push("config", "serving-cert", Outcome::Fail, format!("{e:#}")),
            }
            report.checks.extend(run(&cfg, opts).await.checks);
            report
        }
        Err(errs) => {
            let mut report = Report::default();
            for e in &errs.0 {
                report.push(
                    "config",
                    "load",
                    Outcome::Fail,
                    format!("{}: {e}", path.display()),
                );
            }
            report
        }
    }
}

/// Runs the cluster and issuer checks for a loaded configuration. Clusters and issuers are
/// checked concurrently (each bounded), rows come out in configuration order.
pub async fn run(cfg: &Config, opts: &Options) -> Report {
    let mut tasks = Vec::new();
    for cluster in &cfg.clusters {
        let (cluster, opts) = (cluster.clone(), opts.clone());
        tasks.push(tokio::spawn(
            async move { check_cluster(&cluster, &opts).await },
        ));
    }
    for issuer in &cfg.issuers {
        let (issuer, opts) = (issuer.clone(), opts.clone());
        tasks.push(tokio::spawn(
            async move { check_issuer(&issuer, &opts).await },
        ));
    }
    // Group overage through Graph: one call per issuer, with the relay's own resolver.
    if cfg.issuers.iter().any(|i| i.group_overage.is_some()) {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        match crate::groups::GroupResolver::new(cfg, &metrics) {
            Ok(resolver) => {
                let resolver = Arc::new(resolver);
                for issuer in cfg.issuers.iter().filter(|i| i.group_overage.is_some()) {
                    let (resolver, name, t) = (resolver.clone(), issuer.name.clone(), opts.timeout);
                    tasks.push(tokio::spawn(async move {
                        let mut r = Report::default();
                        let target = format!("issuer/{name}");
                        match bounded(t * 4, resolver.probe(&name)).await {
                            Ok(Some(Ok(detail))) => r.push(&target, "graph", Outcome::Ok, detail),
                            Ok(Some(Err(e))) | Err(e) => {
                                r.push(&target, "graph", Outcome::Fail, e);
                            }
                            Ok(None) => {}
                        }
                        r
                    }));
                }
            }
            Err(e) => {
                let mut r = Report::default();
                r.push("doctor", "graph", Outcome::Fail, format!("{e:#}"));
                tasks.push(tokio::spawn(async move { r }));
            }
        }
    }
    // Session recording: the store the relay writes to, with the relay's own identity.
    if let Some(rec) = &cfg.recording {
        let mut r = Report::default();
        match crate::recording::RecordingStore::new(&rec.store) {
            Ok(store) => match bounded(opts.timeout * 4, store.probe()).await {
                Ok(Ok(detail)) => r.push("recording", "store", Outcome::Ok, detail),
                Ok(Err(e)) => r.push("recording", "store", Outcome::Fail, e.to_string()),
                Err(e) => r.push("recording", "store", Outcome::Fail, e),
            },
            Err(e) => r.push("recording", "store", Outcome::Fail, format!("{e:#}")),
        }
        tasks.push(tokio::spawn(async move { r }));
    }
    let mut report = Report::default();
    for task in tasks {
        match task.await {
            Ok(r) => report.checks.extend(r.checks),
            // A panicking check is a bug, but the other rows are still worth printing.
            Err(e) => report.push(
                "doctor",
                "internal",
                Outcome::Fail,
                format!("a check panicked: {e}"),
            ),
        }
    }
    report
}

// === clusters ===

async fn check_cluster(cluster: &Arc<ClusterConfig>, opts: &Options) -> Report {
    let target = format!("cluster/{}", cluster.name);
    let mut report = Report::default();
    let t = opts.timeout;

    let addrs = match bounded(t, resolve(&cluster.dial)).await.and_then(|r| r) {
        Ok((addrs, detail)) => {
            report.push(&target, "dns", Outcome::Ok, detail);
            Some(addrs)
        }
        Err(e) => {
            report.push(&target, "dns", Outcome::Fail, e);
            None
        }
    };

    let tcp = match addrs {
        Some(addrs) => match bounded(t, connect(&addrs)).await.and_then(|r| r) {
            Ok((stream, detail)) => {
                report.push(&target, "tcp", Outcome::Ok, detail);
                Some(stream)
            }
            Err(e) => {
                report.push(&target, "tcp", Outcome::Fail, e);
                None
            }
        },
        None => {
            report.push(&target, "tcp", Outcome::Skip, "skipped: DNS failed");
            None
        }
    };

    let tls_ok = match tcp {
        Some(stream) => match bounded(t, handshake(cluster, stream)).await.and_then(|r| r) {
            Ok(detail) => {
                report.push(&target, "tls", Outcome::Ok, detail);
                true
            }
            Err(e) => {
                report.push(&target, "tls", Outcome::Fail, e);
                false
            }
        },
        None => {
            report.push(&target, "tls", Outcome::Skip, "skipped: no TCP connection");
            false
        }
    };

    let (outcome, detail, entra_header) = credential(cluster, t).await;
    let credential_ok = outcome != Outcome::Fail;
    report.push(&target, "credential", outcome, detail);

    if !tls_ok {
        report.push(
            &target,
            "version",
            Outcome::Skip,
            "skipped: no TLS connection",
        );
    } else if !credential_ok {
        report.push(
            &target,
            "version",
            Outcome::Skip,
            "skipped: credential unusable",
        );
    } else {
        match bounded(t, version(cluster, t, entra_header))
            .await
            .and_then(|r| r)
        {
            Ok((outcome, detail)) => report.push(&target, "version", outcome, detail),
            Err(e) => report.push(&target, "version", Outcome::Fail, e),
        }
    }
    report
}

/// Resolves `host:port`; an IP literal needs no lookup (the usual `connect: <private endpoint
/// IP>`).
async fn resolve(dial: &str) -> Result<(Vec<SocketAddr>, String), String> {
    if let Ok(addr) = dial.parse::<SocketAddr>() {
        return Ok((vec![addr], format!("{dial}: IP address, no lookup needed")));
    }
    let host = dial.rsplit_once(':').map_or(dial, |(h, _)| h);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(dial)
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    Ok((addrs, format!("{host} → {}", shown.join(", "))))
}

/// Connects to the first address that accepts.
async fn connect(addrs: &[SocketAddr]) -> Result<(TcpStream, String), String> {
    let start = Instant::now();
    let mut last = String::from("no address to connect to");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                return Ok((
                    s,
                    format!("connected to {addr} in {} ms", start.elapsed().as_millis()),
                ))
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// The relay's upstream TLS settings, on the connection the `tcp` step opened.
async fn handshake(cluster: &ClusterConfig, tcp: TcpStream) -> Result<String, String> {
    let cfg = crate::upstream::cluster_tls(cluster, H2_OR_HTTP1)
        .map_err(|e| format!("cannot build the TLS settings: {e:#}"))?;
    let name = cluster.server_name.clone();
    let shown = name.to_str().into_owned();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| explain_tls(&e, &shown))?;
    let conn = tls.get_ref().1;
    let version = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .map_or_else(|| "TLS".to_owned(), |v| v.replace('_', "."));
    let alpn = conn.alpn_protocol().map_or_else(
        || "no ALPN".to_owned(),
        |p| String::from_utf8_lossy(p).into_owned(),
    );
    Ok(format!(
        "certificate valid for {shown}, issued by the cluster CA ({version}, {alpn})"
    ))
}

/// Names the usual TLS failures in the words an operator searches for.
fn explain_tls(err: &std::io::Error, name: &str) -> String {
    let rustls_err = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_err {
        Some(rustls::Error::InvalidCertificate(c)) => {
            match c {
                CertificateError::UnknownIssuer => "unknown CA: the server's certificate is not \
                signed by the cluster's ca_file (wrong ca_file, or something else answers on \
                this address)"
                    .to_owned(),
                CertificateError::NotValidForName => {
                    format!("certificate not valid for name {name} (check the server URL's host)")
                }
                CertificateError::NotValidForNameContext { presented, .. } => {
                    format!(
                "certificate not valid for name {name}; it is valid for {} (check the server \
                 URL's host)",
                presented.iter().map(|n| tidy_name(n)).collect::<Vec<_>>().join(", ")
            )
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the server's certificate is not valid yet (check the clock)".to_owned()
                }
                other => format!("invalid server certificate: {other:?}"),
            }
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {err}"),
    }
}

/// rustls lists the certificate's names in Debug form (`DnsName("a.b")`, `IpAddress(1.2.3.4)`);
/// an operator wants the bare names.
fn tidy_name(n: &str) -> &str {
    n.strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| {
            n.strip_prefix("IpAddress(")
                .and_then(|r| r.strip_suffix(')'))
        })
        .unwrap_or(n)
}

/// The relay's own upstream credential: a token file still readable, a client certificate
/// present, or, for Azure identities and on_behalf_of, a token actually acquired from Entra
/// (its error text shown when it fails). Returns the Azure identity's header for `/version`.
async fn credential(
    cluster: &Arc<ClusterConfig>,
    timeout: Duration,
) -> (Outcome, String, Option<http::HeaderValue>) {
    match &cluster.upstream_auth {
        UpstreamAuth::Passthrough => (
            Outcome::Ok,
            "passthrough: uses the caller's token (the relay holds no credential)".to_owned(),
            None,
        ),
        UpstreamAuth::Impersonate(RelayCredential::TokenFile { path, .. }) => {
            // Read again: the file may have been rotated or removed since the config loaded.
            let (outcome, detail) = match std::fs::read_to_string(path) {
                Ok(s) if !s.trim().is_empty() => (
                    Outcome::Ok,
                    format!("impersonate: token file {} readable", path.display()),
                ),
                Ok(_) => (
                    Outcome::Fail,
                    format!("impersonate: token file {} is empty", path.display()),
                ),
                Err(e) => (
                    Outcome::Fail,
                    format!("impersonate: cannot read token file {}: {e}", path.display()),
                ),
            };
            (outcome, detail, None)
        }
        UpstreamAuth::Impersonate(RelayCredential::ClientCert { chain, .. }) => (
            Outcome::Ok,
            format!(
                "impersonate: client certificate ({} certificate(s) in the chain), presented in TLS",
                chain.len()
            ),
            None,
        ),
        UpstreamAuth::Impersonate(RelayCredential::Azure(_)) | UpstreamAuth::OnBehalfOf(_) => {
            // The relay's own credentials, exactly as the request path builds them.
            let upstream = match Upstream::new(cluster.clone(), timeout, Default::default()) {
                Ok(u) => u,
                Err(e) => return (Outcome::Fail, format!("{e:#}"), None),
            };
            // Entra calls carry their own bound; this one keeps doctor's promise per check.
            let checked = bounded(timeout * 4, upstream.credentials.self_check()).await;
            match checked {
                Ok(Some(Ok((detail, header)))) => (Outcome::Ok, detail, header),
                Ok(Some(Err(e))) if e.needs_a_caller() => (Outcome::Skip, e.to_string(), None),
                // The resource app requires role assignment for app-only tokens: that says
                // nothing about the on-behalf-of exchange, which carries the user's access.
                Ok(Some(Err(e)))
                    if matches!(cluster.upstream_auth, UpstreamAuth::OnBehalfOf(_))
                        && e.to_string().contains("AADSTS501051") =>
                {
                    (Outcome::Skip, e.to_string(), None)
                }
                Ok(Some(Err(e))) => (Outcome::Fail, e.to_string(), None),
                Ok(None) => (Outcome::Skip, "no Entra credential".to_owned(), None),
                Err(e) => (Outcome::Fail, e, None),
            }
        }
    }
}

/// `GET /version` through the relay's own upstream client for this cluster.
async fn version(
    cluster: &Arc<ClusterConfig>,
    timeout: Duration,
    entra_header: Option<http::HeaderValue>,
) -> Result<(Outcome, String), String> {
    let upstream = Upstream::new(cluster.clone(), timeout, Default::default())
        .map_err(|e| format!("{e:#}"))?;
    let uri = upstream.uri("/version").map_err(|e| e.to_string())?;
    let mut req = http::Request::get(uri).header(http::header::ACCEPT, "application/json");
    let with_token = match &cluster.upstream_auth {
        UpstreamAuth::Impersonate(RelayCredential::TokenFile { path, token }) => {
            // The file as it is now (the relay re-reads it on rotation), else the loaded one.
            let current = std::fs::read_to_string(path).unwrap_or_else(|_| token.clone());
            let value = http::HeaderValue::try_from(format!("Bearer {}", current.trim())).map_err(
                |_| {
                    format!(
                        "token file {} holds bytes not allowed in a header",
                        path.display()
                    )
                },
            )?;
            req = req.header(http::header::AUTHORIZATION, value);
            "with the relay's token"
        }
        UpstreamAuth::Impersonate(RelayCredential::ClientCert { .. }) => {
            "with the relay's client certificate"
        }
        UpstreamAuth::Passthrough => "anonymously (passthrough: no relay credential)",
        UpstreamAuth::Impersonate(RelayCredential::Azure(_)) => match entra_header {
            Some(h) => {
                req = req.header(http::header::AUTHORIZATION, h);
                "with the relay's Azure identity token"
            }
            None => "anonymously (no Azure identity token)",
        },
        UpstreamAuth::OnBehalfOf(_) => "anonymously (on_behalf_of: the token is a caller's)",
    };
    let req = req
        .body(crate::net::empty_body())
        .map_err(|e| e.to_string())?;
    let pick = upstream.client.pick(false);
    let resp = upstream
        .client
        .send(&pick, req)
        .await
        .map_err(|e| format!("GET /version: {}", error_chain(&e)))?;
    let status = resp.status();
    let body = read_json(resp).await;
    if status.is_success() {
        let body = body.map_err(|e| format!("GET /version: {e}"))?;
        let git = body
            .get("gitVersion")
            .and_then(Value::as_str)
            .ok_or("GET /version: the answer has no gitVersion")?;
        return Ok((Outcome::Ok, format!("{git} ({with_token})")));
    }
    let anonymous = !matches!(
        cluster.upstream_auth,
        UpstreamAuth::Impersonate(
            RelayCredential::TokenFile { .. }
                | RelayCredential::ClientCert { .. }
                | RelayCredential::Azure(_)
        )
    );
    if anonymous
        && (status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN)
    {
        // The API server answered over HTTP: the path works; only a caller's token can do more.
        return Ok((
            Outcome::Skip,
            format!(
                "HTTP {} {with_token}: server reachable; a caller's token is needed for more",
                status.as_u16()
            ),
        ));
    }
    Err(format!(
        "GET /version {with_token}: HTTP {}{}",
        status.as_u16(),
        if status == http::StatusCode::UNAUTHORIZED {
            " (the cluster rejects the relay's credential)"
        } else {
            ""
        }
    ))
}

// === issuers ===

async fn check_issuer(issuer: &Arc<IssuerConfig>, opts: &Options) -> Report {
    let target = format!("issuer/{}", issuer.name);
    let mut report = Report::default();
    let t = opts.timeout;
    let (discovery_url, expected_iss) = match &issuer.kind {
        IssuerKind::Oidc {
            issuer, issuer_str, ..
        } => (
            crate::net::oidc_discovery_url(issuer.as_str()),
            Some(issuer_str.clone()),
        ),
        // The relay accepts the tenant's v1 and v2 issuers; discovery names v2 only.
        IssuerKind::Entra {
            tenant_id,
            authority_host,
            ..
        } => {
            let [_, (_, v2)] = crate::net::entra_metadata(authority_host.as_str(), tenant_id);
            (v2, None)
        }
    };
    let client = match issuer_tls(issuer) {
        Ok(tls) => pooled_client(TlsDialer::new(tls, None, None, t)),
        Err(e) => {
            report.push(
                &target,
                "discovery",
                Outcome::Fail,
                format!("cannot build the TLS settings: {e:#}"),
            );
            report.push(&target, "keys", Outcome::Skip, "skipped: discovery failed");
            return report;
        }
    };

    let jwks_url = match bounded(t, fetch_json(&client, &discovery_url))
        .await
        .and_then(|r| r)
    {
        Ok(doc) => {
            let iss = doc
                .get("issuer")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let jwks_uri = doc.get("jwks_uri").and_then(Value::as_str);
            match (expected_iss, jwks_uri.map(Url::parse)) {
                (Some(want), _) if want != iss => {
                    report.push(
                        &target,
                        "discovery",
                        Outcome::Fail,
                        format!("{discovery_url} names issuer {iss:?}, the config says {want:?}"),
                    );
                    None
                }
                (_, Some(Ok(u))) if u.scheme() == "https" => {
                    report.push(
                        &target,
                        "discovery",
                        Outcome::Ok,
                        format!("{discovery_url}: issuer {iss}"),
                    );
                    Some(u)
                }
                (_, Some(_)) => {
                    report.push(
                        &target,
                        "discovery",
                        Outcome::Fail,
                        format!("{discovery_url}: jwks_uri is not an https URL"),
                    );
                    None
                }
                (_, None) => {
                    report.push(
                        &target,
                        "discovery",
                        Outcome::Fail,
                        format!("{discovery_url}: no jwks_uri"),
                    );
                    None
                }
            }
        }
        Err(e) => {
            report.push(&target, "discovery", Outcome::Fail, e);
            None
        }
    };

    let Some(jwks_url) = jwks_url else {
        report.push(&target, "keys", Outcome::Skip, "skipped: discovery failed");
        return report;
    };
    match bounded(t, fetch_json(&client, jwks_url.as_str()))
        .await
        .and_then(|r| r)
    {
        Ok(doc) => match serde_json::from_value::<JwkSet>(doc) {
            Ok(set) => {
                let usable = set
                    .keys
                    .iter()
                    .filter(|k| k.common.key_id.is_some())
                    .filter(|k| match &k.algorithm {
                        AlgorithmParameters::RSA(_) => true,
                        AlgorithmParameters::EllipticCurve(p) => p.curve == EllipticCurve::P256,
                        _ => false,
                    })
                    .count();
                let outcome = if usable > 0 {
                    Outcome::Ok
                } else {
                    Outcome::Fail
                };
                report.push(
                    &target,
                    "keys",
                    outcome,
                    format!(
                        "{usable} usable RS256/ES256 key(s) of {} at {jwks_url}",
                        set.keys.len()
                    ),
                );
            }
            Err(e) => report.push(
                &target,
                "keys",
                Outcome::Fail,
                format!("{jwks_url}: not a JWKS: {e}"),
            ),
        },
        Err(e) => report.push(&target, "keys", Outcome::Fail, e),
    }
    report
}

/// The trust the relay uses for an issuer, from the relay's own code.
fn issuer_tls(issuer: &IssuerConfig) -> anyhow::Result<Arc<ClientConfig>> {
    client_tls(Trust::ca_or_public(&issuer.ca), None, HTTP1)
}

async fn fetch_json(client: &crate::net::PooledClient, url: &str) -> Result<Value, String> {
    // `bounded` applies the per-check deadline around this call; the inner one only matches it.
    crate::net::get_json(client, url, MAX_BODY_BYTES, Duration::from_secs(3600)).await
}

// === helpers ===

async fn read_json<B>(resp: http::Response<B>) -> Result<Value, String>
where
    B: hyper::body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("invalid JSON: {e}"))
}

/// Runs `fut` under the per-check deadline.
async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("timed out after {}", humantime::format_duration(limit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_need_no_lookup() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (addrs, detail) = rt.block_on(resolve("10.20.0.4:443")).expect("resolves");
        assert_eq!(
            addrs,
            vec!["10.20.0.4:443".parse::<SocketAddr>().expect("addr")]
        );
        assert!(detail.contains("no lookup"), "{detail}");
        let (addrs, _) = rt.block_on(resolve("[::1]:6443")).expect("resolves");
        assert_eq!(
            addrs[0].ip(),
            "::1".parse::<std::net::IpAddr>().expect("ip")
        );
    }

    #[test]
    fn certificate_names_are_shown_bare() {
        assert_eq!(tidy_name("DnsName(\"a.example\")"), "a.example");
        assert_eq!(tidy_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(tidy_name("other"), "other");
    }

    #[test]
    fn report_fails_on_any_failure_and_renders_a_table() {
        let mut r = Report::default();
        r.push("cluster/a", "dns", Outcome::Ok, "fine");
        r.push("cluster/a", "version", Outcome::Skip, "skipped");
        assert!(r.passed());
        r.push("issuer/x", "keys", Outcome::Fail, "none");
        assert!(!r.passed());
        let text = r.render();
        assert!(text.starts_with("TARGET"), "{text}");
        assert!(text.contains("issuer/x   keys     FAIL    none"), "{text}");
        assert!(
            text.contains("3 checks: 1 ok, 1 failed, 1 skipped"),
            "{text}"
        );
    }
}
