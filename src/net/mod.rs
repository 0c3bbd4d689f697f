//! The one outbound HTTPS stack. Everything the relay, the CLI, the portal and `doctor` send
//! over the network goes through here, so `doctor` checks the very trust and dialing the relay
//! uses, and a TLS setting changes in one place:
//!
//! - [`client_tls`]: every rustls client config (the process's one crypto provider, TLS 1.2
//!   and 1.3, the [`Trust`] asked for, an optional client certificate, ALPN).
//! - [`dial`]: TCP then TLS under one deadline, the address dialed apart from the name
//!   verified, and the pooled hyper client over it (HTTP/2 lanes).
//! - [`http1`]: the HTTP/1.1 keep-alive pool for short requests, driven by each request's task.
//! - [`idp`]: bounded JSON GET and form POST for identity providers and token endpoints.
//! - [`azure`]: the same stack as azure_core's HTTP transport.
//! - [`oidc_discovery_url`], [`entra_metadata`]: where an issuer's metadata lives.

pub mod azure;
pub mod dial;
pub mod http1;
pub mod idp;
pub mod readahead;

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ClientConfig;

pub use dial::{
    classify, empty_body, pooled_client, refused_unprocessed, DialError, PooledClient, SendError,
    TlsDialer, UpstreamBody, UpstreamConn, UpstreamFailure,
};
pub use http1::{Http1Body, Http1Pool};
pub use readahead::ReadAhead;

/// ALPN for clients that never need HTTP/2 (identity providers, upgrades).
pub const HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN for the pooled cluster clients: HTTP/2 when the server picks it.
pub const H2_OR_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Which certificate authorities a client trusts.
#[derive(Clone, Copy, Debug)]
pub enum Trust<'a> {
    /// Exactly these (a cluster's CA, an issuer's `ca_file`): no public roots.
    Only(&'a [CertificateDer<'static>]),
    /// The public web PKI compiled in (Mozilla's roots, never the platform store), plus these.
    PublicAnd(&'a [CertificateDer<'static>]),
}

impl<'a> Trust<'a> {
    /// An issuer's trust: its `ca_file` when set, else the public roots.
    pub fn ca_or_public(ca: &'a [CertificateDer<'static>]) -> Self {
        if ca.is_empty() {
            Self::PublicAnd(&[])
        } else {
            Self::Only(ca)
        }
    }
}

/// A client certificate the relay presents (`impersonate` with a client certificate).
pub type ClientCert<'a> = (&'a [CertificateDer<'static>], &'a PrivateKeyDer<'static>);

/// Builds a rustls client config.
pub fn client_tls(
    trust: Trust<'_>,
    client_cert: Option<ClientCert<'_>>,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut store = rustls::RootCertStore::empty();
    let extra = match trust {
        Trust::Only(roots) => roots,
        Trust::PublicAnd(extra) => {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            extra
        }
    };
    for cert in extra {
        store.add(cert.clone())?;
    }
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(store);
    let mut cfg = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain.to_vec(), key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// GETs a JSON document over `client`: 2xx only, at most `limit` bytes, within `timeout`.
/// Errors name the URL and never carry a body.
pub async fn get_json(
    client: &PooledClient,
    url: &str,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<serde_json::Value, String> {
    use http_body_util::{BodyExt as _, Limited};
    let work = async {
        let uri: ::http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let req = ::http::Request::get(uri)
            .header(::http::header::ACCEPT, "application/json")
            .body(empty_body())
            .map_err(|e| format!("{url}: {e}"))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("GET {url}: reading the body: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: invalid JSON: {e}"))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("GET {url}: timed out after {timeout:?}"))?
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

/// An OpenID issuer's configuration document (OpenID Connect Discovery §4).
pub fn oidc_discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// An Entra tenant's two metadata documents as `(iss, discovery URL)`: v1 tokens (the ones an
/// AKS server app receives) carry `https://sts.windows.net/<tenant>/`, v2 tokens
/// `<authority>/<tenant>/v2.0`, and each kind is verified with its own document's keys.
pub fn entra_metadata(authority_host: &str, tenant_id: &str) -> [(String, String); 2] {
    let host = authority_host.trim_end_matches('/');
    [
        (
            format!("https://sts.windows.net/{tenant_id}/"),
            format!("{host}/{tenant_id}/.well-known/openid-configuration"),
        ),
        (
            format!("{host}/{tenant_id}/v2.0"),
            format!("{host}/{tenant_id}/v2.0/.well-known/openid-configuration"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_urls() {
        assert_eq!(
            oidc_discovery_url("https://token.actions.githubusercontent.com/"),
            "https://token.actions.githubusercontent.com/.well-known/openid-configuration"
        );
        let [v1, v2] = entra_metadata("https://login.microsoftonline.com/", "t");
        assert_eq!(v1.0, "https://sts.windows.net/t/");
        assert_eq!(
            v1.1,
            "https://login.microsoftonline.com/t/.well-known/openid-configuration"
        );
        assert_eq!(v2.0, "https://login.microsoftonline.com/t/v2.0");
        assert_eq!(
            v2.1,
            "https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration"
        );
    }
}
