//! The dev issuer as a small OAuth 2.0 / OpenID Connect authorization server, so `kube-relay dev`
//! offers the whole sign-in experience (browser portal, `kube-relay token --login browser` and
//! `--login devicecode`) without an external identity provider.
//!
//! Endpoints (under the issuer URL's path, advertised in discovery):
//! - `GET /authorize`: validates the authorization request (RFC 6749 §4.1.1, PKCE RFC 7636) and
//!   shows a "dev sign-in" page: one button per dev user, and Cancel. `POST /authorize` (the
//!   page's form) re-validates everything (the hidden fields came back through the browser) and
//!   redirects with a one-time code, or with `error=access_denied`.
//! - `POST /token`: grants `authorization_code`, `refresh_token` (rotating) and
//!   `urn:ietf:params:oauth:grant-type:device_code` (RFC 8628).
//! - `POST /device/code`: starts a device authorization; `GET /device` / `POST /device`: the page
//!   where a person enters the user code and picks a user (or denies).
//!
//! There is no authentication of people: whoever reaches the page may pick any dev user. That is
//! the point of a dev issuer (the relay's dev users are fictional); everything else follows the
//! RFCs, so the clients exercised against it (the relay's portal and `kube-relay token`) meet
//! the checks a real provider makes: exact or loopback redirect URIs, PKCE S256, one-time codes
//! bound to client + redirect + verifier, client authentication, refresh token rotation.
//!
//! Invariants:
//! - Every store of grants is bounded ([`OAuthConfig::max_pending`], oldest evicted), and request
//!   bodies are read up to [`MAX_BODY`] bytes: a client cannot grow this server's memory.
//! - Nothing panics on network input; the grant store's lock is never held across an await.
//! - A code or device code yields tokens at most once; a code presented twice, or a rotated
//!   refresh token presented again, also revokes the refresh tokens that descend from it (RFC
//!   6749 §4.1.2, RFC 9700 §4.14.2): replay means the token leaked.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use serde_json::{json, Value};

use crate::issuer::DevIssuer;

/// Request bodies (forms) larger than this are refused.
pub const MAX_BODY: usize = 64 * 1024;
/// Authorization codes are short-lived (RFC 6749 §4.1.2 recommends at most 10 minutes).
const CODE_LIFETIME: Duration = Duration::from_secs(60);
/// How long a device code waits for a person.
const DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Refresh tokens last a working day; dev sessions rarely outlive that.
const REFRESH_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// RFC 8628 §3.5: each `slow_down` adds 5 seconds to the polling interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// RFC 8628 §6.1: consonants only (no vowels, so no words and no O/I to mistake for digits; there
/// are no digits either), 20 letters, so 8 of them carry ≈ 34.5 bits.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
const USER_CODE_LEN: usize = 8;
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Scopes every OIDC provider understands; the configured API scopes come on top.
const OIDC_SCOPES: &[&str] = &["openid", "profile", "email", "offline_access"];

/// Mints the access token for a user (the relay must accept it, so the caller decides its
/// shape), with the authentication contexts the sign-in satisfied (for `acrs`; empty: none).
pub type MintAccessToken = Arc<dyn Fn(&str, &[String]) -> String + Send + Sync>;

/// One dev user offered on the sign-in pages.
#[derive(Clone, Debug)]
pub struct DevUser {
    /// The user name; what the access token minter is called with.
    pub name: String,
    /// Shown beside the button (e.g. what the user may do).
    pub description: String,
}

/// A registered client.
#[derive(Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub kind: ClientKind,
}

/// How a client authenticates and where it may be redirected.
#[derive(Clone)]
pub enum ClientKind {
    /// A native app (RFC 8252): no secret, PKCE S256 required, any loopback redirect
    /// `http://127.0.0.1:<port>/…`, `http://[::1]:<port>/…` or `http://localhost:<port>/…`.
    /// May use the device flow.
    PublicLoopback,
    /// A web app: `client_secret_basic` or `client_secret_post`, redirect URIs matched exactly.
    Confidential {
        secret: String,
        redirect_uris: Vec<String>,
    },
}

impl std::fmt::Debug for OAuthClient {
    /// Never prints a client secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            ClientKind::PublicLoopback => "public (loopback)".to_owned(),
            ClientKind::Confidential { redirect_uris, .. } => {
                format!("confidential {redirect_uris:?}")
            }
        };
        f.debug_struct("OAuthClient")
            .field("client_id", &self.client_id)
            .field("kind", &kind)
            .finish()
    }
}

/// What the authorization server offers.
#[derive(Clone)]
pub struct OAuthConfig {
    pub users: Vec<DevUser>,
    pub clients: Vec<OAuthClient>,
    /// Scopes beyond OIDC's that clients may ask for (e.g. the relay's API scope).
    pub api_scopes: Vec<String>,
    /// The audience access tokens carry: the only `resource` (RFC 8707) accepted.
    pub audience: String,
    pub mint_access_token: MintAccessToken,
    /// The access tokens' lifetime, for `expires_in` (the minter sets their `exp`).
    pub access_token_lifetime: Duration,
    /// The device flow's polling interval.
    pub device_interval: Duration,
    /// Upper bound of each store (codes, devices, refresh tokens); the oldest entry is evicted.
    pub max_pending: usize,
}

impl std::fmt::Debug for OAuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthConfig")
            .field("users", &self.users)
            .field("clients", &self.clients)
            .field("api_scopes", &self.api_scopes)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

mod checks;
mod grants;
mod responses;

use checks::*;
use grants::*;
use responses::*;

// === server ===

/// The authorization server behind an issuer's listener (see [`crate::issuer::serve_oauth`]).
pub(crate) struct OAuthServer {
    issuer: DevIssuer,
    config: OAuthConfig,
    /// Request paths (issuer path + suffix) and their absolute URLs.
    paths: Endpoints,
    urls: Endpoints,
    grants: Mutex<Grants>,
}

struct Endpoints {
    authorize: String,
    token: String,
    device_code: String,
    device: String,
}

impl Endpoints {
    fn under(base: &str) -> Self {
        Self {
            authorize: format!("{base}/authorize"),
            token: format!("{base}/token"),
            device_code: format!("{base}/device/code"),
            device: format!("{base}/device"),
        }
    }
}

impl OAuthServer {
    /// `base_path` is the issuer URL's path without a trailing slash.
    pub(crate) fn new(issuer: DevIssuer, config: OAuthConfig, base_path: &str) -> Self {
        let urls = Endpoints::under(issuer.issuer_url().trim_end_matches('/'));
        let max = config.max_pending.max(1);
        Self {
            issuer,
            paths: Endpoints::under(base_path),
            urls,
            grants: Mutex::new(Grants::new(max)),
            config,
        }
    }

    /// Adds the authorization server's metadata to a discovery document.
    pub(crate) fn extend_discovery(&self, doc: &mut Value) {
        let Value::Object(doc) = doc else { return };
        let mut scopes: Vec<String> = OIDC_SCOPES.iter().map(|s| (*s).to_owned()).collect();
        scopes.extend(self.config.api_scopes.iter().cloned());
        let extra = json!({
            "authorization_endpoint": self.urls.authorize,
            "token_endpoint": self.urls.token,
            "device_authorization_endpoint": self.urls.device_code,
            "grant_types_supported": ["authorization_code", "refresh_token", DEVICE_GRANT],
            // Only the code flow: implicit and hybrid flows are not offered.
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "scopes_supported": scopes,
            // RFC 9207: the `iss` on redirects lets clients detect mix-up attacks.
            "authorization_response_iss_parameter_supported": true,
        });
        if let Value::Object(extra) = extra {
            doc.extend(extra);
        }
    }

    /// Whether `path` is one of this server's endpoints.
    pub(crate) fn serves(&self, path: &str) -> bool {
        let p = &self.paths;
        [&p.authorize, &p.token, &p.device_code, &p.device]
            .iter()
            .any(|e| e.as_str() == path)
    }

    /// Answers one request to an endpoint [`serves`](Self::serves) named.
    pub(crate) async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let is_post = parts.method == Method::POST;
        if !(is_post || (parts.method == Method::GET && self.has_page(&path))) {
            let allow = if self.has_page(&path) {
                "GET, POST"
            } else {
                "POST"
            };
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
            return r;
        }
        let params = if is_post {
            if !is_form(&parts.headers) {
                return self.bad_form(&path, "the body must be application/x-www-form-urlencoded");
            }
            let body = match Limited::new(body, MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return self.bad_form(&path, "the body is unreadable or larger than 64 KiB")
                }
            };
            Params::parse(&body)
        } else {
            Params::parse(parts.uri.query().unwrap_or("").as_bytes())
        };
        let now = Instant::now();
        if path == self.paths.token {
            self.token(&parts.headers, &params, now)
        } else if path == self.paths.device_code {
            self.device_authorization(&parts.headers, &params, now)
        } else if path == self.paths.authorize {
            self.authorize(&params, is_post, now)
        } else {
            self.device_page(&params, is_post, now)
        }
    }

    fn has_page(&self, path: &str) -> bool {
        path == self.paths.authorize || path == self.paths.device
    }

    /// A malformed POST: JSON for the API endpoints, a page for the human ones.
    fn bad_form(&self, path: &str, why: &str) -> Response<Full<Bytes>> {
        if self.has_page(path) {
            page(StatusCode::BAD_REQUEST, "Bad request", &escape(why))
        } else {
            OAuthError::new("invalid_request", why).response()
        }
    }

    // --- /authorize ---

    fn authorize(&self, params: &Params, is_post: bool, now: Instant) -> Response<Full<Bytes>> {
        let request = match self.validate_authorization(params) {
            Ok(r) => r,
            Err(AuthzError::Page(why)) => {
                return page(
                    StatusCode::BAD_REQUEST,
                    "Sign-in request refused",
                    &escape(&why),
                )
            }
            Err(AuthzError::Redirect { error, description }) => {
                // Client and redirect URI were valid, so the error goes back to the client.
                return self.redirect_to_client(
                    params.get("redirect_uri").unwrap_or_default(),
                    &[("error", error), ("error_description", &description)],
                    params.get("state"),
                );
            }
        };
        if !is_post {
            return self.authorize_page(&request, params);
        }
        if params.get("action") == Some("cancel") {
            return self.redirect_to_client(
                &request.redirect_uri,
                &[
                    ("error", "access_denied"),
                    ("error_description", "the user cancelled the sign-in"),
                ],
                request.state.as_deref(),
            );
        }
        let Some(user) = params.get("user").filter(|u| self.is_user(u)) else {
            return page(
                StatusCode::BAD_REQUEST,
                "Sign-in request refused",
                "Choose one of the dev users.",
            );
        };
        let code = match random_token() {
            Ok(c) => c,
            Err(e) => return page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &escape(&e.0)),
        };
        let state = request.state.clone();
        let redirect_uri = request.redirect_uri.clone();
        self.lock().codes.insert(
            code.clone(),
            CodeGrant {
                client_id: request.client_id,
                redirect_uri: request.redirect_uri,
                challenge: request.code_challenge,
                user: user.to_owned(),
                scopes: request.scopes,
                nonce: request.nonce,
                acrs: request.acrs,
                expires: now + CODE_LIFETIME,
                consumed: false,
                family: None,
            },
        );
        self.redirect_to_client(&redirect_uri, &[("code", &code)], state.as_deref())
    }

    /// RFC 6749 §4.1.2.1: until client and redirect URI are known good, errors are shown, never
    /// redirected (an open redirector otherwise); after that they go back to the client.
    fn validate_authorization(&self, params: &Params) -> Result<AuthzRequest, AuthzError> {
        params.check_unique().map_err(AuthzError::Page)?;
        let client_id = params
            .get("client_id")
            .ok_or_else(|| AuthzError::Page("no client_id".into()))?;
        let client = self
            .client(client_id)
            .ok_or_else(|| AuthzError::Page(format!("unknown client {client_id:?}")))?;
        let redirect_uri = params
            .get("redirect_uri")
            .ok_or_else(|| AuthzError::Page("no redirect_uri".into()))?;
        if !redirect_allowed(client, redirect_uri) {
            return Err(AuthzError::Page(format!(
                "redirect_uri {redirect_uri:?} is not registered for client {client_id:?}"
            )));
        }
        let redirect = |error: &'static str, description: &str| AuthzError::Redirect {
            error,
            description: description.to_owned(),
        };
        if params.get("response_type") != Some("code") {
            return Err(redirect(
                "unsupported_response_type",
                "only response_type=code is supported",
            ));
        }
        if params.get("response_mode").is_some_and(|m| m != "query") {
            return Err(redirect(
                "invalid_request",
                "only response_mode=query is supported",
            ));
        }
        let code_challenge = match (
            params.get("code_challenge"),
            params.get("code_challenge_method"),
        ) {
            (Some(c), Some("S256")) if is_pkce_value(c) => Some(c.to_owned()),
            (Some(_), Some("S256")) => {
                return Err(redirect(
                    "invalid_request",
                    "code_challenge must be 43-128 characters of [A-Za-z0-9-._~]",
                ))
            }
            (Some(_), _) => {
                // `plain` (the RFC 7636 default when the method is absent) offers no protection
                // against a stolen code, so it is not supported.
                return Err(redirect(
                    "invalid_request",
                    "code_challenge_method must be S256",
                ));
            }
            (None, Some(_)) => {
                return Err(redirect(
                    "invalid_request",
                    "code_challenge_method without code_challenge",
                ))
            }
            (None, None) if matches!(client.kind, ClientKind::PublicLoopback) => {
                return Err(redirect(
                    "invalid_request",
                    "this public client must use PKCE (code_challenge with S256)",
                ))
            }
            (None, None) => None,
        };
        let scopes = self
            .parse_scopes(params.get("scope"))
            .map_err(|why| redirect("invalid_scope", &why))?;
        if let Some(r) = params.get("resource") {
            if r != self.config.audience {
                return Err(redirect(
                    "invalid_target",
                    &format!("unknown resource {r:?}"),
                ));
            }
        }
        let acrs = requested_acrs(params.get("claims"))
            .map_err(|why| redirect("invalid_request", &why))?;
        Ok(AuthzRequest {
            client_id: client.client_id.clone(),
            redirect_uri: redirect_uri.to_owned(),
            scopes,
            acrs,
            state: params.get("state").map(str::to_owned),
            nonce: params.get("nonce").map(str::to_owned),
            code_challenge,
        })
    }

    fn authorize_page(&self, request: &AuthzRequest, params: &Params) -> Response<Full<Bytes>> {
        // The form carries the request back as hidden fields; POST validates it all again.
        let mut hidden = String::new();
        for name in [
            "client_id",
            "redirect_uri",
            "response_type",
            "response_mode",
            "scope",
            "state",
            "nonce",
            "code_challenge",
            "code_challenge_method",
            "resource",
            "claims",
        ] {
            if let Some(v) = params.get(name) {
                hidden.push_str(&format!(
                    r#"<input type="hidden" name="{name}" value="{}">"#,
                    escape(v)
                ));
            }
        }
        let body = format!(
            r#"<p><strong>{client}</strong> asks you to sign in{scopes}.</p>{step_up}
<p>This is the <code>kube-relay dev</code> issuer: pick a dev user, no password needed.</p>
<form method="post" action="{action}">{hidden}
{buttons}
<p><button type="submit" name="action" value="cancel" class="cancel">Cancel</button></p>
</form>"#,
            client = escape(&request.client_id),
            scopes = scope_text(&request.scopes),
            step_up = step_up_text(&request.acrs),
            action = escape(&self.paths.authorize),
            buttons = self.user_buttons(),
        );
        page(StatusCode::OK, "Dev sign-in", &body)
    }

    fn user_buttons(&self) -> String {
        let mut out = String::new();
        for u in &self.config.users {
            out.push_str(&format!(
                r#"<p><button type="submit" name="user" value="{name}">Sign in as {name}</button> <span>{desc}</span></p>
"#,
                name = escape(&u.name),
                desc = escape(&u.description),
            ));
        }
        out
    }

    /// `redirect_uri` plus the response parameters, `state` and `iss` (RFC 9207), as a 303 (the
    /// browser follows a POST's redirect with a GET).
    fn redirect_to_client(
        &self,
        redirect_uri: &str,
        pairs: &[(&str, &str)],
        state: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            query.append_pair(k, v);
        }
        if let Some(s) = state {
            query.append_pair("state", s);
        }
        query.append_pair("iss", &self.issuer.issuer_url());
        let sep = if redirect_uri.contains('?') { '&' } else { '?' };
        let location = format!("{redirect_uri}{sep}{}", query.finish());
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        match header::HeaderValue::from_str(&location) {
            Ok(v) => {
                r.headers_mut().insert(header::LOCATION, v);
            }
            // The redirect URI was validated and the query is percent-encoded, so this is
            // unreachable; refuse rather than panic.
            Err(_) => return plain(StatusCode::BAD_REQUEST, "redirect URI not usable"),
        }
        no_store(&mut r);
        r
    }

    // --- /token ---

    fn token(&self, headers: &HeaderMap, params: &Params, now: Instant) -> Response<Full<Bytes>> {
        match self.token_grant(headers, params, now) {
            Ok(issued) => self.token_response(issued),
            Err(e) => e.response(),
        }
    }

    /// Resolves a token request to what to issue; tokens themselves are minted outside the lock.
    fn token_grant(
        &self,
        headers: &HeaderMap,
        params: &Params,
        now: Instant,
    ) -> Result<Issue, OAuthError> {
        params
            .check_unique()
            .map_err(|m| OAuthError::new("invalid_request", &m))?;
        let client = self.authenticate_client(headers, params)?;
        if let Some(r) = params.get("resource") {
            if r != self.config.audience {
                return Err(OAuthError::new(
                    "invalid_target",
                    &format!("unknown resource {r:?}"),
                ));
            }
        }
        let grant_type = params
            .get("grant_type")
            .ok_or_else(|| OAuthError::new("invalid_request", "no grant_type"))?;
        match grant_type {
            "authorization_code" => self.code_grant(client, params, now),
            "refresh_token" => self.refresh_grant(client, params, now),
            DEVICE_GRANT => {
                if !matches!(client.kind, ClientKind::PublicLoopback) {
                    return Err(OAuthError::new(
                        "unauthorized_client",
                        "this client may not use the device flow",
                    ));
                }
                self.device_grant(client, params, now)
            }
            other => Err(OAuthError::new(
                "unsupported_grant_type",
                &format!("grant_type {other:?} is not supported"),
            )),
        }
    }

    fn code_grant(
        &self,
        client: &OAuthClient,
        params: &Params,
        now: Instant,
    ) -> Result<Issue, OAuthError> {
        let code = params
            .get("code")
            .ok_or_else(|| OAuthError::new("invalid_request", "no code"))?;
        let mut grants = self.lock();
        let Some(grant) = grants.codes.get_mut(code) else {
            return Err(invalid_grant("unknown or expired code"));
        };
        if grant.consumed {
            // Replay: whoever holds this code now is not who redeemed it first; revoke what the
            // first redemption produced.
            if let Some(family) = grant.family {
                grants.revoke_family(family);
            }
            return Err(invalid_grant("the code was already used"));
        }
        // Any presentation uses the code up, so a wrong verifier cannot be retried at leisure.
        grant.consumed = true;
        if now >= grant.expires {
            return Err(invalid_grant("the code expired"));
        }
        if grant.client_id != client.client_id {
            return Err(invalid_grant("the code was issued to another client"));
        }
        if params.get("redirect_uri") != Some(grant.redirect_uri.as_str()) {
            return Err(invalid_grant(
                "redirect_uri differs from the authorization request's",
            ));
        }
        match (&grant.challenge, params.get("code_verifier")) {
            (Some(challenge), Some(verifier)) => {
                if !pkce_matches(challenge, verifier) {
                    return Err(invalid_grant("code_verifier does not match code_challenge"));
                }
            }
            (Some(_), None) => return Err(invalid_grant("code_verifier is required")),
            // RFC 9700 §2.1.1: a verifier for a code issued without a challenge means someone
            // is injecting a code into another flow.
            (None, Some(_)) => {
                return Err(invalid_grant("no code_challenge was sent for this code"))
            }
            (None, None) => {}
        }
        let family = grants.next_family();
        let grant = grants
            .codes
            .get_mut(code)
            .ok_or_else(|| invalid_grant("unknown or expired code"))?;
        grant.family = Some(family);
        let issue = Issue {
            client_id: grant.client_id.clone(),
            user: grant.user.clone(),
            granted: grant.scopes.clone(),
            scopes: grant.scopes.clone(),
            nonce: grant.nonce.clone(),
            acrs: grant.acrs.clone(),
            family,
            refresh_token: None,
        };
        grants.finish(issue, now)
    }

    fn refresh_grant(
        &self,
        client: &OAuthClient,
        params: &Params,
        now: Instant,
    ) -> Result<Issue, OAuthError> {
        let token = params
            .get("refresh_token")
            .ok_or_else(|| OAuthError::new("invalid_request", "no refresh_token"))?;
        let mut grants = self.lock();
        let Some(grant) = grants.refresh.remove(token) else {
            if let Some(family) = grants.retired.remove(token) {
                grants.revoke_family(family);
                return Err(invalid_grant(
                    "the refresh token was already used; its session is revoked",
                ));
            }
            return Err(invalid_grant("unknown, expired or revoked refresh token"));
        };
        if grant.client_id != client.client_id {
            // Put it back: another client presenting it must not end the owner's session.
            grants.refresh.insert(token.to_owned(), grant);
            return Err(invalid_grant(
                "the refresh token was issued to another client",
            ));
        }
        if now >= grant.expires {
            return Err(invalid_grant("the refresh token expired"));
        }
        // RFC 6749 §6: a narrower scope may be asked; never a wider one.
        let scopes = match params.get("scope") {
            None => grant.scopes.clone(),
            Some(s) => {
                let asked = self
                    .parse_scopes(Some(s))
                    .map_err(|why| OAuthError::new("invalid_scope", &why))?;
                if let Some(extra) = asked.iter().find(|s| !grant.scopes.contains(s)) {
                    grants.refresh.insert(token.to_owned(), grant);
                    return Err(OAuthError::new(
                        "invalid_scope",
                        &format!("{extra:?} was not granted originally"),
                    ));
                }
                asked
            }
        };
        // A refresh cannot add a step-up the sign-in did not do: like Entra, ask for a new
        // interactive sign-in.
        let asked_acrs = match requested_acrs(params.get("claims")) {
            Ok(a) => a,
            Err(why) => {
                grants.refresh.insert(token.to_owned(), grant);
                return Err(OAuthError::new("invalid_request", &why));
            }
        };
        if let Some(missing) = asked_acrs.iter().find(|a| !grant.acrs.contains(a)) {
            grants.refresh.insert(token.to_owned(), grant);
            return Err(OAuthError::new(
                "interaction_required",
                &format!("authentication context {missing} needs a new sign-in"),
            ));
        }
        grants.retired.insert(token.to_owned(), grant.family);
        let issue = Issue {
            client_id: grant.client_id,
            user: grant.user,
            granted: grant.scopes,
            scopes,
            nonce: None,
            acrs: grant.acrs,
            family: grant.family,
            refresh_token: None,
        };
        grants.finish(issue, now)
    }

    fn device_grant(
        &self,
        client: &OAuthClient,
        params: &Params,
        now: Instant,
    ) -> Result<Issue, OAuthError> {
        let device_code = params
            .get("device_code")
            .ok_or_else(|| OAuthError::new("invalid_request", "no device_code"))?;
        let mut grants = self.lock();
        let Some(device) = grants.devices.get_mut(device_code) else {
            return Err(invalid_grant("unknown device_code"));
        };
        if device.client_id != client.client_id {
            return Err(invalid_grant(
                "the device_code was issued to another client",
            ));
        }
        // A decision is answered however fast the client polls: it waited long enough already.
        match &device.status {
            _ if now >= device.expires => {
                grants.devices.remove(device_code);
                Err(OAuthError::new(
                    "expired_token",
                    "the device code expired; start again",
                ))
            }
            DeviceStatus::Denied => {
                grants.devices.remove(device_code);
                Err(OAuthError::new(
                    "access_denied",
                    "the user denied the sign-in",
                ))
            }
            DeviceStatus::Approved(_) => {
                let Some(device) = grants.devices.remove(device_code) else {
                    return Err(invalid_grant("unknown device_code"));
                };
                let DeviceStatus::Approved(user) = device.status else {
                    return Err(invalid_grant("unknown device_code"));
                };
                let family = grants.next_family();
                let issue = Issue {
                    client_id: device.client_id,
                    user,
                    granted: device.scopes.clone(),
                    scopes: device.scopes,
                    nonce: None,
                    acrs: device.acrs,
                    family,
                    refresh_token: None,
                };
                grants.finish(issue, now)
            }
            DeviceStatus::Pending => {
                // A quarter of the interval of slack: polls sent exactly `interval` apart can
                // arrive a little closer together.
                let too_fast = device
                    .last_poll
                    .is_some_and(|last| now.duration_since(last) < device.interval * 3 / 4);
                device.last_poll = Some(now);
                if too_fast {
                    device.interval += SLOW_DOWN_STEP;
                    Err(OAuthError::new(
                        "slow_down",
                        &format!("poll at most every {} seconds", device.interval.as_secs()),
                    ))
                } else {
                    Err(OAuthError::new(
                        "authorization_pending",
                        "waiting for the user to sign in",
                    ))
                }
            }
        }
    }

    /// Mints the tokens of a resolved grant and renders RFC 6749 §5.1's answer.
    fn token_response(&self, issue: Issue) -> Response<Full<Bytes>> {
        let access_token = (self.config.mint_access_token)(&issue.user, &issue.acrs);
        let mut body = json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": self.config.access_token_lifetime.as_secs(),
            "scope": issue.scopes.join(" "),
        });
        if let Some(rt) = &issue.refresh_token {
            body["refresh_token"] = json!(rt);
        }
        if issue.scopes.iter().any(|s| s == "openid") {
            body["id_token"] = json!(self.id_token(&issue));
        }
        let mut r = json_response(StatusCode::OK, &body);
        no_store(&mut r);
        r
    }

    /// OIDC Core §2: `aud` is the client, `nonce` echoes the authorization request's.
    fn id_token(&self, issue: &Issue) -> String {
        let now = unix_now();
        let mut claims = json!({
            "sub": issue.user,
            "aud": issue.client_id,
            "azp": issue.client_id,
            "iat": now,
            "nbf": now,
            "exp": now + self.config.access_token_lifetime.as_secs(),
            "auth_time": now,
        });
        if let Some(n) = &issue.nonce {
            claims["nonce"] = json!(n);
        }
        if issue.scopes.iter().any(|s| s == "profile") {
            claims["name"] = json!(issue.user);
            claims["preferred_username"] = json!(issue.user);
        }
        self.issuer.mint(claims)
    }

    /// RFC 6749 §2.3.1: HTTP Basic (form-encoded id and secret) or the body, never both; public
    /// clients send only `client_id`.
    fn authenticate_client(
        &self,
        headers: &HeaderMap,
        params: &Params,
    ) -> Result<&OAuthClient, OAuthError> {
        let basic = match headers.get(header::AUTHORIZATION) {
            None => None,
            Some(v) => Some(parse_basic(v).ok_or_else(|| {
                OAuthError::invalid_client("the Authorization header is not HTTP Basic")
            })?),
        };
        let (client_id, secret) = match (basic, params.get("client_secret")) {
            (Some(_), Some(_)) => {
                return Err(OAuthError::new(
                    "invalid_request",
                    "client credentials in both the Authorization header and the body",
                ))
            }
            (Some((id, secret)), None) => {
                if params.get("client_id").is_some_and(|b| b != id) {
                    return Err(OAuthError::invalid_client(
                        "client_id differs from the Authorization header's",
                    ));
                }
                (id, Some(secret))
            }
            (None, secret) => {
                let id = params
                    .get("client_id")
                    .ok_or_else(|| OAuthError::invalid_client("no client authentication"))?;
                (id.to_owned(), secret.map(str::to_owned))
            }
        };
        let client = self
            .client(&client_id)
            .ok_or_else(|| OAuthError::invalid_client("unknown client"))?;
        match (&client.kind, secret) {
            (ClientKind::PublicLoopback, None) => Ok(client),
            (ClientKind::PublicLoopback, Some(_)) => Err(OAuthError::invalid_client(
                "this public client has no secret",
            )),
            (
                ClientKind::Confidential {
                    secret: expected, ..
                },
                Some(given),
            ) if aws_lc_rs::constant_time::verify_slices_are_equal(
                expected.as_bytes(),
                given.as_bytes(),
            )
            .is_ok() =>
            {
                Ok(client)
            }
            (ClientKind::Confidential { .. }, _) => {
                Err(OAuthError::invalid_client("wrong or missing client secret"))
            }
        }
    }

    // --- device flow ---

    fn device_authorization(
        &self,
        headers: &HeaderMap,
        params: &Params,
        now: Instant,
    ) -> Response<Full<Bytes>> {
        match self.start_device(headers, params, now) {
            Ok(body) => {
                let mut r = json_response(StatusCode::OK, &body);
                no_store(&mut r);
                r
            }
            Err(e) => e.response(),
        }
    }

    fn start_device(
        &self,
        headers: &HeaderMap,
        params: &Params,
        now: Instant,
    ) -> Result<Value, OAuthError> {
        params
            .check_unique()
            .map_err(|m| OAuthError::new("invalid_request", &m))?;
        let client = self.authenticate_client(headers, params)?;
        if !matches!(client.kind, ClientKind::PublicLoopback) {
            return Err(OAuthError::new(
                "unauthorized_client",
                "this client may not use the device flow",
            ));
        }
        let scopes = self
            .parse_scopes(params.get("scope"))
            .map_err(|why| OAuthError::new("invalid_scope", &why))?;
        if let Some(r) = params.get("resource") {
            if r != self.config.audience {
                return Err(OAuthError::new(
                    "invalid_target",
                    &format!("unknown resource {r:?}"),
                ));
            }
        }
        let acrs = requested_acrs(params.get("claims"))
            .map_err(|why| OAuthError::new("invalid_request", &why))?;
        let device_code = random_token().map_err(OAuthError::server)?;
        let mut grants = self.lock();
        // Unique among live devices, so a typed code names exactly one.
        let user_code = loop {
            let c = new_user_code().map_err(OAuthError::server)?;
            if grants.device_by_user_code(&c).is_none() {
                break c;
            }
        };
        let interval = self.config.device_interval.max(Duration::from_secs(1));
        grants.devices.insert(
            device_code.clone(),
            DeviceGrant {
                client_id: client.client_id.clone(),
                user_code: user_code.clone(),
                scopes,
                acrs,
                expires: now + DEVICE_CODE_LIFETIME,
                interval,
                last_poll: None,
                status: DeviceStatus::Pending,
            },
        );
        let shown = format_user_code(&user_code);
        Ok(json!({
            "device_code": device_code,
            "user_code": shown,
            "verification_uri": self.urls.device,
            "verification_uri_complete": format!("{}?user_code={shown}", self.urls.device),
            "expires_in": DEVICE_CODE_LIFETIME.as_secs(),
            "interval": interval.as_secs(),
        }))
    }

    fn device_page(&self, params: &Params, is_post: bool, now: Instant) -> Response<Full<Bytes>> {
        let typed = params.get("user_code").unwrap_or_default();
        if !is_post {
            // Say what the code would authorize, when it names a waiting device.
            let about = {
                let grants = self.lock();
                normalize_user_code(typed)
                    .and_then(|c| grants.device_by_user_code(&c).map(|(_, d)| d))
                    .filter(|d| d.status == DeviceStatus::Pending && now < d.expires)
                    .map(|d| {
                        format!(
                            "<p><strong>{}</strong> asks you to sign in{}.</p>",
                            escape(&d.client_id),
                            scope_text(&d.scopes)
                        )
                    })
                    .unwrap_or_default()
            };
            let body = format!(
                r#"{about}<p>Enter the code your device shows, then pick a dev user (no password needed).</p>
<form method="post" action="{action}">
<p><label>Code <input name="user_code" value="{code}" autocomplete="off" autofocus required></label></p>
{buttons}
<p><button type="submit" name="action" value="deny" class="cancel">Deny</button></p>
</form>"#,
                action = escape(&self.paths.device),
                code = escape(typed),
                buttons = self.user_buttons(),
            );
            return page(StatusCode::OK, "Dev sign-in: device", &body);
        }
        let deny = params.get("action") == Some("deny");
        let user = params.get("user").filter(|u| self.is_user(u));
        if !deny && user.is_none() {
            return page(
                StatusCode::BAD_REQUEST,
                "Sign-in refused",
                "Choose one of the dev users, or Deny.",
            );
        }
        let mut grants = self.lock();
        let found = normalize_user_code(typed)
            .and_then(|c| grants.device_by_user_code(&c).map(|(k, _)| k.to_owned()));
        let Some(device) = found.and_then(|k| grants.devices.get_mut(&k)) else {
            return page(
                StatusCode::BAD_REQUEST,
                "Unknown code",
                "That code is unknown, expired or already used. Start the sign-in on your device again.",
            );
        };
        if device.status != DeviceStatus::Pending || now >= device.expires {
            return page(
                StatusCode::BAD_REQUEST,
                "Unknown code",
                "That code is unknown, expired or already used. Start the sign-in on your device again.",
            );
        }
        match user {
            Some(u) if !deny => {
                device.status = DeviceStatus::Approved(u.to_owned());
                page(
                    StatusCode::OK,
                    "Signed in",
                    &format!(
                        "Signed in as <strong>{}</strong>. Return to your device; you can close this tab.",
                        escape(u)
                    ),
                )
            }
            _ => {
                device.status = DeviceStatus::Denied;
                page(
                    StatusCode::OK,
                    "Sign-in denied",
                    "The device will be told the sign-in was denied.",
                )
            }
        }
    }

    // --- helpers ---

    fn client(&self, client_id: &str) -> Option<&OAuthClient> {
        self.config
            .clients
            .iter()
            .find(|c| c.client_id == client_id)
    }

    fn is_user(&self, name: &str) -> bool {
        self.config.users.iter().any(|u| u.name == name)
    }

    /// Space-separated scopes (RFC 6749 §3.3), each known; duplicates collapse.
    fn parse_scopes(&self, scope: Option<&str>) -> Result<Vec<String>, String> {
        let mut out: Vec<String> = Vec::new();
        for s in scope
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
        {
            let known = OIDC_SCOPES.contains(&s) || self.config.api_scopes.iter().any(|a| a == s);
            if !known {
                return Err(format!("unknown scope {s:?}"));
            }
            if !out.iter().any(|o| o == s) {
                out.push(s.to_owned());
            }
        }
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Grants> {
        // Every critical section leaves the maps consistent (single inserts and removes), so a
        // poisoned lock is still safe to use.
        self.grants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The authentication contexts an OIDC `claims` request parameter asks to be in the access
/// token's `acrs`, as Entra's step-up challenges phrase it:
/// `{"access_token":{"acrs":{"essential":true,"value":"c1"}}}` (or `"values": [...]`). The dev
/// issuer has no second factor: it notes the step-up on the sign-in page and grants it.
fn requested_acrs(claims: Option<&str>) -> Result<Vec<String>, String> {
    let Some(text) = claims else {
        return Ok(Vec::new());
    };
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("claims is not a JSON object: {e}"))?;
    let Some(acrs) = v.get("access_token").and_then(|a| a.get("acrs")) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<String> = Vec::new();
    if let Some(one) = acrs.get("value").and_then(Value::as_str) {
        out.push(one.to_owned());
    }
    if let Some(many) = acrs.get("values").and_then(Value::as_array) {
        out.extend(many.iter().filter_map(Value::as_str).map(str::to_owned));
    }
    if out
        .iter()
        .any(|a| a.is_empty() || a.len() > 64 || !a.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return Err("claims: acrs values must be short alphanumeric ids such as c1".into());
    }
    Ok(out)
}

/// The sign-in page's note on a step-up request.
fn step_up_text(acrs: &[String]) -> String {
    if acrs.is_empty() {
        return String::new();
    }
    format!(
        "\n<p class=\"step-up\">Step-up requested: authentication context <strong>{}</strong> (the dev issuer grants it on sign-in).</p>",
        escape(&acrs.join(", "))
    )
}

/// A validated authorization request.
struct AuthzRequest {
    client_id: String,
    redirect_uri: String,
    scopes: Vec<String>,
    /// Authentication contexts asked for by the `claims` parameter (step-up).
    acrs: Vec<String>,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: Option<String>,
}

enum AuthzError {
    Page(String),
    Redirect {
        error: &'static str,
        description: String,
    },
}

// === errors ===

/// An OAuth error response (RFC 6749 §5.2, RFC 8628 §3.5).
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OAuthError {
    fn new(error: &'static str, description: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.to_owned(),
        }
    }

    fn invalid_client(description: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            ..Self::new("invalid_client", description)
        }
    }

    fn server(e: RandomError) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            ..Self::new("server_error", &e.0)
        }
    }

    fn response(&self) -> Response<Full<Bytes>> {
        let mut r = json_response(
            self.status,
            &json!({"error": self.error, "error_description": self.description}),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6749 §5.2: a 401 names the scheme the client should authenticate with.
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(r#"Basic realm="kube-relay dev issuer""#),
            );
        }
        no_store(&mut r);
        r
    }
}

fn invalid_grant(description: &str) -> OAuthError {
    OAuthError::new("invalid_grant", description)
}

#[derive(Debug)]
struct RandomError(String);

#[cfg(test)]
mod tests {
    use super::*;

    use crate::issuer::KeyAlg;

    const ISSUER: &str = "https://127.0.0.1:9/base";
    const CLI: &str = "cli";
    const PORTAL: &str = "portal";
    const PORTAL_REDIRECT: &str = "https://relay.test/-/callback";
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    fn server_with(max: usize) -> OAuthServer {
        let issuer = DevIssuer::generate(ISSUER, KeyAlg::Es256).unwrap();
        let minter = issuer.clone();
        OAuthServer::new(
            issuer,
            OAuthConfig {
                users: ["alice", "bob"]
                    .iter()
                    .map(|u| DevUser {
                        name: (*u).to_owned(),
                        description: format!("<{u}>"),
                    })
                    .collect(),
                clients: vec![
                    OAuthClient {
                        client_id: CLI.into(),
                        kind: ClientKind::PublicLoopback,
                    },
                    OAuthClient {
                        client_id: PORTAL.into(),
                        kind: ClientKind::Confidential {
                            secret: "s3cret".into(),
                            redirect_uris: vec![PORTAL_REDIRECT.into()],
                        },
                    },
                ],
                api_scopes: vec!["kube-relay".into()],
                audience: "kube-relay".into(),
                mint_access_token: Arc::new(move |user, _acrs| {
                    minter.mint(json!({"sub": user, "aud": "kube-relay"}))
                }),
                access_token_lifetime: Duration::from_secs(3600),
                device_interval: Duration::from_secs(2),
                max_pending: max,
            },
            "/base",
        )
    }

    fn server() -> OAuthServer {
        server_with(16)
    }

    fn form(pairs: &[(&str, &str)]) -> Params {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            s.append_pair(k, v);
        }
        Params::parse(s.finish().as_bytes())
    }

    fn basic(id: &str, secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
                .parse()
                .unwrap(),
        );
        h
    }

    fn location(r: &Response<Full<Bytes>>) -> String {
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        r.headers()[header::LOCATION].to_str().unwrap().to_owned()
    }

    fn query_of(url: &str) -> BTreeMap<String, String> {
        let q = url.split_once('?').map_or("", |(_, q)| q);
        form_urlencoded::parse(q.as_bytes()).into_owned().collect()
    }

    /// Authorizes `alice` for the CLI client at `redirect`; returns the code.
    fn cli_code(s: &OAuthServer, redirect: &str, scope: &str, now: Instant) -> String {
        let r = s.authorize(
            &form(&[
                ("client_id", CLI),
                ("redirect_uri", redirect),
                ("response_type", "code"),
                ("scope", scope),
                ("state", "st"),
                ("nonce", "n0nce"),
                ("code_challenge", CHALLENGE),
                ("code_challenge_method", "S256"),
                ("user", "alice"),
            ]),
            true,
            now,
        );
        let q = query_of(&location(&r));
        assert_eq!(q["state"], "st");
        assert_eq!(q["iss"], ISSUER);
        q["code"].clone()
    }

    fn exchange(
        s: &OAuthServer,
        code: &str,
        redirect: &str,
        verifier: &str,
        now: Instant,
    ) -> Result<Issue, OAuthError> {
        s.token_grant(
            &HeaderMap::new(),
            &form(&[
                ("grant_type", "authorization_code"),
                ("client_id", CLI),
                ("code", code),
                ("redirect_uri", redirect),
                ("code_verifier", verifier),
            ]),
            now,
        )
    }

    fn body_text(r: Response<Full<Bytes>>) -> String {
        let body = futures_util::FutureExt::now_or_never(r.into_body().collect())
            .unwrap()
            .unwrap()
            .to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[test]
    fn pkce_s256_check() {
        // RFC 7636 appendix B.
        assert!(pkce_matches(CHALLENGE, VERIFIER));
        assert!(!pkce_matches(CHALLENGE, &VERIFIER.replace('d', "e")));
        assert!(!pkce_matches(CHALLENGE, "short"));
        // `plain` is not accepted: the challenge itself is not a verifier for itself.
        assert!(!pkce_matches(CHALLENGE, CHALLENGE));
        assert!(is_pkce_value(CHALLENGE));
        assert!(!is_pkce_value(&"a".repeat(129)));
        assert!(!is_pkce_value(&format!("{}+", &VERIFIER[..43])));
    }

    #[test]
    fn a_code_is_good_once_and_a_replay_revokes_its_refresh_token() {
        let s = server();
        let now = Instant::now();
        let redirect = "http://127.0.0.1:4242/callback";
        let code = cli_code(&s, redirect, "kube-relay openid offline_access", now);
        let issued = exchange(&s, &code, redirect, VERIFIER, now).unwrap();
        assert_eq!(issued.user, "alice");
        assert_eq!(issued.nonce.as_deref(), Some("n0nce"));
        let rt = issued.refresh_token.clone().unwrap();
        let again = exchange(&s, &code, redirect, VERIFIER, now).unwrap_err();
        assert_eq!(again.error, "invalid_grant");
        // The replay revoked the first redemption's refresh token.
        let refreshed = s.token_grant(
            &HeaderMap::new(),
            &form(&[
                ("grant_type", "refresh_token"),
                ("client_id", CLI),
                ("refresh_token", &rt),
            ]),
            now,
        );
        assert_eq!(refreshed.unwrap_err().error, "invalid_grant");

        // The full response: access token, id_token with the nonce, refresh token.
        let code = cli_code(&s, redirect, "kube-relay openid offline_access", now);
        let r = s.token(
            &HeaderMap::new(),
            &form(&[
                ("grant_type", "authorization_code"),
                ("client_id", CLI),
                ("code", &code),
                ("redirect_uri", redirect),
                ("code_verifier", VERIFIER),
            ]),
            now,
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let v: Value = serde_json::from_str(&body_text(r)).unwrap();
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 3600);
        assert!(v["refresh_token"].is_string());
        let id: Value =
            jsonwebtoken::dangerous::insecure_decode_claims(v["id_token"].as_str().unwrap())
                .unwrap();
        assert_eq!(id["nonce"], "n0nce");
        assert_eq!(id["aud"], CLI);
        assert_eq!(id["sub"], "alice");
        let at: Value =
            jsonwebtoken::dangerous::insecure_decode_claims(v["access_token"].as_str().unwrap())
                .unwrap();
        assert_eq!(at["aud"], "kube-relay");
    }

    #[test]
    fn wrong_verifier_burns_the_code_and_expired_codes_are_refused() {
        let s = server();
        let now = Instant::now();
        let redirect = "http://localhost:5000/cb";
        let code = cli_code(&s, redirect, "openid", now);
        let wrong = "x".repeat(43);
        assert_eq!(
            exchange(&s, &code, redirect, &wrong, now)
                .unwrap_err()
                .error,
            "invalid_grant"
        );
        assert_eq!(
            exchange(&s, &code, redirect, VERIFIER, now)
                .unwrap_err()
                .error,
            "invalid_grant",
            "a failed attempt uses the code up"
        );
        let code = cli_code(&s, redirect, "openid", now);
        let later = now + CODE_LIFETIME + Duration::from_secs(1);
        assert_eq!(
            exchange(&s, &code, redirect, VERIFIER, later)
                .unwrap_err()
                .description,
            "the code expired"
        );
        // No refresh token without offline_access.
        let code = cli_code(&s, redirect, "openid", now);
        let issued = exchange(&s, &code, redirect, VERIFIER, now).unwrap();
        assert!(issued.refresh_token.is_none());
    }

    #[test]
    fn wrong_redirects_are_refused_at_both_ends() {
        let s = server();
        let now = Instant::now();
        let authorize = |client: &str, redirect: &str| {
            s.authorize(
                &form(&[
                    ("client_id", client),
                    ("redirect_uri", redirect),
                    ("response_type", "code"),
                    ("code_challenge", CHALLENGE),
                    ("code_challenge_method", "S256"),
                ]),
                false,
                now,
            )
        };
        for (client, bad) in [
            (CLI, "http://evil.test:80/callback"),
            (CLI, "https://127.0.0.1:80/callback"),
            (CLI, "http://127.0.0.1/callback"),
            (CLI, "http://127.0.0.1:0/callback"),
            (CLI, "http://127.0.0.1:80@evil.test/callback"),
            (CLI, "http://127.0.0.1:80/callback#frag"),
            (CLI, "http://127.0.0.1.evil.test:80/"),
            (PORTAL, "https://relay.test/-/callback/other"),
            (PORTAL, "http://127.0.0.1:80/callback"),
            ("nobody", "http://127.0.0.1:80/callback"),
        ] {
            // Shown, never redirected: an unregistered URI must not become an open redirect.
            let r = authorize(client, bad);
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{client} {bad}");
            assert!(r.headers().get(header::LOCATION).is_none());
        }
        for (client, good) in [
            (CLI, "http://127.0.0.1:1234/callback"),
            (CLI, "http://localhost:65535/"),
            (CLI, "http://[::1]:8080/cb?x=1"),
            (PORTAL, PORTAL_REDIRECT),
        ] {
            let r = authorize(client, good);
            assert_eq!(r.status(), StatusCode::OK, "{client} {good}");
            let page = body_text(r);
            assert!(page.contains(r#"value="alice""#), "{page}");
            assert!(page.contains("&lt;bob&gt;"), "descriptions are escaped");
        }

        // The token request must name the same redirect URI.
        let code = cli_code(&s, "http://127.0.0.1:1111/callback", "", now);
        let e = exchange(&s, &code, "http://127.0.0.1:2222/callback", VERIFIER, now).unwrap_err();
        assert_eq!(e.error, "invalid_grant");
    }

    #[test]
    fn authorization_errors_after_the_redirect_checks_go_back_to_the_client() {
        let s = server();
        let now = Instant::now();
        let redirect = "http://127.0.0.1:7/cb";
        let base = [
            ("client_id", CLI),
            ("redirect_uri", redirect),
            ("state", "s1"),
        ];
        let error_of = |extra: &[(&str, &str)]| {
            let mut p: Vec<(&str, &str)> = base.to_vec();
            p.extend_from_slice(extra);
            let q = query_of(&location(&s.authorize(&form(&p), false, now)));
            assert_eq!(q["state"], "s1");
            q["error"].clone()
        };
        let pkce = [
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ];
        assert_eq!(
            error_of(&[("response_type", "token")]),
            "unsupported_response_type"
        );
        assert_eq!(
            error_of(&[("response_type", "code")]),
            "invalid_request",
            "PKCE is required for the public client"
        );
        assert_eq!(
            error_of(&[
                ("response_type", "code"),
                ("code_challenge", CHALLENGE),
                ("code_challenge_method", "plain")
            ]),
            "invalid_request"
        );
        let mut with_scope = vec![("response_type", "code"), ("scope", "openid admin")];
        with_scope.extend_from_slice(&pkce);
        assert_eq!(error_of(&with_scope), "invalid_scope");

        // Cancel → access_denied with the state.
        let mut cancel = base.to_vec();
        cancel.extend_from_slice(&[("response_type", "code"), ("action", "cancel")]);
        cancel.extend_from_slice(&pkce);
        let q = query_of(&location(&s.authorize(&form(&cancel), true, now)));
        assert_eq!(q["error"], "access_denied");
        assert_eq!(q["state"], "s1");
        // An unknown user is refused, not signed in.
        let mut mallory = base.to_vec();
        mallory.extend_from_slice(&[("response_type", "code"), ("user", "mallory")]);
        mallory.extend_from_slice(&pkce);
        assert_eq!(
            s.authorize(&form(&mallory), true, now).status(),
            StatusCode::BAD_REQUEST
        );
        // Repeated parameters are refused outright.
        let twice = Params::parse(b"client_id=cli&client_id=portal");
        assert_eq!(
            s.authorize(&twice, false, now).status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn the_confidential_client_authenticates_one_way_only() {
        let s = server();
        let now = Instant::now();
        let code_for_portal = || {
            let r = s.authorize(
                &form(&[
                    ("client_id", PORTAL),
                    ("redirect_uri", PORTAL_REDIRECT),
                    ("response_type", "code"),
                    ("scope", "openid profile kube-relay"),
                    ("code_challenge", CHALLENGE),
                    ("code_challenge_method", "S256"),
                    ("user", "bob"),
                ]),
                true,
                now,
            );
            query_of(&location(&r))["code"].clone()
        };
        let req = |code: &str| {
            vec![
                ("grant_type", "authorization_code".to_owned()),
                ("code", code.to_owned()),
                ("redirect_uri", PORTAL_REDIRECT.to_owned()),
                ("code_verifier", VERIFIER.to_owned()),
            ]
        };
        let p = |v: &[(&str, String)]| {
            let pairs: Vec<(&str, &str)> = v.iter().map(|(k, v)| (*k, v.as_str())).collect();
            form(&pairs)
        };
        // Basic.
        let issued = s
            .token_grant(&basic(PORTAL, "s3cret"), &p(&req(&code_for_portal())), now)
            .unwrap();
        assert_eq!(issued.user, "bob");
        // Post.
        let mut post = req(&code_for_portal());
        post.push(("client_id", PORTAL.into()));
        post.push(("client_secret", "s3cret".into()));
        assert!(s.token_grant(&HeaderMap::new(), &p(&post), now).is_ok());
        // Wrong secret, no secret, both methods at once.
        let e = s
            .token_grant(&basic(PORTAL, "nope"), &p(&req(&code_for_portal())), now)
            .unwrap_err();
        assert_eq!(
            (e.error, e.status),
            ("invalid_client", StatusCode::UNAUTHORIZED)
        );
        let mut none = req(&code_for_portal());
        none.push(("client_id", PORTAL.into()));
        assert_eq!(
            s.token_grant(&HeaderMap::new(), &p(&none), now)
                .unwrap_err()
                .error,
            "invalid_client"
        );
        let mut both = req(&code_for_portal());
        both.push(("client_secret", "s3cret".into()));
        assert_eq!(
            s.token_grant(&basic(PORTAL, "s3cret"), &p(&both), now)
                .unwrap_err()
                .error,
            "invalid_request"
        );
        // The portal's code is useless to the CLI client.
        let mut cli = req(&code_for_portal());
        cli.push(("client_id", CLI.into()));
        assert_eq!(
            s.token_grant(&HeaderMap::new(), &p(&cli), now)
                .unwrap_err()
                .error,
            "invalid_grant"
        );
    }

    fn refresh(s: &OAuthServer, client: &str, rt: &str, now: Instant) -> Result<Issue, OAuthError> {
        s.token_grant(
            &HeaderMap::new(),
            &form(&[
                ("grant_type", "refresh_token"),
                ("client_id", client),
                ("refresh_token", rt),
            ]),
            now,
        )
    }

    #[test]
    fn refresh_tokens_rotate_and_reuse_revokes_the_session() {
        let s = server();
        let now = Instant::now();
        let redirect = "http://127.0.0.1:4242/callback";
        let code = cli_code(&s, redirect, "kube-relay offline_access", now);
        let rt1 = exchange(&s, &code, redirect, VERIFIER, now)
            .unwrap()
            .refresh_token
            .unwrap();
        let second = refresh(&s, CLI, &rt1, now).unwrap();
        assert_eq!(second.user, "alice");
        let rt2 = second.refresh_token.unwrap();
        assert_ne!(rt1, rt2);
        // The rotated-out token is refused, and presenting it revokes its successor too.
        assert_eq!(
            refresh(&s, CLI, &rt1, now).unwrap_err().error,
            "invalid_grant"
        );
        assert_eq!(
            refresh(&s, CLI, &rt2, now).unwrap_err().error,
            "invalid_grant"
        );

        // Bound to the client: another client is refused without ending the owner's session.
        let code = cli_code(&s, redirect, "kube-relay offline_access", now);
        let rt = exchange(&s, &code, redirect, VERIFIER, now)
            .unwrap()
            .refresh_token
            .unwrap();
        let e = s
            .token_grant(
                &basic(PORTAL, "s3cret"),
                &form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)]),
                now,
            )
            .unwrap_err();
        assert_eq!(e.error, "invalid_grant");
        // A wider scope is refused (and keeps the token); a narrower one is fine.
        let e = s
            .token_grant(
                &HeaderMap::new(),
                &form(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", CLI),
                    ("refresh_token", &rt),
                    ("scope", "kube-relay openid"),
                ]),
                now,
            )
            .unwrap_err();
        assert_eq!(e.error, "invalid_scope");
        let narrowed = s
            .token_grant(
                &HeaderMap::new(),
                &form(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", CLI),
                    ("refresh_token", &rt),
                    ("scope", "kube-relay"),
                ]),
                now,
            )
            .unwrap();
        assert_eq!(narrowed.scopes, ["kube-relay"]);
        // The successor still carries the original grant (offline_access).
        let next = narrowed.refresh_token.unwrap();
        let later = now + REFRESH_LIFETIME + Duration::from_secs(1);
        assert_eq!(
            refresh(&s, CLI, &next, later).unwrap_err().description,
            "the refresh token expired"
        );
    }

    #[test]
    fn claims_request_grants_the_authentication_context_and_refresh_cannot_add_one() {
        let s = server();
        let now = Instant::now();
        let redirect = "http://127.0.0.1:4242/callback";
        let claims = r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#;
        fn ask<'a>(redirect: &'a str, claims: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
            let mut f = vec![
                ("client_id", CLI),
                ("redirect_uri", redirect),
                ("response_type", "code"),
                ("scope", "kube-relay offline_access"),
                ("code_challenge", CHALLENGE),
                ("code_challenge_method", "S256"),
            ];
            if let Some(c) = claims {
                f.push(("claims", c));
            }
            f
        }
        // The page says what is asked, and carries the request on.
        let page = body_text(s.authorize(&form(&ask(redirect, Some(claims))), false, now));
        assert!(page.contains("Step-up requested"), "{page}");
        assert!(page.contains(r#"name="claims""#), "{page}");
        let mut signed_in = ask(redirect, Some(claims));
        signed_in.push(("user", "alice"));
        let q = query_of(&location(&s.authorize(&form(&signed_in), true, now)));
        let issue = exchange(&s, &q["code"], redirect, VERIFIER, now).unwrap();
        assert_eq!(issue.acrs, ["c1"]);
        // Refreshed tokens keep it.
        let rt = issue.refresh_token.unwrap();
        let again = refresh(&s, CLI, &rt, now).unwrap();
        assert_eq!(again.acrs, ["c1"]);

        // A plain sign-in's refresh token cannot be stepped up: a new sign-in is needed.
        let code = cli_code(&s, redirect, "kube-relay offline_access", now);
        let plain = exchange(&s, &code, redirect, VERIFIER, now).unwrap();
        assert!(plain.acrs.is_empty());
        let e = s
            .token_grant(
                &HeaderMap::new(),
                &form(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", CLI),
                    ("refresh_token", plain.refresh_token.as_deref().unwrap()),
                    ("claims", claims),
                ]),
                now,
            )
            .unwrap_err();
        assert_eq!(e.error, "interaction_required");
        // Malformed claims are a bad request.
        let mut bad = ask(redirect, Some("{not json"));
        bad.push(("user", "alice"));
        let q = query_of(&location(&s.authorize(&form(&bad), true, now)));
        assert_eq!(q["error"], "invalid_request");
    }

    fn start_device(s: &OAuthServer, now: Instant) -> (String, String) {
        let v = s
            .start_device(
                &HeaderMap::new(),
                &form(&[
                    ("client_id", CLI),
                    ("scope", "kube-relay openid offline_access"),
                ]),
                now,
            )
            .unwrap();
        let user_code = v["user_code"].as_str().unwrap().to_owned();
        assert_eq!(v["verification_uri"], format!("{ISSUER}/device"));
        assert_eq!(
            v["verification_uri_complete"],
            format!("{ISSUER}/device?user_code={user_code}")
        );
        assert_eq!(v["interval"], 2);
        (v["device_code"].as_str().unwrap().to_owned(), user_code)
    }

    fn poll(s: &OAuthServer, device_code: &str, now: Instant) -> Result<Issue, OAuthError> {
        s.token_grant(
            &HeaderMap::new(),
            &form(&[
                ("grant_type", DEVICE_GRANT),
                ("client_id", CLI),
                ("device_code", device_code),
            ]),
            now,
        )
    }

    fn approve(s: &OAuthServer, user_code: &str, choice: (&str, &str), now: Instant) -> StatusCode {
        s.device_page(&form(&[("user_code", user_code), choice]), true, now)
            .status()
    }

    #[test]
    fn device_flow_states() {
        let s = server();
        let t0 = Instant::now();
        let (dc, uc) = start_device(&s, t0);
        assert_eq!(uc.len(), 9);
        assert_eq!(&uc[4..5], "-");
        assert!(uc
            .bytes()
            .filter(|b| *b != b'-')
            .all(|b| USER_CODE_ALPHABET.contains(&b)));

        // Pending; too fast → slow_down (interval + 5 s); after the interval, pending again.
        assert_eq!(
            poll(&s, &dc, t0).unwrap_err().error,
            "authorization_pending"
        );
        let e = poll(&s, &dc, t0 + Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.error, "slow_down");
        assert_eq!(
            poll(&s, &dc, t0 + Duration::from_secs(3))
                .unwrap_err()
                .error,
            "slow_down",
            "the interval is now 7 s; 2.8 s is too soon, and it grows to 12 s"
        );
        assert_eq!(
            poll(&s, &dc, t0 + Duration::from_secs(15))
                .unwrap_err()
                .error,
            "authorization_pending"
        );

        // The page shows what is asked; the code is typed in any case, without the dash.
        let shown = body_text(s.device_page(&form(&[("user_code", &uc)]), false, t0));
        assert!(shown.contains("asks you to sign in"), "{shown}");
        let typed = uc.replace('-', "").to_lowercase();
        assert_eq!(approve(&s, &typed, ("user", "bob"), t0), StatusCode::OK);
        // Approval is single use.
        assert_eq!(
            approve(&s, &uc, ("user", "alice"), t0),
            StatusCode::BAD_REQUEST
        );
        // Answered at once, however fast the poll.
        let issued = poll(&s, &dc, t0 + Duration::from_secs(16)).unwrap();
        assert_eq!(issued.user, "bob");
        assert!(issued.refresh_token.is_some());
        assert_eq!(
            poll(&s, &dc, t0 + Duration::from_secs(20))
                .unwrap_err()
                .error,
            "invalid_grant",
            "a device code yields tokens once"
        );

        // Denied.
        let (dc, uc) = start_device(&s, t0);
        assert_eq!(approve(&s, &uc, ("action", "deny"), t0), StatusCode::OK);
        assert_eq!(poll(&s, &dc, t0).unwrap_err().error, "access_denied");

        // Expired.
        let (dc, uc) = start_device(&s, t0);
        let late = t0 + DEVICE_CODE_LIFETIME;
        assert_eq!(
            approve(&s, &uc, ("user", "alice"), late),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(poll(&s, &dc, late).unwrap_err().error, "expired_token");

        // Unknown codes and another client's device code.
        assert_eq!(
            approve(&s, "BCDF-GHJK", ("user", "alice"), t0),
            StatusCode::BAD_REQUEST
        );
        let (dc, _) = start_device(&s, t0);
        let e = s
            .token_grant(
                &basic(PORTAL, "s3cret"),
                &form(&[("grant_type", DEVICE_GRANT), ("device_code", &dc)]),
                t0,
            )
            .unwrap_err();
        assert_eq!(e.error, "unauthorized_client");
    }

    #[test]
    fn stores_are_bounded_and_evict_the_oldest() {
        let s = server_with(3);
        let now = Instant::now();
        let redirect = "http://127.0.0.1:4242/callback";
        let codes: Vec<String> = (0..5).map(|_| cli_code(&s, redirect, "", now)).collect();
        assert_eq!(s.lock().codes.len(), 3);
        assert_eq!(
            exchange(&s, &codes[0], redirect, VERIFIER, now)
                .unwrap_err()
                .description,
            "unknown or expired code"
        );
        assert!(exchange(&s, &codes[4], redirect, VERIFIER, now).is_ok());
        let devices: Vec<(String, String)> = (0..5).map(|_| start_device(&s, now)).collect();
        assert_eq!(s.lock().devices.len(), 3);
        assert_eq!(
            poll(&s, &devices[0].0, now).unwrap_err().error,
            "invalid_grant"
        );
    }

    #[test]
    fn user_codes_normalise() {
        for _ in 0..50 {
            let c = new_user_code().unwrap();
            assert_eq!(normalize_user_code(&format_user_code(&c)), Some(c.clone()));
            assert_eq!(normalize_user_code(&c.to_lowercase()), Some(c));
        }
        assert_eq!(
            normalize_user_code("ABCD-EFGH"),
            None,
            "vowels never appear"
        );
        assert_eq!(normalize_user_code("BCDF"), None);
    }

    #[tokio::test]
    async fn bodies_are_bounded_and_must_be_forms() {
        let s = server();
        let big = Request::post("/base/token")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(vec![b'a'; MAX_BODY + 1])))
            .unwrap();
        assert_eq!(s.handle(big).await.status(), StatusCode::BAD_REQUEST);
        let json = Request::post("/base/token")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let r = s.handle(json).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(body_text(r).contains("invalid_request"));
        let get = Request::get("/base/token")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(s.handle(get).await.status(), StatusCode::METHOD_NOT_ALLOWED);
        let page = Request::get("/base/device?user_code=%3Cscript%3E")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = s.handle(page).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'"));
        let text = body_text(r);
        assert!(text.contains("&lt;script&gt;") && !text.contains("<script>"));
    }
}
