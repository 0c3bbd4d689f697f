//! HTTP to an identity provider, shared by `kube-relay token`, `kube-relay kubeconfig` and the
//! portal's code exchange: our hyper + rustls stack (no second TLS stack), webpki roots plus an
//! optional private CA, bounded in time and size, and usable as oauth2's async HTTP client.

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{
    client_tls, error_chain, pooled_client, PooledClient, TlsDialer, Trust, UpstreamBody, HTTP1,
};

/// Identity provider answers are small JSON documents; anything bigger is refused.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One request (connect, send, read the whole answer) never takes longer than this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a request to the identity provider failed (no secrets in the text).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Transport(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// An HTTPS client for identity providers; `http://` only for loopback hosts (test doubles and
/// the managed identity endpoint), never for a remote authority.
#[derive(Clone)]
pub struct IdpHttp {
    https: PooledClient,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        UpstreamBody,
    >,
}

impl std::fmt::Debug for IdpHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdpHttp").finish_non_exhaustive()
    }
}

impl IdpHttp {
    /// Trusts the public web PKI plus `extra_ca` (an IdP on a private CA, e.g. in tests).
    pub fn new(extra_ca: &[CertificateDer<'static>]) -> anyhow::Result<Self> {
        let cfg = client_tls(Trust::PublicAnd(extra_ca), None, HTTP1)
            .context("adding the identity provider CA")?;
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // As the TLS dialer does: a request must not wait on Nagle for the peer's ACK.
        connector.set_nodelay(true);
        Ok(Self {
            https: pooled_client(TlsDialer::new(cfg, None, None, CONNECT_TIMEOUT)),
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector),
        })
    }

    /// Sends one request and reads the whole (bounded) answer.
    pub async fn send(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, HttpError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.send_unbounded(req))
            .await
            .map_err(|_| HttpError::Timeout(REQUEST_TIMEOUT))?
    }

    async fn send_unbounded(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, HttpError> {
        let (parts, body) = req.into_parts();
        let host = parts.uri.host().unwrap_or_default().to_owned();
        let req = Request::from_parts(
            parts,
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        let sent = match req.uri().scheme_str() {
            Some("https") => self.https.request(req).await,
            Some("http") if is_loopback(&host) => self.http.request(req).await,
            Some("http") => {
                return Err(HttpError::Transport(format!(
                    "refusing plain http to {host}: identity providers must use https"
                )))
            }
            s => {
                return Err(HttpError::Transport(format!(
                    "unsupported URL scheme {s:?}"
                )))
            }
        };
        let resp =
            sent.map_err(|e| HttpError::Transport(format!("{host}: {}", error_chain(&e))))?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| HttpError::Transport(format!("{host}: reading the answer: {e}")))?
            .to_bytes();
        Ok(http::Response::from_parts(parts, bytes.to_vec()))
    }

    /// GET a JSON document; non-2xx is an error naming the status.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> anyhow::Result<T> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(header::ACCEPT, "application/json")
            .body(Vec::new())?;
        let resp = self.send(req).await.with_context(|| format!("GET {url}"))?;
        if resp.status() != StatusCode::OK {
            anyhow::bail!("GET {url}: HTTP {}", resp.status());
        }
        serde_json::from_slice(resp.body())
            .with_context(|| format!("GET {url}: not the JSON expected"))
    }

    /// POST a form (token endpoints); returns the status and body for the caller to classify.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        bearer: Option<&str>,
    ) -> Result<(StatusCode, Vec<u8>), HttpError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(
                header::CONTENT_TYPE,
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .header(header::ACCEPT, "application/json");
        if let Some(t) = bearer {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = b
            .body(body.into_bytes())
            .map_err(|e| HttpError::Transport(format!("building the request: {e}")))?;
        let resp = self.send(req).await?;
        Ok((resp.status(), resp.into_body()))
    }

    /// This client as oauth2's async HTTP client: `client.exchange_code(..).request_async(&idp.oauth2())`.
    pub fn oauth2(
        &self,
    ) -> impl Fn(
        oauth2::HttpRequest,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send>,
    > + '_ {
        move |req| {
            let this = self.clone();
            Box::pin(async move { this.send(req).await })
        }
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The parts of an OpenID Provider's configuration document the relay and its CLI use.
#[derive(Clone, Debug, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: String,
    pub device_authorization_endpoint: Option<String>,
    pub end_session_endpoint: Option<String>,
}

/// Fetches and checks an OpenID configuration document. With `expected_issuer`, the document's
/// `issuer` must be that URL (OpenID Connect Discovery §4.3: a document naming another issuer
/// is not the one asked for; trailing `/` ignored).
pub async fn discover(
    http: &IdpHttp,
    discovery_url: &str,
    expected_issuer: Option<&str>,
) -> anyhow::Result<Discovery> {
    let mut d: Discovery = http.get_json(discovery_url).await?;
    if let Some(want) = expected_issuer {
        if d.issuer.trim_end_matches('/') != want.trim_end_matches('/') {
            anyhow::bail!(
                "{discovery_url}: the document names issuer {:?}, expected {want:?}",
                d.issuer
            );
        }
    }
    for (name, url) in [
        ("token_endpoint", Some(&d.token_endpoint)),
        ("authorization_endpoint", d.authorization_endpoint.as_ref()),
        (
            "device_authorization_endpoint",
            d.device_authorization_endpoint.as_ref(),
        ),
    ] {
        if let Some(u) = url {
            if !endpoint_ok(u) {
                anyhow::bail!("{discovery_url}: {name} must be an https URL, got {u:?}");
            }
        }
    }
    // Only the portal's optional provider sign-out uses this one: a bad value disables that,
    // not sign-in.
    if let Some(u) = d.end_session_endpoint.take() {
        if endpoint_ok(&u) {
            d.end_session_endpoint = Some(u);
        } else {
            tracing::warn!(url = ?u, "{discovery_url}: ignoring end_session_endpoint: not an https URL");
        }
    }
    Ok(d)
}

/// An endpoint a client may send secrets or browsers to: https, or http on loopback (tests and
/// local development).
fn endpoint_ok(u: &str) -> bool {
    url::Url::parse(u).is_ok_and(|p| {
        p.scheme() == "https"
            || (p.scheme() == "http" && is_loopback(p.host_str().unwrap_or_default()))
    })
}

#[cfg(test)]
mod tests {
    /// A loopback HTTP server answering every request with `body` (JSON).
    async fn serve_once(body: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}/.well-known/openid-configuration")
    }

    #[tokio::test]
    async fn discovery_must_name_the_expected_issuer() {
        crate::install_crypto_provider();
        let http = super::IdpHttp::new(&[]).unwrap();
        let doc = serde_json::json!({
            "issuer": "https://idp.example.com/",
            "token_endpoint": "https://idp.example.com/token",
            "authorization_endpoint": "https://idp.example.com/authorize",
        })
        .to_string();
        let url = serve_once(doc).await;
        assert!(
            super::discover(&http, &url, Some("https://idp.example.com"))
                .await
                .is_ok()
        );
        let e = super::discover(&http, &url, Some("https://other.example.com"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected \"https://other.example.com\""), "{e}");
    }

    #[test]
    fn loopback_hosts() {
        assert!(super::is_loopback("127.0.0.1"));
        assert!(super::is_loopback("[::1]"));
        assert!(super::is_loopback("localhost"));
        assert!(!super::is_loopback("login.example.com"));
        assert!(!super::is_loopback("10.0.0.1"));
    }
}
