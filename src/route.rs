//! Routing: which cluster a request is for (docs/architecture.md "Routing"). Pure: no I/O, no
//! allocation beyond the
//! result, fuzzed and property-tested.
//!
//! Three inputs can name a cluster: the TLS SNI (`<cluster>.<host_suffix>`), the Host header or
//! `:authority`, and the path (`<path_prefix>/<cluster>/<rest>`). SNI and path *select*; Host only
//! has to agree. Whenever two of them name clusters they must name the same one, else 421, so
//! authorization and forwarding can never follow different keys (domain fronting, h2 connection
//! coalescing). The cluster path segment is decoded once and must match the name pattern exactly;
//! anything else is refused rather than normalised into another cluster.
//!
//! Invariants:
//! - `Route::Cluster.upstream_path` is the request-target suffix byte for byte (query included).
//! - Never panics on any input.

use crate::config::{is_cluster_name, Routing};

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// A relay page or API under `/-/` on the public host; never forwarded.
    Relay { path: &'a str },
    /// A cluster, and the request-target to send it (path and query, exactly as received).
    Cluster {
        cluster: String,
        upstream_target: UpstreamTarget<'a>,
    },
}

/// The request-target the upstream receives.
#[derive(Debug, PartialEq, Eq)]
pub enum UpstreamTarget<'a> {
    /// The whole original request-target (routing by SNI only).
    Whole(&'a str),
    /// The suffix after `<path_prefix>/<cluster>`; empty means `/`.
    Suffix(&'a str),
}

impl UpstreamTarget<'_> {
    /// The path-and-query to send, starting with `/`.
    pub fn to_path_and_query(&self) -> String {
        match self {
            Self::Whole(t) => (*t).to_owned(),
            Self::Suffix("") => "/".to_owned(),
            Self::Suffix(s) if s.starts_with('?') => format!("/{s}"),
            Self::Suffix(s) => (*s).to_owned(),
        }
    }
}

/// Why a request could not be routed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("the request names cluster `{a}` and cluster `{b}`: use one connection per cluster")]
    Misdirected { a: String, b: String },
    #[error("the request's host names cluster `{0}` but the connection was made for another name")]
    HostMismatch(String),
    #[error("no cluster named: use {0}/<cluster>/… or the host <cluster>.<suffix>")]
    NoCluster(String),
}

/// The routing inputs of one request.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// SNI from the TLS handshake (rustls gives it lower-cased).
    pub sni: Option<&'a str>,
    /// Host header or `:authority` (both, when an h1 absolute-form target carried one).
    pub hosts: [Option<&'a str>; 2],
    /// The request-target's path and query, raw.
    pub target: &'a str,
}

/// Resolves a request to a route.
pub fn resolve<'a>(
    routing: &Routing,
    public_host: &str,
    input: RouteInput<'a>,
) -> Result<Route<'a>, RouteError> {
    let target = input.target;
    if !target.starts_with('/') {
        return Err(RouteError::BadRequest(
            "the request-target must be an absolute path",
        ));
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    check_path(path)?;

    let sni_cluster = input
        .sni
        .and_then(|s| host_cluster(routing, public_host, s).transpose())
        .transpose()?;
    let mut host_clusters: [Option<String>; 2] = [None, None];
    for (slot, host) in host_clusters.iter_mut().zip(input.hosts) {
        if let Some(h) = host {
            *slot = host_cluster(routing, public_host, strip_port(h)?)?;
        }
    }

    if path == "/-" || path.starts_with("/-/") {
        // Relay pages live on the public host only: a connection or Host naming a cluster
        // cannot reach them (or be confused with the cluster's own `/-/` paths).
        if let Some(c) = sni_cluster
            .iter()
            .chain(host_clusters.iter().flatten())
            .next()
        {
            return Err(RouteError::HostMismatch(c.clone()));
        }
        return Ok(Route::Relay { path });
    }

    let path_route = path_cluster(&routing.path_prefix, target)?;

    let selected = match (&sni_cluster, &path_route) {
        (Some(a), Some((b, _))) if a != b => {
            return Err(RouteError::Misdirected {
                a: a.clone(),
                b: b.clone(),
            })
        }
        (Some(a), _) => Some(a.clone()),
        (None, Some((b, _))) => Some(b.clone()),
        (None, None) => None,
    };
    for h in host_clusters.iter().flatten() {
        match &selected {
            Some(s) if s == h => {}
            Some(s) => {
                return Err(RouteError::Misdirected {
                    a: s.clone(),
                    b: h.clone(),
                })
            }
            None => return Err(RouteError::HostMismatch(h.clone())),
        }
    }
    match (selected, path_route) {
        (Some(cluster), Some((_, suffix))) => Ok(Route::Cluster {
            cluster,
            upstream_target: UpstreamTarget::Suffix(suffix),
        }),
        (Some(cluster), None) => Ok(Route::Cluster {
            cluster,
            upstream_target: UpstreamTarget::Whole(target),
        }),
        // The portal: `/` on a request that names no cluster anywhere (the public host).
        (None, None) if path == "/" => Ok(Route::Relay { path: "/" }),
        (None, _) => Err(RouteError::NoCluster(routing.path_prefix.clone())),
    }
}

/// Refuses dot segments and encoded separators anywhere in the path: kubectl never sends them,
/// and a path the relay reads differently from the API server is how authorization and
/// forwarding drift apart.
fn check_path(path: &str) -> Result<(), RouteError> {
    for seg in path.split('/') {
        let lower = seg.to_ascii_lowercase();
        if seg == "."
            || seg == ".."
            || lower == "%2e"
            || lower == "%2e%2e"
            || lower == ".%2e"
            || lower == "%2e."
        {
            return Err(RouteError::BadRequest(
                "dot segments are not allowed in the path",
            ));
        }
    }
    if path.contains('\\') {
        return Err(RouteError::BadRequest(
            "backslashes are not allowed in the path",
        ));
    }
    Ok(())
}

/// The cluster a host name (SNI or Host, port stripped) names, if any.
fn host_cluster(
    routing: &Routing,
    public_host: &str,
    host: &str,
) -> Result<Option<String>, RouteError> {
    if !host.is_ascii() {
        // Hosts arrive ASCII on the wire (IDNs as punycode); anything else is malformed, and
        // byte offsets below assume ASCII.
        return Err(RouteError::BadRequest(
            "host names must be ASCII (punycode for IDNs)",
        ));
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(None);
    }
    if host.eq_ignore_ascii_case(public_host) {
        return Ok(None);
    }
    let Some(suffix) = &routing.host_suffix else {
        return Ok(None);
    };
    if host.len() <= suffix.len() + 1 {
        return Ok(None);
    }
    let split = host.len() - suffix.len();
    let (label, rest) = host.split_at(split);
    let Some(label) = label.strip_suffix('.') else {
        return Ok(None);
    };
    if !rest.eq_ignore_ascii_case(suffix) {
        return Ok(None);
    }
    let label = label.to_ascii_lowercase();
    if is_cluster_name(&label) {
        Ok(Some(label))
    } else {
        // Under our suffix but not a cluster name (`a.b.<suffix>`, `_x.<suffix>`): never
        // fall back to a default cluster.
        Err(RouteError::BadRequest(
            "the host under the relay's suffix is not a valid cluster name",
        ))
    }
}

fn strip_port(host: &str) -> Result<&str, RouteError> {
    if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: names no cluster; keep the brackets so the caller sees a literal.
        return match rest.find(']') {
            Some(_) => Ok(host),
            None => Err(RouteError::BadRequest("malformed Host header")),
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => Ok(h),
        Some(_) => Err(RouteError::BadRequest("malformed Host header")),
        None => Ok(host),
    }
}

/// Parses `<prefix>/<cluster><suffix>` from the raw request-target.
fn path_cluster<'a>(
    prefix: &str,
    target: &'a str,
) -> Result<Option<(String, &'a str)>, RouteError> {
    let Some(after) = target.strip_prefix(prefix) else {
        return Ok(None);
    };
    let rest = match after.as_bytes().first() {
        Some(b'/') => &after[1..],
        // `/clusters` alone or `/clusters?x`: the prefix names no cluster.
        None | Some(b'?') => {
            return Err(RouteError::BadRequest(
                "the path names no cluster after the prefix",
            ))
        }
        // `/clustersX`: a different path altogether.
        _ => return Ok(None),
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (raw, suffix) = rest.split_at(end);
    if raw.is_empty() {
        return Err(RouteError::BadRequest("empty cluster segment in the path"));
    }
    let decoded = decode_once(raw)?;
    if !is_cluster_name(&decoded) {
        return Err(RouteError::BadRequest(
            "the cluster segment is not a valid cluster name (lower-case letters, digits, `-`)",
        ));
    }
    Ok(Some((decoded, suffix)))
}

/// Percent-decodes exactly once. The result is only accepted if it is a plain cluster name, so
/// `%2F`, `%5C`, `%2E`, `%25…` and `;` all end as 400.
fn decode_once(raw: &str) -> Result<String, RouteError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(RouteError::BadRequest("bad percent-encoding"))?;
            let s = std::str::from_utf8(hex)
                .map_err(|_| RouteError::BadRequest("bad percent-encoding"))?;
            let v = u8::from_str_radix(s, 16)
                .map_err(|_| RouteError::BadRequest("bad percent-encoding"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| RouteError::BadRequest("bad percent-encoding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing() -> Routing {
        Routing {
            host_suffix: Some("relay.example.com".into()),
            path_prefix: "/clusters".into(),
        }
    }

    fn go(
        sni: Option<&'static str>,
        host: Option<&'static str>,
        target: &str,
    ) -> Result<Route<'static>, RouteError> {
        let target: &'static str = Box::leak(target.to_owned().into_boxed_str());
        resolve(
            &routing(),
            "relay.example.com",
            RouteInput {
                sni,
                hosts: [host, None],
                target,
            },
        )
    }

    fn cluster(r: Result<Route<'_>, RouteError>) -> (String, String) {
        match r {
            Ok(Route::Cluster {
                cluster,
                upstream_target,
            }) => (cluster, upstream_target.to_path_and_query()),
            other => panic!("expected a cluster route, got {other:?}"),
        }
    }

    #[test]
    fn path_routing_strips_prefix_and_keeps_query_bytes() {
        assert_eq!(
            cluster(go(
                None,
                Some("relay.example.com"),
                "/clusters/alpha/api/v1/pods?limit=500&labelSelector=a%3Db"
            )),
            (
                "alpha".into(),
                "/api/v1/pods?limit=500&labelSelector=a%3Db".into()
            )
        );
        assert_eq!(
            cluster(go(None, None, "/clusters/alpha")),
            ("alpha".into(), "/".into())
        );
        assert_eq!(
            cluster(go(None, None, "/clusters/alpha?x=1")),
            ("alpha".into(), "/?x=1".into())
        );
        assert_eq!(
            cluster(go(None, None, "/clusters/alpha/")),
            ("alpha".into(), "/".into())
        );
    }

    #[test]
    fn sni_routing_forwards_whole_target() {
        assert_eq!(
            cluster(go(
                Some("alpha.relay.example.com"),
                Some("alpha.relay.example.com:443"),
                "/api?x"
            )),
            ("alpha".into(), "/api?x".into())
        );
        // An IP literal or the public host as Host names no cluster.
        assert_eq!(
            cluster(go(
                Some("alpha.relay.example.com"),
                Some("127.0.0.1:8443"),
                "/api"
            ))
            .0,
            "alpha"
        );
        assert_eq!(
            cluster(go(
                Some("alpha.relay.example.com"),
                Some("relay.example.com"),
                "/api"
            ))
            .0,
            "alpha"
        );
        assert_eq!(
            cluster(go(
                Some("alpha.relay.example.com"),
                Some("[::1]:8443"),
                "/api"
            ))
            .0,
            "alpha"
        );
        // Trailing dot and case are normalised.
        assert_eq!(
            cluster(go(
                Some("alpha.relay.example.com"),
                Some("ALPHA.Relay.Example.Com.:443"),
                "/api"
            ))
            .0,
            "alpha"
        );
    }

    #[test]
    fn sni_and_path_agreeing_strip_the_prefix() {
        assert_eq!(
            cluster(go(
                Some("alpha.relay.example.com"),
                None,
                "/clusters/alpha/api"
            )),
            ("alpha".into(), "/api".into())
        );
    }

    #[test]
    fn disagreement_is_misdirected() {
        assert!(matches!(
            go(Some("alpha.relay.example.com"), None, "/clusters/beta/api"),
            Err(RouteError::Misdirected { .. })
        ));
        assert!(matches!(
            go(
                Some("alpha.relay.example.com"),
                Some("beta.relay.example.com"),
                "/api"
            ),
            Err(RouteError::Misdirected { .. })
        ));
        assert!(matches!(
            go(None, Some("beta.relay.example.com"), "/clusters/alpha/api"),
            Err(RouteError::Misdirected { .. })
        ));
        // Host naming a cluster on a connection that named none.
        assert!(matches!(
            go(
                Some("relay.example.com"),
                Some("beta.relay.example.com"),
                "/api"
            ),
            Err(RouteError::HostMismatch(_))
        ));
    }

    #[test]
    fn nothing_named_is_no_cluster() {
        assert!(matches!(
            go(None, Some("relay.example.com"), "/api/v1"),
            Err(RouteError::NoCluster(_))
        ));
        assert!(matches!(
            go(Some("other.example.org"), None, "/api/v1"),
            Err(RouteError::NoCluster(_))
        ));
        // `/clustersx` is not the prefix.
        assert!(matches!(
            go(None, None, "/clustersx/alpha"),
            Err(RouteError::NoCluster(_))
        ));
        // A double slash is not the prefix either, and names nothing.
        assert!(matches!(
            go(None, None, "//clusters/beta/api"),
            Err(RouteError::NoCluster(_))
        ));
    }

    #[test]
    fn relay_pages_are_reserved() {
        assert_eq!(
            go(None, Some("relay.example.com"), "/-/clusters"),
            Ok(Route::Relay {
                path: "/-/clusters"
            })
        );
        assert!(go(Some("alpha.relay.example.com"), None, "/-/clusters").is_err());
        // The portal is `/` on the public host; `/` on a cluster's host is that cluster's root.
        assert_eq!(
            go(None, Some("relay.example.com"), "/?x=1"),
            Ok(Route::Relay { path: "/" })
        );
        assert!(matches!(
            go(Some("alpha.relay.example.com"), None, "/"),
            Ok(Route::Cluster { .. })
        ));
    }

    #[test]
    fn strict_segments() {
        for bad in [
            "/clusters/",
            "/clusters//api",
            "/clusters",
            "/clusters?x",
            "/clusters/Alpha/api",
            "/clusters/alpha%2Fbeta/api",
            "/clusters/alpha%2fbeta/api",
            "/clusters/alpha%5Cbeta/api",
            "/clusters/alpha%252Fbeta/api",
            "/clusters/..%2Fbeta/api",
            "/clusters/../beta/api",
            "/clusters/./alpha/api",
            "/clusters/alpha/../beta/api",
            "/clusters/alpha/%2e%2e/beta",
            "/clusters/alpha;x=y/api",
            "/clusters/alpha%3Bx/api",
            "/clusters/al%pha/api",
            "/clusters/alpha\\beta",
            "/clusters/-alpha/api",
            "/clusters/alpha#x/api",
            "/clusters/a.b/api",
        ] {
            assert!(
                matches!(go(None, None, bad), Err(RouteError::BadRequest(_))),
                "{bad} should be rejected, got {:?}",
                go(None, None, bad)
            );
        }
        // Decoded exactly once: an encoded plain letter is still that cluster.
        assert_eq!(cluster(go(None, None, "/clusters/%61lpha/api")).0, "alpha");
    }

    #[test]
    fn odd_snis() {
        assert!(matches!(
            go(Some("a.b.relay.example.com"), None, "/api"),
            Err(RouteError::BadRequest(_))
        ));
        assert!(matches!(
            go(Some("-x.relay.example.com"), None, "/api"),
            Err(RouteError::BadRequest(_))
        ));
        assert!(matches!(
            go(Some("relay.example.com"), None, "/api"),
            Err(RouteError::NoCluster(_))
        ));
        // Non-ASCII never panics and never routes.
        assert!(go(Some("ééééééééééééééééé.x"), None, "/api").is_err());
        assert!(go(None, Some("é.relay.example.com"), "/api").is_err());
        let long: &'static str =
            Box::leak(format!("{}.relay.example.com", "a".repeat(64)).into_boxed_str());
        assert!(go(Some(long), None, "/api").is_err());
        assert!(go(None, None, "api").is_err());
    }
}
