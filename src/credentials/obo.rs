//! Entra's on-behalf-of grant: the caller's token for the relay exchanged for one with the
//! cluster's audience, the relay authenticating with a secret, a certificate or a federated
//! assertion.

use super::*;

// === HTTP to Entra ===

/// An HTTPS client for Entra: the public web PKI for the public authority, or exactly `ca`
/// for a private one (tests on loopback).
pub(super) fn entra_client(ca: Option<&[CertificateDer<'static>]>) -> anyhow::Result<PooledClient> {
    crate::net::azure::entra_client(ca)
}

pub(super) fn full_body(b: Bytes) -> crate::net::UpstreamBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// Entra's token response, success or error, as far as we read it.
#[derive(Deserialize, Default)]
pub(super) struct TokenResponse {
    pub(super) access_token: Option<String>,
    /// Seconds; Entra sends a number, some proxies a string.
    pub(super) expires_in: Option<serde_json::Value>,
    pub(super) error: Option<String>,
    pub(super) error_description: Option<String>,
    #[serde(default)]
    pub(super) error_codes: Vec<u64>,
}

/// Sends one form POST to a token endpoint and classifies the answer.
pub(super) async fn post_form(
    client: &PooledClient,
    url: &str,
    form: &[(&str, &str)],
) -> Result<Fetched, CredentialError> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded;charset=utf-8",
        )
        .header(header::ACCEPT, "application/json")
        .body(full_body(Bytes::from(body)))
        .map_err(|e| CredentialError::Unavailable(format!("building the token request: {e}")))?;
    let resp = client.request(req).await.map_err(|e| {
        CredentialError::Unavailable(format!(
            "token endpoint unreachable: {}",
            crate::net::error_chain(&e)
        ))
    })?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| CredentialError::Unavailable(format!("reading the token response: {e}")))?
        .to_bytes();
    let parsed: TokenResponse = serde_json::from_slice(&bytes).unwrap_or_default();
    classify(status, parsed)
}

pub(super) fn classify(status: StatusCode, r: TokenResponse) -> Result<Fetched, CredentialError> {
    if status.is_success() {
        let token = r.access_token.ok_or_else(|| {
            CredentialError::Unavailable("token response without access_token".into())
        })?;
        let expires_in = match &r.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .ok_or_else(|| CredentialError::Unavailable("token response without expires_in".into()))?;
        return Ok(Fetched {
            value: bearer(&token)?,
            expires_in: Duration::from_secs(expires_in),
        });
    }
    // Entra's description names the AADSTS code and a trace id: useful in the log, never on
    // the wire (it may name the tenant or app).
    let code = r.error.unwrap_or_default();
    let detail = format!(
        "HTTP {}: {} {}",
        status.as_u16(),
        code,
        r.error_description
            .as_deref()
            .unwrap_or("")
            .lines()
            .next()
            .unwrap_or("")
    );
    let has = |n: u64, s: &str| {
        r.error_codes.contains(&n)
            || r.error_description
                .as_deref()
                .is_some_and(|d| d.contains(s))
    };
    if has(65001, "AADSTS65001") {
        return Err(CredentialError::ConsentRequired(detail));
    }
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || code == "temporarily_unavailable"
    {
        return Err(CredentialError::Unavailable(detail));
    }
    if code == "interaction_required" || code == "invalid_grant" {
        return Err(CredentialError::InteractionRequired(detail));
    }
    // invalid_client, unauthorized_client, invalid_scope, ...: the relay's own configuration
    // is wrong; the user can only wait for an admin.
    Err(CredentialError::Unavailable(detail))
}

// === on-behalf-of ===

/// A hand-written OBO client. Why not the `oauth2` crate: it has no OBO grant, no client
/// assertions and no per-request tenant; what remains is one form POST, which our pooled
/// hyper client already does with the relay's one TLS stack.
pub(super) struct Obo {
    pub(super) cluster: String,
    pub(super) client_id: String,
    pub(super) auth: ClientAuth,
    pub(super) endpoint: EntraEndpoint,
    pub(super) http: PooledClient,
    pub(super) cache: TokenCache<OboKey>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct OboKey {
    pub(super) issuer: String,
    pub(super) tid: String,
    pub(super) oid: String,
    pub(super) scope: String,
}

pub(super) enum ClientAuth {
    Secret(SecretString),
    Certificate {
        key: jsonwebtoken::EncodingKey,
        x5t_s256: String,
    },
    Federated(Arc<AssertionSource>),
}

/// Where a federated client assertion comes from.
pub(super) enum AssertionSource {
    File(TokenFile),
    ManagedIdentity(Arc<dyn TokenCredential>),
}

impl Obo {
    pub(super) fn new(cluster: &str, cfg: &OboConfig) -> anyhow::Result<Self> {
        let auth = match &cfg.client_auth {
            OboClientAuth::Secret(s) => ClientAuth::Secret(s.clone()),
            OboClientAuth::Certificate { chain, key } => {
                let leaf = chain
                    .first()
                    .ok_or_else(|| anyhow::anyhow!("client certificate file has no certificate"))?;
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
                ClientAuth::Certificate {
                    key: rsa_encoding_key(key)?,
                    x5t_s256: URL_SAFE_NO_PAD.encode(digest.as_ref()),
                }
            }
            OboClientAuth::FederatedTokenFile { path } => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read federated token file {}: {e}", path.display())
                })?;
                ClientAuth::Federated(Arc::new(AssertionSource::File(TokenFile::new(
                    path.clone(),
                    token.trim().to_owned(),
                ))))
            }
            OboClientAuth::FederatedManagedIdentity { client_id } => {
                ClientAuth::Federated(Arc::new(AssertionSource::ManagedIdentity(
                    managed_identity(client_id.as_deref(), None)?,
                )))
            }
        };
        Ok(Self {
            cluster: cluster.to_owned(),
            client_id: cfg.client_id.clone(),
            auth,
            endpoint: cfg.endpoint.clone(),
            http: entra_client(cfg.endpoint.ca.as_deref())?,
            cache: TokenCache::new(),
        })
    }

    pub(super) async fn authorization(
        self: &Arc<Self>,
        p: &Principal,
    ) -> Result<HeaderValue, CredentialError> {
        let claim = |n: &str| p.claims.get(n).and_then(|v| v.as_str()).map(str::to_owned);
        let tid = claim("tid")
            .ok_or_else(|| CredentialError::NotExchangeable("the token has no tid".into()))?;
        if !crate::config::is_guid(&tid) {
            return Err(CredentialError::NotExchangeable(
                "the token's tid is not a GUID".into(),
            ));
        }
        if let Some(t) = &self.endpoint.tenant_id {
            if !t.eq_ignore_ascii_case(&tid) {
                return Err(CredentialError::NotExchangeable(
                    "the token is from another tenant than the cluster's".into(),
                ));
            }
        }
        let oid = p
            .oid
            .clone()
            .or_else(|| claim("oid"))
            .ok_or_else(|| CredentialError::NotExchangeable("the token has no oid".into()))?;
        let key = OboKey {
            issuer: p.issuer.to_string(),
            tid: tid.to_ascii_lowercase(),
            oid,
            scope: self.endpoint.scope.clone(),
        };
        let this = self.clone();
        let assertion = SecretString::new(p.bearer_token().to_owned());
        let tenant = key.tid.clone();
        let result = self
            .cache
            .get(&key, move || async move {
                this.exchange(&tenant, assertion).await
            })
            .await;
        if let Err(e) = &result {
            tracing::info!(cluster = %self.cluster, user = %p.user_key(), error = %e, "OBO exchange failed");
        }
        result
    }

    pub(super) fn token_url(&self, tenant: &str) -> String {
        format!(
            "{}/{tenant}/oauth2/v2.0/token",
            self.endpoint.authority_host.as_str().trim_end_matches('/')
        )
    }

    pub(super) async fn exchange(
        &self,
        tenant: &str,
        assertion: SecretString,
    ) -> Result<Fetched, CredentialError> {
        let url = self.token_url(tenant);
        let form: [(&str, &str); 5] = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("requested_token_use", "on_behalf_of"),
            ("client_id", &self.client_id),
            ("assertion", assertion.expose()),
            ("scope", &self.endpoint.scope),
        ];
        self.post_with_client_auth(&url, &form).await
    }

    /// `kube-relay doctor`: a client-credentials grant for the cluster's scope with the same
    /// client authentication as the exchange. It proves the client id, its secret, certificate
    /// or federated assertion, the tenant and the authority; the exchange itself needs a
    /// caller's token.
    pub(super) async fn check_client(&self) -> Result<String, CredentialError> {
        let tenant = self.endpoint.tenant_id.as_deref().ok_or_else(|| {
            CredentialError::NotExchangeable(
                "no tenant_id: each caller's token names the tenant, so there is none to check the relay's client against (set tenant_id to let doctor check)".into(),
            )
        })?;
        let url = self.token_url(tenant);
        // Client credentials take only `<resource>/.default`, whatever delegated scope the
        // exchange asks for.
        let scope = match self.endpoint.scope.rsplit_once('/') {
            Some((resource, _)) if !resource.is_empty() => {
                format!("{resource}/.default")
            }
            _ => self.endpoint.scope.clone(),
        };
        let form: [(&str, &str); 3] = [
            ("grant_type", "client_credentials"),
            ("client_id", &self.client_id),
            ("scope", &scope),
        ];
        self.post_with_client_auth(&url, &form).await?;
        Ok(format!(
            "on_behalf_of: Entra accepts the relay's client {} in tenant {tenant} (client credentials for {scope}); the exchange itself needs a caller's token",
            self.client_id
        ))
    }

    /// POSTs `form` to `url` with the relay's client authentication added.
    async fn post_with_client_auth(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<Fetched, CredentialError> {
        let client_assertion;
        let mut form = form.to_vec();
        match &self.auth {
            ClientAuth::Secret(s) => form.push(("client_secret", s.expose())),
            ClientAuth::Certificate { key, x5t_s256 } => {
                client_assertion = signed_assertion(&self.client_id, url, key, x5t_s256)?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                form.push(("client_assertion", client_assertion.expose()));
            }
            ClientAuth::Federated(src) => {
                client_assertion = src.assertion().await?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                form.push(("client_assertion", client_assertion.expose()));
            }
        }
        post_form(&self.http, url, &form).await
    }
}

impl AssertionSource {
    pub(super) async fn assertion(&self) -> Result<SecretString, CredentialError> {
        match self {
            Self::File(f) => f.current().await,
            Self::ManagedIdentity(cred) => {
                // azure_identity caches this token itself.
                let t = cred
                    .get_token(&[TOKEN_EXCHANGE_SCOPE], None)
                    .await
                    .map_err(|e| azure_error("managed identity (federated assertion)", &e))?;
                Ok(SecretString::new(t.token.secret().to_owned()))
            }
        }
    }
}

/// A client assertion JWT (RFC 7523) as Entra wants it: RS256, `x5t#S256` of the certificate,
/// `aud` the token endpoint, short-lived, unique `jti`.
pub(super) fn signed_assertion(
    client_id: &str,
    aud: &str,
    key: &jsonwebtoken::EncodingKey,
    x5t_s256: &str,
) -> Result<SecretString, CredentialError> {
    let now = crate::clock::unix_now();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.x5t_s256 = Some(x5t_s256.to_owned());
    let claims = serde_json::json!({
        "aud": aud,
        "iss": client_id,
        "sub": client_id,
        "jti": uuid::Uuid::new_v4().to_string(),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    });
    jsonwebtoken::encode(&header, &claims, key)
        .map(SecretString::new)
        .map_err(|e| CredentialError::Invalid(format!("signing the client assertion: {e}")))
}

/// jsonwebtoken takes PEM for RSA keys in either PKCS#1 or PKCS#8 form.
pub(super) fn rsa_encoding_key(
    key: &PrivateKeyDer<'static>,
) -> anyhow::Result<jsonwebtoken::EncodingKey> {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Pkcs8(_) => "PRIVATE KEY",
        _ => anyhow::bail!("the OBO client key must be an RSA key (PKCS#1 or PKCS#8)"),
    };
    let b64 = STANDARD.encode(key.secret_der());
    let mut pem = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|_| anyhow::anyhow!("the OBO client key must be an RSA key (PKCS#1 or PKCS#8)"))
}
