//! azure_core's HTTP transport over the relay's own stack, so azure_identity (managed
//! identity, workload identity, client secret) talks through the same rustls config and
//! bounds as everything else: no platform store, no second TLS stack.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use rustls_pki_types::CertificateDer;

use super::{
    client_tls, error_chain, pooled_client, PooledClient, TlsDialer, Trust, UpstreamBody, HTTP1,
};

/// Token endpoint answers are small JSON documents.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn full_body(b: Bytes) -> UpstreamBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// An HTTPS client for Entra: the public web PKI for the public authority, or exactly `ca`
/// for a private one (tests on loopback).
pub fn entra_client(ca: Option<&[CertificateDer<'static>]>) -> anyhow::Result<PooledClient> {
    let trust = match ca {
        Some(certs) => Trust::Only(certs),
        None => Trust::PublicAnd(&[]),
    };
    Ok(pooled_client(TlsDialer::new(
        client_tls(trust, None, HTTP1)?,
        None,
        None,
        CONNECT_TIMEOUT,
    )))
}

/// azure_core's transport over hyper: https through our rustls config (webpki roots or the
/// configured CA: no platform store, no second TLS stack), plain http only for the managed
/// identity endpoints (IMDS and App Service/AKS style `IDENTITY_ENDPOINT`), which are http.
pub struct HyperTransport {
    https: PooledClient,
    /// Azure Storage: answers (recordings) are streamed, not gathered under a small cap.
    storage: bool,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        UpstreamBody,
    >,
}

impl fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperTransport").finish_non_exhaustive()
    }
}

impl HyperTransport {
    pub fn new(ca: Option<&[CertificateDer<'static>]>) -> anyhow::Result<Self> {
        Self::over(entra_client(ca)?)
    }

    /// Trusts the public web PKI plus `extra_ca`: the CLI's `--ca-file` adds a CA, it does not
    /// replace the public ones (the managed identity endpoint and Entra may differ).
    pub fn with_extra_roots(extra_ca: &[CertificateDer<'static>]) -> anyhow::Result<Self> {
        Self::over(pooled_client(TlsDialer::new(
            client_tls(Trust::PublicAnd(extra_ca), None, HTTP1)?,
            None,
            None,
            CONNECT_TIMEOUT,
        )))
    }

    /// For Azure Blob Storage (recordings): the public web PKI, or exactly `ca` (an emulator
    /// in tests); PUT, HEAD and DELETE as well, and response bodies streamed.
    pub fn for_storage(ca: Option<&[CertificateDer<'static>]>) -> anyhow::Result<Self> {
        let mut t = Self::new(ca)?;
        t.storage = true;
        Ok(t)
    }

    fn over(https: PooledClient) -> anyhow::Result<Self> {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // As the TLS dialer does: a request must not wait on Nagle for the peer's ACK.
        connector.set_nodelay(true);
        Ok(Self {
            storage: false,
            https,
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector),
        })
    }
}

#[async_trait::async_trait]
impl azure_core::http::HttpClient for HyperTransport {
    async fn execute_request(
        &self,
        request: &azure_core::http::Request,
    ) -> azure_core::Result<azure_core::http::AsyncRawResponse> {
        use azure_core::error::ErrorKind;
        use azure_core::http::request::Body;
        let err = |kind: ErrorKind, msg: String| azure_core::Error::with_message(kind, msg);
        let url = request.url();
        let method = match request.method() {
            azure_core::http::Method::Get => Method::GET,
            azure_core::http::Method::Post => Method::POST,
            azure_core::http::Method::Put if self.storage => Method::PUT,
            azure_core::http::Method::Head if self.storage => Method::HEAD,
            azure_core::http::Method::Delete if self.storage => Method::DELETE,
            other => return Err(err(ErrorKind::Other, format!("method {other:?} not used"))),
        };
        let body = match request.body() {
            Body::Bytes(b) => b.clone(),
            #[allow(unreachable_patterns)]
            _ => return Err(err(ErrorKind::Other, "streamed bodies are not used".into())),
        };
        let mut builder = Request::builder().method(method).uri(url.as_str());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let req = builder
            .body(full_body(body))
            .map_err(|e| err(ErrorKind::Other, format!("building the request: {e}")))?;
        let sent = match url.scheme() {
            "https" => self.https.request(req).await,
            "http" => self.http.request(req).await,
            s => return Err(err(ErrorKind::Other, format!("scheme {s} not supported"))),
        };
        let resp = sent.map_err(|e| {
            err(
                ErrorKind::Connection,
                format!("{}: {}", url.host_str().unwrap_or(""), error_chain(&e)),
            )
        })?;
        let status = resp.status().as_u16();
        let mut headers = azure_core::http::headers::Headers::new();
        for (k, v) in resp.headers() {
            if let Ok(v) = v.to_str() {
                headers.insert(k.as_str().to_owned(), v.to_owned());
            }
        }
        if self.storage {
            use futures_util::TryStreamExt as _;
            let stream = http_body_util::BodyDataStream::new(resp.into_body()).map_err(|e| {
                azure_core::Error::with_message(
                    ErrorKind::Io,
                    format!("reading the response: {}", error_chain(&e)),
                )
            });
            return Ok(azure_core::http::AsyncRawResponse::new(
                status.into(),
                headers,
                Box::pin(stream),
            ));
        }
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| err(ErrorKind::Io, format!("reading the response: {e}")))?
            .to_bytes();
        Ok(azure_core::http::AsyncRawResponse::from_bytes(
            status.into(),
            headers,
            bytes,
        ))
    }
}

/// Options for azure_identity's Entra credentials: `authority_host` (sovereign clouds, test
/// stand-ins) and our transport. Shared by the relay's credentials and `kube-relay token`.
pub fn azure_client_options(
    authority_host: &str,
    transport: HyperTransport,
) -> azure_core::http::ClientOptions {
    let mut cloud = azure_core::cloud::CustomConfiguration::default();
    cloud.authority_host = authority_host.trim_end_matches('/').to_owned();
    azure_core::http::ClientOptions {
        transport: Some(azure_core::http::Transport::new(std::sync::Arc::new(
            transport,
        ))),
        // Our cache and FETCH_TIMEOUT bound the wait; the SDK's retries (up to a minute) would
        // hold requests past it.
        retry: azure_core::http::RetryOptions::none(),
        cloud: Some(std::sync::Arc::new(cloud.into())),
        ..Default::default()
    }
}

/// A managed identity credential over `transport` (`kube-relay token --login msi` passes one
/// that also trusts the public web PKI).
pub fn managed_identity_over(
    client_id: Option<&str>,
    transport: HyperTransport,
) -> anyhow::Result<std::sync::Arc<dyn azure_core::credentials::TokenCredential>> {
    let options = azure_identity::ManagedIdentityCredentialOptions {
        user_assigned_id: client_id.map(|c| azure_identity::UserAssignedId::ClientId(c.to_owned())),
        client_options: azure_core::http::ClientOptions {
            transport: Some(azure_core::http::Transport::new(std::sync::Arc::new(
                transport,
            ))),
            ..Default::default()
        },
    };
    let cred = azure_identity::ManagedIdentityCredential::new(Some(options))
        .map_err(|e| anyhow::anyhow!("managed identity credential: {e}"))?;
    Ok(cred)
}
