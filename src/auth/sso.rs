//! The portal's side of OpenID Connect: a confidential client using the authorization code
//! flow with PKCE (S256), state and nonce.
//!
//! Why each check exists:
//! - `state` (in the sealed login cookie, compared in constant time) ties the callback to a
//!   sign-in this browser started, so an attacker cannot log a victim into the attacker's
//!   account (login CSRF).
//! - PKCE ties the code to this sign-in's verifier, so a code stolen from the redirect (logs,
//!   referrers) is useless elsewhere.
//! - `nonce` is checked in the ID token the token endpoint returns; that answer comes over TLS
//!   straight from the provider to the authenticated client, which is what lets OIDC Core
//!   §3.1.3.7 skip the ID token's signature here. It stops a replayed token response.
//! - The access token then goes through the same [`crate::auth::Authenticator`] as kubectl's,
//!   so the portal never admits a token the relay itself would refuse.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthType, AuthorizationCode, Client, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    PkceCodeVerifier, RedirectUrl, RequestTokenError, StandardRevocableToken,
    StandardTokenResponse, TokenResponse as _, TokenUrl,
};
use serde::{Deserialize, Serialize};

use crate::config::{Config, LoginConfig, PortalConfig};
use crate::net::error_chain;
use crate::net::idp::{discover, IdpHttp};

/// One generation's portal: the HTTP client for the identity provider and its endpoints,
/// fetched on first use and kept (a reload builds a new one, so endpoint changes apply).
pub struct Portal {
    http: IdpHttp,
    discovery_url: String,
    /// The `issuer` the discovery document must name.
    expected_issuer: String,
    provider: tokio::sync::OnceCell<Arc<Provider>>,
}

impl std::fmt::Debug for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portal")
            .field("discovery_url", &self.discovery_url)
            .finish_non_exhaustive()
    }
}

/// The provider endpoints the portal uses.
#[derive(Debug)]
pub struct Provider {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    /// Send the client secret with HTTP Basic (the RFC 6749 default, and oidc-provider's)
    /// unless the provider only lists `client_secret_post`.
    pub basic_auth: bool,
    /// Where a browser is sent to end its session at the provider (RP-initiated logout).
    pub end_session_endpoint: Option<String>,
}

/// The one discovery field [`discover`] does not keep.
#[derive(Deserialize)]
struct AuthMethods {
    #[serde(default)]
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
}

impl Portal {
    /// `None` unless `login.portal` is configured.
    pub fn build(cfg: &Config) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(login) = cfg.login.as_ref().filter(|l| l.portal.is_some()) else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Self {
            http: IdpHttp::new(&login.issuer.ca)?,
            discovery_url: login.discovery_url(),
            expected_issuer: login.expected_issuer(),
            provider: tokio::sync::OnceCell::new(),
        })))
    }

    /// The provider's endpoints; fetched once per generation. A failure is not remembered, so
    /// the next sign-in tries again once the provider is back.
    pub async fn provider(&self) -> anyhow::Result<Arc<Provider>> {
        self.provider
            .get_or_try_init(|| async {
                let d = discover(&self.http, &self.discovery_url, Some(&self.expected_issuer))
                    .await?;
                let methods: AuthMethods = self.http.get_json(&self.discovery_url).await?;
                let authorization_endpoint = d.authorization_endpoint.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: no authorization_endpoint (the provider does not offer browser sign-in)",
                        self.discovery_url
                    )
                })?;
                let basic_auth = methods
                    .token_endpoint_auth_methods_supported
                    .is_none_or(|m| {
                        m.iter().any(|x| x == "client_secret_basic")
                            || !m.iter().any(|x| x == "client_secret_post")
                    });
                Ok(Arc::new(Provider {
                    authorization_endpoint,
                    token_endpoint: d.token_endpoint,
                    basic_auth,
                    end_session_endpoint: d.end_session_endpoint,
                }))
            })
            .await
            .cloned()
    }

    /// The provider's endpoints if this generation already fetched them; never waits.
    pub fn cached_provider(&self) -> Option<Arc<Provider>> {
        self.provider.get().cloned()
    }

    /// Exchanges an authorization code (with the client secret, the PKCE verifier and the
    /// resource indicator) for the access token and, when the provider sends one, the ID token.
    pub async fn exchange(
        &self,
        login: &LoginConfig,
        portal: &PortalConfig,
        redirect_uri: &str,
        code: &str,
        verifier: &str,
    ) -> Result<Tokens, ExchangeError> {
        let provider = self
            .provider()
            .await
            .map_err(|e| ExchangeError::Unavailable(format!("{e:#}")))?;
        let token_url = TokenUrl::new(provider.token_endpoint.clone())
            .map_err(|e| ExchangeError::Unavailable(format!("token endpoint: {e}")))?;
        let redirect = RedirectUrl::new(redirect_uri.to_owned())
            .map_err(|e| ExchangeError::Unavailable(format!("redirect URI: {e}")))?;
        let client: CodeClient = Client::new(ClientId::new(portal.client_id.clone()))
            .set_client_secret(ClientSecret::new(portal.client_secret.expose().to_owned()))
            .set_auth_type(if provider.basic_auth {
                AuthType::BasicAuth
            } else {
                AuthType::RequestBody
            })
            .set_token_uri(token_url)
            .set_redirect_uri(redirect);
        let mut req = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()));
        if let Some(r) = &login.resource {
            req = req.add_extra_param("resource", r.as_str());
        }
        let http = self.http.oauth2();
        match req.request_async(&http).await {
            Ok(t) => Ok(Tokens {
                access_token: t.access_token().secret().clone(),
                id_token: t.extra_fields().id_token.clone(),
            }),
            Err(RequestTokenError::ServerResponse(e)) => Err(ExchangeError::Refused {
                error: e.error().to_string(),
                description: e.error_description().cloned().unwrap_or_default(),
            }),
            Err(e) => Err(ExchangeError::Unavailable(error_chain(&e))),
        }
    }
}

/// The token response's fields beyond OAuth 2.0's: OIDC's ID token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OidcFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

impl oauth2::ExtraTokenFields for OidcFields {}

type CodeClient = Client<
    BasicErrorResponse,
    StandardTokenResponse<OidcFields, BasicTokenType>,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// What the token endpoint returned. Debug never prints the tokens.
pub struct Tokens {
    pub access_token: String,
    pub id_token: Option<String>,
}

#[derive(Debug)]
pub enum ExchangeError {
    /// The provider could not be reached or answered nonsense (the detail is for the log).
    Unavailable(String),
    /// The provider answered with an OAuth error (`invalid_grant`, `invalid_client`, …).
    Refused { error: String, description: String },
}

/// The sign-in attempt a login cookie carries between `/-/login` and `/-/callback`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub state: String,
    pub verifier: String,
    pub nonce: String,
    /// Where to go after signing in (already checked by the portal's `safe_next`).
    pub next: String,
    /// Seconds since the epoch; the cookie's Max-Age says the same to the browser.
    pub expires_at: u64,
}

/// PKCE S256: `base64url(SHA-256(verifier))`.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// The authorization request: code flow, PKCE S256, state and nonce, the portal's client, the
/// scopes that make the access token one this relay accepts, and the resource indicator.
pub fn authorization_url(
    endpoint: &str,
    login: &LoginConfig,
    portal: &PortalConfig,
    redirect_uri: &str,
    attempt: &Attempt,
) -> anyhow::Result<url::Url> {
    let mut url = url::Url::parse(endpoint)?;
    let mut scopes: Vec<&str> = vec!["openid", "profile"];
    for s in &login.scopes {
        if !scopes.contains(&s.as_str()) {
            scopes.push(s);
        }
    }
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &portal.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &scopes.join(" "))
            .append_pair("state", &attempt.state)
            .append_pair("nonce", &attempt.nonce)
            .append_pair("code_challenge", &pkce_challenge(&attempt.verifier))
            .append_pair("code_challenge_method", "S256");
        if let Some(r) = &login.resource {
            q.append_pair("resource", r);
        }
    }
    Ok(url)
}

/// Checks the ID token from the token endpoint belongs to this sign-in: its `nonce` is ours
/// and its audience is the portal's client. See the module docs for why the signature is not
/// checked here.
pub fn id_token_matches(id_token: &str, nonce: &str, client_id: &str) -> bool {
    let Some(payload) = id_token.split('.').nth(1) else {
        return false;
    };
    let Some(claims) = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return false;
    };
    let nonce_ok = claims
        .get("nonce")
        .and_then(|n| n.as_str())
        .is_some_and(|n| {
            aws_lc_rs::constant_time::verify_slices_are_equal(n.as_bytes(), nonce.as_bytes())
                .is_ok()
        });
    let aud_ok = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => a == client_id,
        Some(serde_json::Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(client_id)),
        _ => false,
    };
    nonce_ok && aud_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_example() {
        // RFC 7636 appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "e30.{}.sig",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        )
    }

    #[test]
    fn id_token_nonce_and_audience() {
        let t = jwt(serde_json::json!({"nonce": "n1", "aud": "portal"}));
        assert!(id_token_matches(&t, "n1", "portal"));
        assert!(!id_token_matches(&t, "n2", "portal"));
        assert!(!id_token_matches(&t, "n1", "other"));
        let t = jwt(serde_json::json!({"nonce": "n1", "aud": ["x", "portal"]}));
        assert!(id_token_matches(&t, "n1", "portal"));
        assert!(!id_token_matches(
            &jwt(serde_json::json!({"aud": "portal"})),
            "n1",
            "portal"
        ));
        assert!(!id_token_matches("garbage", "n1", "portal"));
    }
}
