//! The browser portal (server side): `/`, `/-/login`, `/-/callback`, `/-/logout`,
//! `/-/signed-out` and `/-/static/portal.css`.
//!
//! ```text
//!  GET /-/login ──► sealed login cookie {state, PKCE verifier, nonce, next} (10 min)
//!               ──► 302 to the provider's authorization endpoint
//!  GET /-/callback?code&state ──► state matches the cookie (constant time)
//!               ──► code + secret + verifier → tokens ──► ID token nonce/aud
//!               ──► access token through auth::Authenticator (kubectl's checks)
//!               ──► sealed session cookie {token, issued_at, expires_at, csrf} ──► 302 next
//!  GET / ──► session opens and its token still authenticates? clusters page : landing page
//!  POST /-/logout ──► same origin + CSRF field equals the session's ──► cookies cleared
//!               ──► 303 /?signed_out=1, or (sign_out_at_provider) to the provider's
//!                   end_session_endpoint, which returns the browser to /-/signed-out
//! ```
//!
//! Nothing is stored server-side: any replica with the same cookie key serves any browser.
//! Expected failures (cancelled sign-in, stale links, expired sessions) are friendly HTML
//! pages, never Status JSON; only unknown paths fall through to the relay's 404.
//!
//! Every response carries [`SECURITY_HEADERS`]; every dynamic value in the HTML goes through
//! [`html::esc`]; anything that changes state is a POST checked for CSRF.

pub mod html;
pub mod session;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

pub use crate::auth::sso::Portal;
use crate::auth::sso::{self as oidc, Provider};

use crate::auth::Principal;
use crate::body::RelayBody;
use crate::config::{IssuerKind, LoginConfig, PortalConfig};
use crate::error::ProxyError;
use crate::state::ConnCtx;
use crate::state::State;
use session::Session;

/// How long a sign-in attempt may take at the provider.
const LOGIN_TTL_SECS: u64 = 600;
/// The sign-out form is one short field; anything bigger is not ours.
const MAX_FORM_BYTES: usize = 4096;
const CSS: &str = include_str!("web/portal.css");

/// Sent with every portal response. No script runs at all (`default-src 'none'`), the pages
/// cannot be framed (clickjacking the sign-out button) and forms only post back here.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    // Not `no-referrer`: under it Chromium sends `Origin: null` on same-origin form posts, and
    // the sign-out check needs the real origin. `same-origin` still sends nothing to other
    // sites, so the callback's `?code=` never leaks through a Referer.
    ("referrer-policy", "same-origin"),
    ("x-frame-options", "DENY"),
];

pub async fn handle(
    state: &State,
    _conn: &ConnCtx,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<RelayBody>, ProxyError> {
    let method = req.method().clone();
    let is_get = method == Method::GET || method == Method::HEAD;
    match path {
        "/-/static/portal.css" if is_get => Ok(respond(
            StatusCode::OK,
            "text/css; charset=utf-8",
            // Not a page: a short cache is fine and saves a request per page view.
            "public, max-age=300",
            CSS.into(),
            &[],
            None,
        )),
        "/" | "/-/static/portal.css" if !is_get => Ok(method_not_allowed("GET, HEAD")),
        // GET only: these start or finish a sign-in, which a HEAD probe must not do.
        "/-/login" | "/-/callback" if method != Method::GET => Ok(method_not_allowed("GET")),
        "/" => Ok(root(state, &req, None).await),
        "/-/signed-out" if is_get => {
            Ok(root(state, &req, Some(html::Notice::SignedOutAtProvider)).await)
        }
        "/-/signed-out" => Ok(method_not_allowed("GET, HEAD")),
        "/-/login" => Ok(login(state, &req).await),
        "/-/callback" => Ok(callback(state, &req).await),
        "/-/logout" if method == Method::POST => Ok(logout(state, req).await),
        "/-/logout" => Ok(method_not_allowed("POST")),
        _ => Err(ProxyError::NotFound(format!(
            "kube-relay has no page at {path}"
        ))),
    }
}

/// The signed-in portal user behind the request's session cookie, if any and still valid:
/// the cookie opens under the configured key, the session has not ended, and its token still
/// passes every check a kubectl token must pass.
pub async fn session_principal(state: &State, h: &http::HeaderMap) -> Option<Arc<Principal>> {
    signed_in(state, h).await.map(|(_, p)| p)
}

/// The portal session behind the request's cookie and its user, on the same terms as
/// [`session_principal`].
pub(crate) async fn signed_in(
    state: &State,
    h: &http::HeaderMap,
) -> Option<(Session, Arc<Principal>)> {
    let (_, portal, _) = enabled(state)?;
    let session = Session::open(&portal.cookie_key, &session::sealed_session(h)?, now())?;
    let (p, _) = state.auth.authenticate(&session.token).await.ok()?;
    Some((session, p))
}

/// Whether `p` is one of `recording.auditors` (by user, or by a group from the token or resolved
/// through Graph).
pub(crate) fn is_auditor(
    state: &State,
    p: &Principal,
    membership: &crate::authz::Membership,
) -> bool {
    state.cfg.recording.as_ref().is_some_and(|r| {
        let mut groups = p.groups.to_vec();
        if let crate::authz::Membership::Resolved(extra) = membership {
            groups.extend(extra.iter().cloned());
        }
        r.is_auditor(p.user_key(), &groups)
    })
}

/// The login section, its portal part and this generation's provider client, when the portal
/// is configured.
fn enabled(state: &State) -> Option<(&LoginConfig, &PortalConfig, &Portal)> {
    let login = state.cfg.login.as_ref()?;
    Some((login, login.portal.as_ref()?, state.portal.as_deref()?))
}

// === pages ===

/// The landing page, or the signed-in page when the session is good. `notice` is set on the
/// page the provider returns to after signing out there.
async fn root(
    state: &State,
    req: &Request<Incoming>,
    notice: Option<html::Notice>,
) -> Response<RelayBody> {
    let public_url = public_url(state);
    let notice = notice.or_else(|| query(req, "signed_out").map(|_| html::Notice::SignedOut));
    let Some((login, portal, client)) = enabled(state) else {
        return page(
            StatusCode::OK,
            html::landing(&html::Landing {
                issuer: None,
                public_url: &public_url,
                notice,
                expired: false,
            }),
            &[],
        );
    };
    let sealed = session::sealed_session(req.headers());
    let signed_in = match &sealed {
        None => None,
        Some(sealed) => match Session::open(&portal.cookie_key, sealed, now()) {
            None => None,
            Some(s) => match state.auth.authenticate(&s.token).await {
                Ok((p, _)) => Some((s, p)),
                Err(e) => {
                    tracing::info!(reason = e.failure.as_label(), detail = %e.detail, "portal session token no longer valid");
                    None
                }
            },
        },
    };
    match signed_in {
        Some((s, p)) => {
            let end_session = provider_end_session(portal, client).await;
            let membership = state.groups.membership(&p).await;
            let page = signed_in_page(
                state,
                &s,
                &p,
                &membership,
                &public_url,
                end_session.is_some(),
            );
            // The sign-out form's 303 goes on to the provider; browsers hold redirects after a
            // form post to the page's form-action, so the provider's origin is allowed there.
            match end_session {
                Some(url) => allow_form_target(page, &url.origin().ascii_serialization()),
                None => page,
            }
        }
        None => {
            // A cookie that came but could not be used is cleared, and the page says why.
            let expired = sealed.is_some();
            let clear = if expired {
                session::clear_session_cookies()
            } else {
                Vec::new()
            };
            page(
                StatusCode::OK,
                html::landing(&html::Landing {
                    issuer: Some(&issuer_display(login)),
                    public_url: &public_url,
                    notice,
                    expired,
                }),
                &clear,
            )
        }
    }
}

fn signed_in_page(
    state: &State,
    s: &Session,
    p: &Principal,
    membership: &crate::authz::Membership,
    public_url: &str,
    sign_out_at_provider: bool,
) -> Response<RelayBody> {
    let clusters: Vec<html::ClusterView> = state
        .cfg
        .clusters
        .iter()
        .filter_map(|c| {
            let perms = crate::authz::permissions(p, c, membership)?;
            Some(html::ClusterView {
                name: c.name.to_string(),
                up: state
                    .upstreams
                    .get(c.name.as_str())
                    .is_some_and(|u| u.health.is_up()),
                verbs: perms.verbs,
                namespaces: perms.namespaces,
                auth_contexts: perms.auth_contexts,
            })
        })
        .collect();
    let ends = s.expires_at.min(p.expires_at);
    page(
        StatusCode::OK,
        html::home(&html::Home {
            username: &p.username,
            issuer: &p.issuer,
            groups: p.groups.len(),
            minutes_left: ends.saturating_sub(now()).div_ceil(60),
            clusters: &clusters,
            public_url,
            csrf: &s.csrf,
            sign_out_at_provider,
            auditor: is_auditor(state, p, membership),
            terminal: state
                .cfg
                .login
                .as_ref()
                .and_then(|l| l.portal.as_ref())
                .is_some_and(|p| p.terminal),
        }),
        &[],
    )
}

async fn login(state: &State, req: &Request<Incoming>) -> Response<RelayBody> {
    let Some((login, portal_cfg, portal)) = enabled(state) else {
        return portal_off();
    };
    let next = query(req, "next")
        .and_then(|n| safe_next(&n).map(str::to_owned))
        .unwrap_or_else(|| "/".to_owned());
    let provider = match portal.provider().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "portal: identity provider discovery failed");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "The sign-in service cannot be reached",
                "kube-relay could not reach the identity provider. Try again in a minute; if it keeps happening, tell the relay's administrators.",
                true,
            );
        }
    };
    let attempt = match new_attempt(next) {
        Ok(a) => a,
        Err(_) => return internal("no randomness for a sign-in attempt"),
    };
    let url = match oidc::authorization_url(
        &provider.authorization_endpoint,
        login,
        portal_cfg,
        &redirect_uri(state),
        &attempt,
    ) {
        Ok(u) => u,
        Err(e) => return internal(&format!("authorization URL: {e}")),
    };
    let sealed = serde_json::to_vec(&attempt)
        .ok()
        .and_then(|j| session::seal(&portal_cfg.cookie_key, session::LOGIN_PURPOSE, &j).ok());
    let Some(sealed) = sealed else {
        return internal("sealing the login cookie");
    };
    redirect(
        StatusCode::FOUND,
        url.as_str(),
        &[session::set_cookie(
            session::LOGIN_COOKIE,
            &sealed,
            LOGIN_TTL_SECS,
        )],
    )
}

fn new_attempt(next: String) -> Result<oidc::Attempt, aws_lc_rs::error::Unspecified> {
    Ok(oidc::Attempt {
        state: session::random_token(32)?,
        verifier: session::random_token(32)?,
        nonce: session::random_token(32)?,
        next,
        expires_at: now() + LOGIN_TTL_SECS,
    })
}

async fn callback(state: &State, req: &Request<Incoming>) -> Response<RelayBody> {
    let Some((login, portal_cfg, portal)) = enabled(state) else {
        return portal_off();
    };
    // The login cookie is good for one callback, whatever its outcome.
    let clear_login = session::clear_cookie(session::LOGIN_COOKIE);
    if let Some(error) = query(req, "error") {
        log_provider_refusal(&error, query(req, "error_description").as_deref());
        // Only a plain OAuth error code is echoed; free text from the URL is not shown, so a
        // crafted link cannot put words in the relay's mouth.
        let code = if !error.is_empty()
            && error.len() <= 64
            && error.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            format!(" (the provider said: {error})")
        } else {
            String::new()
        };
        return problem_with(
            StatusCode::FORBIDDEN,
            "Sign-in was denied",
            &format!("Sign-in was cancelled or denied at the identity provider{code}. Nothing was changed; you can try again."),
            true,
            &[clear_login],
        );
    }
    let attempt = session::cookie(req.headers(), session::LOGIN_COOKIE)
        .and_then(|c| session::open(&portal_cfg.cookie_key, session::LOGIN_PURPOSE, c))
        .and_then(|j| serde_json::from_slice::<oidc::Attempt>(&j).ok())
        .filter(|a| a.expires_at > now());
    let returned_state = query(req, "state");
    let code = query(req, "code");
    let (attempt, code) = match (attempt, returned_state, code) {
        (Some(a), Some(s), Some(c)) if session::secrets_equal(&a.state, &s) && !c.is_empty() => {
            (a, c)
        }
        _ => return stale(&[clear_login]),
    };
    let tokens = match portal
        .exchange(
            login,
            portal_cfg,
            &redirect_uri(state),
            &code,
            &attempt.verifier,
        )
        .await
    {
        Ok(t) => t,
        // A used, expired or mismatched code: the link is stale, not the provider broken.
        Err(oidc::ExchangeError::Refused { error, description }) if error == "invalid_grant" => {
            tracing::info!(%description, "portal: code exchange refused (invalid_grant)");
            return stale(&[clear_login]);
        }
        Err(e) => {
            tracing::warn!(error = ?e, "portal: code exchange failed");
            return problem_with(
                StatusCode::BAD_GATEWAY,
                "Sign-in could not be completed",
                "The identity provider did not complete the sign-in for kube-relay. Try again; if it keeps happening, tell the relay's administrators (the relay's log has the details).",
                true,
                &[clear_login],
            );
        }
    };
    let id_ok = tokens
        .id_token
        .as_deref()
        .is_some_and(|t| oidc::id_token_matches(t, &attempt.nonce, &portal_cfg.client_id));
    if !id_ok {
        tracing::warn!(
            id_token = tokens.id_token.is_some(),
            "portal: the token response's ID token is missing or not for this sign-in (nonce or audience)"
        );
        return stale(&[clear_login]);
    }
    let principal = match state.auth.authenticate(&tokens.access_token).await {
        Ok((p, _)) => p,
        Err(e) => {
            tracing::warn!(reason = e.failure.as_label(), detail = %e.detail, "portal: the signed-in user's access token is not accepted by this relay");
            return not_accepted(&[clear_login]);
        }
    };
    let now = now();
    let expires_at = (now + portal_cfg.session_lifetime.as_secs()).min(principal.expires_at);
    if expires_at <= now {
        return not_accepted(&[clear_login]);
    }
    let cookies = Session::new(tokens.access_token, now, expires_at)
        .and_then(|s| s.seal(&portal_cfg.cookie_key))
        .ok()
        .map(|sealed| session::set_session_cookies(&sealed, expires_at - now));
    let mut cookies = match cookies {
        Some(Some(c)) => c,
        Some(None) => {
            tracing::warn!(
                token_bytes = principal.bearer_token().len(),
                "portal: the access token is too large for a browser session"
            );
            return problem_with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Your sign-in is too large for a browser session",
                "Your access token (often: membership in very many groups) does not fit in the browser's cookies. Use the command line instead: kube-relay kubeconfig.",
                false,
                &[clear_login],
            );
        }
        None => return internal("sealing the session"),
    };
    cookies.push(clear_login);
    tracing::info!(user = %principal.user_key(), "portal: signed in");
    redirect(StatusCode::FOUND, &attempt.next, &cookies)
}

async fn logout(state: &State, req: Request<Incoming>) -> Response<RelayBody> {
    let Some((_, portal_cfg, client)) = enabled(state) else {
        return portal_off();
    };
    if !same_origin(req.headers(), &state.cfg.public_url) {
        return refused_logout();
    }
    let sealed = session::sealed_session(req.headers());
    let body = match Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return refused_logout(),
    };
    let field = |name: &str| {
        url::form_urlencoded::parse(&body)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let csrf = field("csrf");
    // An expired session can still sign out (it is only being deleted); a session cookie that
    // does not open is no session, and deleting it needs no proof either.
    if let Some(s) = sealed.and_then(|v| session_any_age(&portal_cfg.cookie_key, &v)) {
        if !csrf.is_some_and(|c| session::secrets_equal(&c, &s.csrf)) {
            return refused_logout();
        }
    }
    let cleared = session::clear_session_cookies();
    // Only when the page that posted allowed the redirect (its CSP), and without waiting on
    // the provider: that page already fetched its endpoints in this generation.
    if portal_cfg.sign_out_at_provider && field("at_provider").as_deref() == Some("1") {
        if let Some(mut url) = client
            .cached_provider()
            .as_deref()
            .and_then(end_session_url)
        {
            url.query_pairs_mut()
                .append_pair("client_id", &portal_cfg.client_id)
                .append_pair(
                    "post_logout_redirect_uri",
                    &format!("{}/-/signed-out", public_url(state)),
                );
            tracing::info!("portal: signed out; ending the provider session too");
            return redirect(StatusCode::SEE_OTHER, url.as_str(), &cleared);
        }
    }
    // Local only: the landing page says the provider may still know the browser.
    redirect(StatusCode::SEE_OTHER, "/?signed_out=1", &cleared)
}

/// How long the signed-in page waits for the provider's endpoints (only when sign-out at the
/// provider is on and this generation has not fetched them yet). Past it, the page offers a
/// local sign-out rather than keep the user waiting.
const PROVIDER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The provider's end-session endpoint when sign-out should continue there (OpenID Connect
/// RP-Initiated Logout 1.0), waiting at most [`PROVIDER_WAIT`]. `None` (sign-out stays local)
/// when the option is off, or the provider is slow, unreachable or publishes no usable
/// endpoint. The redirect carries `client_id` and `post_logout_redirect_uri` but no
/// `id_token_hint` (the session keeps only the access token): providers then ask the user to
/// confirm, which is the safe default.
async fn provider_end_session(portal_cfg: &PortalConfig, client: &Portal) -> Option<url::Url> {
    if !portal_cfg.sign_out_at_provider {
        return None;
    }
    match tokio::time::timeout(PROVIDER_WAIT, client.provider()).await {
        Ok(Ok(p)) => {
            let url = end_session_url(&p);
            if url.is_none() {
                tracing::warn!("login.portal.sign_out_at_provider is set but the provider publishes no usable end_session_endpoint; sign-out stays local");
            }
            url
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "portal: provider unreachable; sign-out stays local");
            None
        }
        Err(_) => {
            tracing::warn!(wait = ?PROVIDER_WAIT, "portal: provider slow to answer; sign-out stays local");
            None
        }
    }
}

/// The provider's end-session endpoint, if its host is a plain DNS name or an IP address: its
/// origin goes into a CSP header, where a `;` or `,` (both legal in URL hosts) would add
/// directives or policies.
fn end_session_url(p: &Provider) -> Option<url::Url> {
    let url = url::Url::parse(p.end_session_endpoint.as_deref()?).ok()?;
    let plain = match url.host()? {
        url::Host::Domain(d) => d
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'),
        url::Host::Ipv4(_) | url::Host::Ipv6(_) => true,
    };
    plain.then_some(url)
}

/// `resp` with the provider's `origin` added to the CSP's `form-action`; `origin` comes from
/// [`end_session_url`], whose host cannot add a directive.
fn allow_form_target(mut resp: Response<RelayBody>, origin: &str) -> Response<RelayBody> {
    let base = SECURITY_HEADERS
        .iter()
        .find(|(k, _)| *k == "content-security-policy")
        .map_or("", |(_, v)| *v);
    let csp = base.replace(
        "form-action 'self'",
        &format!("form-action 'self' {origin}"),
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        resp.headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

/// Logs an `error=` redirect. Anyone can send one (no state is checked before it), so its
/// text is logged quoted: a newline in it cannot forge a log line.
fn log_provider_refusal(error: &str, description: Option<&str>) {
    tracing::info!(
        error = ?error,
        description = ?description.unwrap_or(""),
        "portal: the identity provider did not sign the user in"
    );
}

/// A session that opens under `key`, however old.
fn session_any_age(key: &crate::config::CookieKey, sealed: &str) -> Option<Session> {
    Session::open(key, sealed, 0)
}

// === helpers ===

/// `next` must stay on this origin: an absolute path, not `//host` or `/\host` (browsers
/// read both as another host), no control characters or spaces (stripped by browsers into
/// the former) and not back into the sign-in flow.
pub fn safe_next(next: &str) -> Option<&str> {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && next.len() <= 512
        && next
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'\\')
        && !["/-/login", "/-/callback", "/-/logout"]
            .iter()
            .any(|p| next.starts_with(p));
    ok.then_some(next)
}

/// Is this POST from the portal's own page? `Origin` when sent (every current browser sends
/// it on form POSTs), else the fetch metadata; neither means no.
fn same_origin(h: &http::HeaderMap, public_url: &url::Url) -> bool {
    match h.get(header::ORIGIN) {
        Some(o) => o
            .to_str()
            .is_ok_and(|o| o == public_url.origin().ascii_serialization()),
        None => h
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"same-origin"),
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn public_url(state: &State) -> String {
    state
        .cfg
        .public_url
        .as_str()
        .trim_end_matches('/')
        .to_owned()
}

fn redirect_uri(state: &State) -> String {
    format!("{}/-/callback", public_url(state))
}

fn issuer_display(login: &LoginConfig) -> String {
    match login.issuer.kind {
        IssuerKind::Entra { .. } => "Microsoft Entra ID".to_owned(),
        IssuerKind::Oidc { .. } => login.issuer.name.clone(),
    }
}

use crate::clock::unix_now as now;

// === responses ===

fn stale(cookies: &[String]) -> Response<RelayBody> {
    problem_with(
        StatusCode::BAD_REQUEST,
        "Sign-in link expired or invalid",
        "This sign-in link is stale, was already used, or was opened in another browser than the one that started signing in. Start again from this browser.",
        true,
        cookies,
    )
}

fn not_accepted(cookies: &[String]) -> Response<RelayBody> {
    problem_with(
        StatusCode::FORBIDDEN,
        "Sign-in was not accepted",
        "You signed in, but the identity provider issued a token this relay does not accept (for example, for another audience or without the required scope). Tell the relay's administrators.",
        false,
        cookies,
    )
}

fn refused_logout() -> Response<RelayBody> {
    problem(
        StatusCode::FORBIDDEN,
        "Sign-out could not be verified",
        "The sign-out request did not come from this portal's own page, so it was ignored. Use the Sign out button on the start page.",
        false,
    )
}

fn portal_off() -> Response<RelayBody> {
    problem(
        StatusCode::NOT_FOUND,
        "Browser sign-in is not enabled",
        "This relay does not offer browser sign-in. Use the command line: kube-relay kubeconfig.",
        false,
    )
}

pub(crate) fn method_not_allowed(allow: &'static str) -> Response<RelayBody> {
    let mut r = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        "This page cannot be used this way. Go to the start page and use its links and buttons.",
        false,
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn internal(what: &str) -> Response<RelayBody> {
    tracing::error!(what, "portal: internal error");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "kube-relay could not handle this request. Try again; if it keeps happening, tell the relay's administrators.",
        false,
    )
}

pub(crate) fn problem(
    status: StatusCode,
    heading: &str,
    text: &str,
    retry: bool,
) -> Response<RelayBody> {
    problem_with(status, heading, text, retry, &[])
}

fn problem_with(
    status: StatusCode,
    heading: &str,
    text: &str,
    retry: bool,
    cookies: &[String],
) -> Response<RelayBody> {
    page(status, html::problem(heading, text, retry), cookies)
}

pub(crate) fn page(status: StatusCode, html: String, cookies: &[String]) -> Response<RelayBody> {
    respond(
        status,
        "text/html; charset=utf-8",
        "no-store",
        html.into(),
        cookies,
        None,
    )
}

pub(crate) fn redirect(
    status: StatusCode,
    location: &str,
    cookies: &[String],
) -> Response<RelayBody> {
    respond(
        status,
        "text/plain; charset=utf-8",
        "no-store",
        Bytes::new(),
        cookies,
        Some(location),
    )
}

/// One of the relay's own static files (scripts, stylesheets embedded in the binary).
pub(crate) fn static_file(body: &'static [u8], content_type: &'static str) -> Response<RelayBody> {
    // Not a page: a short cache is fine and saves a request per page view.
    respond(
        StatusCode::OK,
        content_type,
        "public, max-age=300",
        Bytes::from_static(body),
        &[],
        None,
    )
}

/// Builds a response with the security headers. Header values we cannot encode (never the
/// case for our base64url cookies and checked or URL-serialised locations) are dropped and
/// logged rather than panicking.
pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    cache: &'static str,
    body: Bytes,
    cookies: &[String],
    location: Option<&str>,
) -> Response<RelayBody> {
    let mut resp = Response::new(crate::body::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    for (k, v) in SECURITY_HEADERS {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    for c in cookies {
        match HeaderValue::try_from(c.as_str()) {
            Ok(v) => {
                h.append(header::SET_COOKIE, v);
            }
            Err(_) => tracing::error!("portal: a Set-Cookie value is not a valid header value"),
        }
    }
    if let Some(l) = location {
        match HeaderValue::try_from(l) {
            Ok(v) => {
                h.insert(header::LOCATION, v);
            }
            Err(_) => tracing::error!("portal: a redirect location is not a valid header value"),
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WCAG relative luminance of `#rrggbb`.
    fn luminance(hex: &str) -> f64 {
        let h = hex.trim_start_matches('#');
        let channel = |i: usize| {
            let c = f64::from(u8::from_str_radix(&h[i..i + 2], 16).unwrap()) / 255.0;
            if c <= 0.03928 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * channel(0) + 0.7152 * channel(2) + 0.0722 * channel(4)
    }

    #[test]
    fn stylesheet_colours_meet_wcag_aa_contrast() {
        let var = |name: &str| {
            let needle = format!("--{name}:");
            let at = CSS
                .find(&needle)
                .unwrap_or_else(|| panic!("--{name} not in portal.css"));
            CSS[at + needle.len()..]
                .split(';')
                .next()
                .unwrap()
                .trim()
                .to_owned()
        };
        let ratio = |a: &str, b: &str| {
            let (a, b) = (luminance(&var(a)), luminance(&var(b)));
            (a.max(b) + 0.05) / (a.min(b) + 0.05)
        };
        // Text on the backgrounds it is drawn on: 4.5:1 (AA, normal text).
        for (fg, bg) in [
            ("fg", "bg"),
            ("fg", "panel"),
            ("muted", "bg"),
            ("muted", "panel"),
            ("link", "bg"),
            ("link", "panel"),
            ("up", "bg"),
            ("up", "panel"),
            ("down", "bg"),
            ("down", "panel"),
            ("accent-fg", "accent"),
            ("accent", "bg"),
        ] {
            let r = ratio(fg, bg);
            assert!(r >= 4.5, "--{fg} on --{bg}: {r:.2}:1 < 4.5:1");
        }
        // The focus ring against the page: 3:1 (non-text contrast).
        assert!(ratio("focus", "bg") >= 3.0);
        assert!(ratio("focus", "panel") >= 3.0);
        // And it is used: every focusable thing shows it.
        assert!(CSS.contains(":focus-visible"), "no visible focus style");
    }

    #[test]
    fn next_stays_on_this_origin() {
        for good in ["/", "/?x=1", "/-/kubeconfig?style=sni", "/a/b%2F"] {
            assert_eq!(safe_next(good), Some(good), "{good}");
        }
        for bad in [
            "//evil",
            "//evil.example/x",
            "https://evil",
            "/\\evil",
            "\\\\evil",
            "/\t/evil",
            "/ /evil",
            "evil",
            "",
            "/-/login?next=/",
            "/-/callback",
            "/-/logout",
            "/caf\u{e9}",
        ] {
            assert_eq!(safe_next(bad), None, "{bad:?}");
        }
        assert_eq!(safe_next(&format!("/{}", "a".repeat(600))), None);
    }

    #[test]
    fn end_session_hosts_that_could_write_csp_are_refused() {
        let provider = |u: &str| Provider {
            authorization_endpoint: String::new(),
            token_endpoint: String::new(),
            basic_auth: true,
            end_session_endpoint: Some(u.to_owned()),
        };
        for good in [
            "https://login.example.com/oauth2/v2.0/logout",
            "https://127.0.0.1:8443/session/end",
            "https://[::1]/end",
        ] {
            assert!(end_session_url(&provider(good)).is_some(), "{good}");
        }
        for bad in [
            "https://x;sandbox/end",
            "https://x,y/end",
            "not a url",
            "mailto:a@b",
        ] {
            assert!(end_session_url(&provider(bad)).is_none(), "{bad}");
        }
    }

    #[test]
    fn provider_sign_out_widens_only_form_action() {
        let resp = allow_form_target(
            redirect(StatusCode::OK, "/", &[]),
            "https://login.example.com",
        );
        let csp = resp.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            csp,
            SECURITY_HEADERS[0].1.replace(
                "form-action 'self'",
                "form-action 'self' https://login.example.com"
            )
        );
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    }

    #[test]
    fn provider_error_text_cannot_forge_log_lines() {
        let out = crate::lines::captured_log(|| {
            log_provider_refusal(
                "access_denied\n2030-01-01T00:00:00Z  INFO portal: signed in user=admin",
                Some("x\r\nINFO forged"),
            );
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("the identity provider did not sign the user in"));
    }

    #[test]
    fn same_origin_checks() {
        let public = url::Url::parse("https://relay.example.com/").unwrap();
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(same_origin(
            &h(&[("origin", "https://relay.example.com")]),
            &public
        ));
        assert!(!same_origin(
            &h(&[("origin", "https://evil.example")]),
            &public
        ));
        assert!(!same_origin(&h(&[("origin", "null")]), &public));
        assert!(!same_origin(
            &h(&[
                ("origin", "https://evil.example"),
                ("sec-fetch-site", "same-origin")
            ]),
            &public
        ));
        assert!(same_origin(
            &h(&[("sec-fetch-site", "same-origin")]),
            &public
        ));
        assert!(!same_origin(
            &h(&[("sec-fetch-site", "cross-site")]),
            &public
        ));
        assert!(!same_origin(&h(&[]), &public));
        let with_port = url::Url::parse("https://localhost:8443").unwrap();
        assert!(same_origin(
            &h(&[("origin", "https://localhost:8443")]),
            &with_port
        ));
    }
}
