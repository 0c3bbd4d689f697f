//! A loopback stand-in for Entra ID's token endpoint and the managed identity endpoints, for
//! kube-relay's upstream-credential tests (issue 3). Nothing here talks to the internet.
//!
//! Served paths:
//! - `POST /{tenant}/oauth2/v2.0/token`:
//!   - `grant_type=client_credentials` with `client_secret`, or with a `client_assertion`
//!     (a certificate-signed JWT checked against a registered key and `x5t#S256`, or a federated
//!     JWT checked against the assertion issuers' JWKS, audience `api://AzureADTokenExchange`);
//!   - `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` with
//!     `requested_token_use=on_behalf_of`: the `assertion` (the user's token) must verify against
//!     an assertion issuer's JWKS and be unexpired; the minted token keeps its `oid`, `tid`, `upn`.
//! - `GET /metadata/identity/oauth2/token` (IMDS shape, `Metadata: true` required) and
//!   `GET /msi/token` (App Service shape, `X-IDENTITY-HEADER` required): point azure_identity's
//!   `IDENTITY_ENDPOINT` at `http://127.0.0.1:P/msi/token`.
//!
//! Minted tokens are Entra-shaped v1 tokens for the requested resource (`iss`
//! `https://sts.windows.net/{tid}/`, `aud` the resource, `tid`, `oid`, `upn`, `scp` or `roles`,
//! `idtyp`, `ver: "1.0"`, `exp`) signed by the endpoint's [`DevIssuer`].
//!
//! Failure modes ([`Failure`]) make the next requests fail as Entra does: consent missing
//! (`AADSTS65001`, `invalid_grant`), interaction required (`AADSTS50076`,
//! `interaction_required`), HTTP 500, or a hang (no answer for a minute) for timeout tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::issuer::DevIssuer;

/// The AKS server app: the default resource.
pub const AKS_SERVER_APP: &str = "6dae42f8-4368-4678-94ff-3960e28e3630";
const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
const MAX_BODY: usize = 64 * 1024;
const HANG_FOR: Duration = Duration::from_secs(60);

/// How the endpoint answers the next token requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Failure {
    None = 0,
    /// `invalid_grant` with AADSTS65001 (consent missing), OBO only.
    ConsentMissing = 1,
    /// `interaction_required` with AADSTS50076 (MFA), OBO only.
    InteractionRequired = 2,
    /// HTTP 500 `server_error`, every grant.
    ServerError = 3,
    /// No answer for a minute, every grant.
    Hang = 4,
}

impl Failure {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::ConsentMissing,
            2 => Self::InteractionRequired,
            3 => Self::ServerError,
            4 => Self::Hang,
            _ => Self::None,
        }
    }
}

/// What the endpoint accepts. Build with [`TokenEndpointConfig::new`] and the `with_*` methods.
#[derive(Clone)]
pub struct TokenEndpointConfig {
    /// The only tenant served.
    pub tenant: String,
    /// Signs every minted token.
    pub signer: DevIssuer,
    /// Issuers whose tokens are accepted as OBO assertions and federated client assertions.
    pub assertion_issuers: Vec<DevIssuer>,
    /// client id → secret.
    pub client_secrets: HashMap<String, String>,
    /// client id → (base64url SHA-256 of the certificate DER, RSA public key PEM).
    pub client_certificates: HashMap<String, (String, String)>,
    /// The `X-IDENTITY-HEADER` value the App Service-style endpoint requires.
    pub identity_header: String,
    /// Object id of the managed identity / app-only principal in minted app tokens.
    pub app_oid: String,
    /// When set (this endpoint's own `https://host:port`), also serve the tenant's v1 and v2
    /// OpenID metadata and keys as Entra does on the same host, so one authority serves a
    /// relay's key fetches and a client's token requests.
    pub metadata_authority: Option<String>,
}

impl TokenEndpointConfig {
    pub fn new(tenant: &str, signer: DevIssuer) -> Self {
        Self {
            tenant: tenant.to_owned(),
            signer,
            assertion_issuers: Vec::new(),
            client_secrets: HashMap::new(),
            client_certificates: HashMap::new(),
            identity_header: "kube-sim-identity-header".to_owned(),
            app_oid: "99999999-9999-9999-9999-999999999999".to_owned(),
            metadata_authority: None,
        }
    }
}

/// Counters and switches of a running endpoint.
pub struct TokenEndpointHandle {
    pub addr: SocketAddr,
    /// `client_credentials` grants answered with a token.
    pub client_credentials_grants: Arc<AtomicU64>,
    /// OBO grants answered with a token.
    pub obo_grants: Arc<AtomicU64>,
    /// Managed identity requests answered with a token.
    pub managed_identity_grants: Arc<AtomicU64>,
    /// Every request that reached a token path, answered or not.
    pub requests: Arc<AtomicU64>,
    state: Arc<State>,
    cancel: CancellationToken,
}

impl TokenEndpointHandle {
    pub fn set_failure(&self, f: Failure) {
        self.state.failure.store(f as u8, Ordering::SeqCst);
    }
    /// Lifetime (`expires_in`) of tokens minted from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.state
            .lifetime_secs
            .store(d.as_secs(), Ordering::SeqCst);
    }
    /// The last form fields received on the token path (secrets included: test use only).
    pub fn last_form(&self) -> HashMap<String, String> {
        self.state
            .last_form
            .read()
            .map(|f| f.clone())
            .unwrap_or_default()
    }
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for TokenEndpointHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEndpointHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct State {
    cfg: TokenEndpointConfig,
    failure: AtomicU8,
    lifetime_secs: AtomicU64,
    client_credentials_grants: Arc<AtomicU64>,
    obo_grants: Arc<AtomicU64>,
    managed_identity_grants: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// A `std` lock: never held across an await.
    last_form: RwLock<HashMap<String, String>>,
}

/// Serves the endpoint on `listener`, over TLS when `tls` is given (the token path), else HTTP
/// (fine for the managed identity paths, which are HTTP in Azure too).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: TokenEndpointConfig,
) -> anyhow::Result<TokenEndpointHandle> {
    let addr = listener.local_addr().context("listener address")?;
    let state = Arc::new(State {
        cfg,
        failure: AtomicU8::new(0),
        lifetime_secs: AtomicU64::new(3600),
        client_credentials_grants: Arc::new(AtomicU64::new(0)),
        obo_grants: Arc::new(AtomicU64::new(0)),
        managed_identity_grants: Arc::new(AtomicU64::new(0)),
        requests: Arc::new(AtomicU64::new(0)),
        last_form: RwLock::new(HashMap::new()),
    });
    let handle = TokenEndpointHandle {
        addr,
        client_credentials_grants: state.client_credentials_grants.clone(),
        obo_grants: state.obo_grants.clone(),
        managed_identity_grants: state.managed_identity_grants.clone(),
        requests: state.requests.clone(),
        state: state.clone(),
        cancel: CancellationToken::new(),
    };
    crate::loopback::spawn_server(
        "token endpoint",
        listener,
        tls,
        handle.cancel.clone(),
        move |req| {
            let state = state.clone();
            async move { respond(&state, req).await }
        },
    );
    Ok(handle)
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn oauth_error(
    status: StatusCode,
    error: &str,
    code: u64,
    description: &str,
) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description}\r\nTrace ID: 00000000-0000-0000-0000-000000000000"),
            "error_codes": [code],
            "timestamp": "2026-01-01 00:00:00Z",
        }),
    )
}

/// Entra's metadata documents and keys for the tenant, when configured.
fn metadata(cfg: &TokenEndpointConfig, path: &str) -> Option<Value> {
    let authority = cfg.metadata_authority.as_deref()?.trim_end_matches('/');
    let t = &cfg.tenant;
    let doc = |iss: String, jwks: String| {
        json!({
            "issuer": iss,
            "jwks_uri": jwks,
            "token_endpoint": format!("{authority}/{t}/oauth2/v2.0/token"),
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["pairwise"],
        })
    };
    if path == format!("/{t}/.well-known/openid-configuration") {
        Some(doc(
            format!("https://sts.windows.net/{t}/"),
            format!("{authority}/{t}/discovery/keys"),
        ))
    } else if path == format!("/{t}/v2.0/.well-known/openid-configuration") {
        Some(doc(
            format!("{authority}/{t}/v2.0"),
            format!("{authority}/{t}/discovery/v2.0/keys"),
        ))
    } else if path == format!("/{t}/discovery/keys") || path == format!("/{t}/discovery/v2.0/keys")
    {
        serde_json::to_value(cfg.signer.jwks()).ok()
    } else {
        None
    }
}

async fn respond(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let token_path = format!("/{}/oauth2/v2.0/token", state.cfg.tenant);
    let is_mi = path == "/metadata/identity/oauth2/token" || path == "/msi/token";
    if let Some(doc) = metadata(&state.cfg, &path) {
        return json_response(StatusCode::OK, doc);
    }
    if path != token_path && !is_mi {
        return json_response(StatusCode::NOT_FOUND, json!({"error": "not_found"}));
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let failure = Failure::from_u8(state.failure.load(Ordering::SeqCst));
    match failure {
        Failure::Hang => {
            tokio::time::sleep(HANG_FOR).await;
            return json_response(StatusCode::GATEWAY_TIMEOUT, json!({"error": "hang"}));
        }
        Failure::ServerError => {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "server_error", "error_description": "AADSTS90033: A transient error has occurred."}),
            )
        }
        _ => {}
    }
    if is_mi {
        return managed_identity(state, &req, &path);
    }
    if req.method() != Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            900561,
            "The endpoint only accepts POST requests.",
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "Body too large.",
            )
        }
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if let Ok(mut last) = state.last_form.write() {
        *last = form.clone();
    }
    token(state, &form, &token_path, failure)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The resource GUID or URI of a `scope` like `6dae…/.default`.
fn resource_of(scope: &str) -> Option<&str> {
    scope.strip_suffix("/.default").filter(|r| !r.is_empty())
}

fn managed_identity(state: &State, req: &Request<Incoming>, path: &str) -> Response<Full<Bytes>> {
    let ok = if path == "/msi/token" {
        req.headers()
            .get("x-identity-header")
            .is_some_and(|v| v.as_bytes() == state.cfg.identity_header.as_bytes())
    } else {
        req.headers()
            .get("metadata")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
    };
    if !ok {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}),
        );
    }
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let Some(resource) = query.get("resource").cloned() else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "resource is required"}),
        );
    };
    let lifetime = state.lifetime_secs.load(Ordering::SeqCst);
    let client_id = query
        .get("client_id")
        .cloned()
        .unwrap_or_else(|| "mi-system-assigned".into());
    let token = mint_app(state, &resource, &client_id, lifetime);
    state.managed_identity_grants.fetch_add(1, Ordering::SeqCst);
    json_response(
        StatusCode::OK,
        json!({
            "access_token": token,
            "expires_on": (now() + lifetime).to_string(),
            "expires_in": lifetime.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}

fn mint_app(state: &State, resource: &str, client_id: &str, lifetime: u64) -> String {
    let t = now();
    let tid = &state.cfg.tenant;
    state.cfg.signer.mint(json!({
        "iss": format!("https://sts.windows.net/{tid}/"),
        "aud": resource,
        "tid": tid,
        "oid": state.cfg.app_oid,
        "sub": state.cfg.app_oid,
        "appid": client_id,
        "appidacr": "1",
        "idtyp": "app",
        "roles": [],
        "ver": "1.0",
        "iat": t,
        "nbf": t,
        "exp": t + lifetime,
    }))
}

fn token_ok(token: String, lifetime: u64) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        json!({
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }),
    )
}

/// Verifies `jwt` against every assertion issuer's JWKS with audience `aud`; returns claims.
fn verify_assertion(
    state: &State,
    jwt: &str,
    aud: Option<&str>,
) -> Option<serde_json::Map<String, Value>> {
    let header = jsonwebtoken::decode_header(jwt).ok()?;
    let kid = header.kid?;
    for issuer in &state.cfg.assertion_issuers {
        let jwks = issuer.jwks();
        let Some(jwk) = jwks.find(&kid) else { continue };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let mut v = Validation::new(header.alg);
        v.leeway = 0;
        match aud {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Ok(data) = jsonwebtoken::decode::<serde_json::Map<String, Value>>(jwt, &key, &v) {
            return Some(data.claims);
        }
    }
    None
}

/// Checks the client's authentication: secret, certificate assertion or federated assertion.
fn client_ok(
    state: &State,
    form: &HashMap<String, String>,
    token_url_path: &str,
) -> Result<String, (u64, &'static str)> {
    // The AADSTS code and description of an `invalid_client` answer.
    let bad = |code: u64, msg: &'static str| Err((code, msg));
    let Some(client_id) = form.get("client_id").cloned() else {
        return bad(
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        );
    };
    if let Some(secret) = form.get("client_secret") {
        return match state.cfg.client_secrets.get(&client_id) {
            Some(s) if s == secret => Ok(client_id),
            _ => bad(7000215, "Invalid client secret provided."),
        };
    }
    let (Some(kind), Some(assertion)) = (
        form.get("client_assertion_type"),
        form.get("client_assertion"),
    ) else {
        return bad(7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.");
    };
    if kind != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
        return bad(70002, "Unsupported client assertion type.");
    }
    let Ok(header) = jsonwebtoken::decode_header(assertion) else {
        return bad(50027, "Invalid JWT token.");
    };
    if let Some(thumb) = &header.x5t_s256 {
        // A certificate credential: the thumbprint picks the registered key; aud must be the
        // token endpoint; iss and sub the client id.
        let Some((registered, pem)) = state.cfg.client_certificates.get(&client_id) else {
            return bad(
                700027,
                "Client assertion failed signature validation (no certificate registered).",
            );
        };
        if registered != thumb {
            return bad(700027, "Client assertion contains an invalid thumbprint.");
        }
        let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) else {
            return bad(700027, "Registered key unusable.");
        };
        let mut v = Validation::new(jsonwebtoken::Algorithm::RS256);
        v.validate_aud = false;
        v.set_issuer(&[client_id.as_str()]);
        let Ok(data) = jsonwebtoken::decode::<serde_json::Map<String, Value>>(assertion, &key, &v)
        else {
            return bad(700027, "Client assertion failed signature validation.");
        };
        let aud_ok = data
            .claims
            .get("aud")
            .and_then(Value::as_str)
            .is_some_and(|a| a.ends_with(token_url_path));
        let sub_ok = data.claims.get("sub").and_then(Value::as_str) == Some(client_id.as_str());
        if !aud_ok || !sub_ok {
            return bad(700021, "Client assertion audience or subject is invalid.");
        }
        return Ok(client_id);
    }
    // A federated credential: an external token for api://AzureADTokenExchange.
    if verify_assertion(state, assertion, Some(TOKEN_EXCHANGE_AUDIENCE)).is_none() {
        return bad(
            700211,
            "No matching federated identity record found for presented assertion.",
        );
    }
    Ok(client_id)
}

fn token(
    state: &State,
    form: &HashMap<String, String>,
    token_path: &str,
    failure: Failure,
) -> Response<Full<Bytes>> {
    let client_id = match client_ok(state, form, token_path) {
        Ok(c) => c,
        Err((code, msg)) => {
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", code, msg)
        }
    };
    let Some(scope) = form.get("scope") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'scope'.",
        );
    };
    let Some(resource) = resource_of(scope) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "The provided value for scope is not valid.",
        );
    };
    let lifetime = state.lifetime_secs.load(Ordering::SeqCst);
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            state
                .client_credentials_grants
                .fetch_add(1, Ordering::SeqCst);
            token_ok(mint_app(state, resource, &client_id, lifetime), lifetime)
        }
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            if form.get("requested_token_use").map(String::as_str) != Some("on_behalf_of") {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    900144,
                    "requested_token_use must be on_behalf_of.",
                );
            }
            match failure {
                Failure::ConsentMissing => {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", 65001, "The user or administrator has not consented to use the application.")
                }
                Failure::InteractionRequired => {
                    return oauth_error(StatusCode::BAD_REQUEST, "interaction_required", 50076, "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication.")
                }
                _ => {}
            }
            let Some(assertion) = form.get("assertion") else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'assertion'.",
                );
            };
            let Some(user) = verify_assertion(state, assertion, None) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    50013,
                    "Assertion failed signature validation or is expired.",
                );
            };
            let tid = &state.cfg.tenant;
            if user.get("tid").and_then(Value::as_str) != Some(tid.as_str()) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    50013,
                    "Assertion is from another tenant.",
                );
            }
            let t = now();
            let mut claims = json!({
                "iss": format!("https://sts.windows.net/{tid}/"),
                "aud": resource,
                "tid": tid,
                "appid": client_id,
                "appidacr": "1",
                "scp": "user.read",
                "ver": "1.0",
                "iat": t,
                "nbf": t,
                "exp": t + lifetime,
            });
            for c in ["oid", "upn", "sub", "groups", "name", "unique_name"] {
                if let (Some(v), Some(obj)) = (user.get(c), claims.as_object_mut()) {
                    obj.insert(c.to_owned(), v.clone());
                }
            }
            state.obo_grants.fetch_add(1, Ordering::SeqCst);
            token_ok(state.cfg.signer.mint(claims), lifetime)
        }
        _ => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        ),
    }
}

/// An app registration's certificate credential, for OBO tests: a self-signed RSA certificate
/// (Entra's client assertions are RS256), its key, and what to register with
/// [`TokenEndpointConfig::client_certificates`].
pub struct ClientCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    /// base64url SHA-256 of the certificate DER (the `x5t#S256` header Entra matches).
    pub x5t_s256: String,
    pub public_key_pem: String,
}

impl ClientCertificate {
    pub fn generate(common_name: &str) -> anyhow::Result<Self> {
        use base64::Engine as _;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .context("generating an RSA key")?;
        let params = rcgen::CertificateParams::new(vec![common_name.to_owned()])
            .context("certificate parameters")?;
        let cert = params.self_signed(&kp).context("self-signing")?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.der());
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: kp.serialize_pem(),
            x5t_s256: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref()),
            public_key_pem: kp.public_key_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_of_strips_default() {
        assert_eq!(resource_of("6dae/.default"), Some("6dae"));
        assert_eq!(resource_of("/.default"), None);
        assert_eq!(resource_of("user.read"), None);
    }

    #[test]
    fn failure_round_trips() {
        for f in [
            Failure::None,
            Failure::ConsentMissing,
            Failure::InteractionRequired,
            Failure::ServerError,
            Failure::Hang,
        ] {
            assert_eq!(Failure::from_u8(f as u8), f);
        }
    }
}
