//! The human sign-ins, through the `oauth2` crate over our own HTTP client: browser
//! (authorization code + PKCE, RFC 8252 loopback redirect) and device code (RFC 8628), and the
//! refresh of what they saved.
//!
//! Both request `offline_access` (a refresh token, when the provider grants one) and `openid`
//! (generic OIDC providers refuse authorization requests without it; Entra accepts it).
//!
//! The loopback redirect listener answers only `GET /callback` carrying the `state` this process
//! generated; anything else is refused and the wait goes on (a stray or forged request must not
//! end the sign-in, nor be able to inject a code: CSRF, RFC 6749 §10.12). The code is useless
//! without the PKCE verifier, which never leaves this process.

use std::convert::Infallible;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, DeviceAuthorizationUrl, PkceCodeChallenge,
    RedirectUrl, RefreshToken, RequestTokenError, Scope, StandardDeviceAuthorizationResponse,
    TokenResponse as _, TokenUrl,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::cache::{unix_now, Stored};
use super::{Authority, Plan};
use crate::net::idp::{discover, Discovery, IdpHttp};

/// Used when a token response has neither `expires_in` nor a JWT `exp`.
const FALLBACK_LIFETIME: Duration = Duration::from_secs(300);

/// Why a refresh did not produce a token.
#[derive(Debug)]
pub(crate) enum RefreshError {
    /// The provider said the refresh token is no good (`invalid_grant`, `interaction_required`):
    /// drop it.
    Rejected(String),
    /// Anything else (network, outage): keep the refresh token for next time.
    Failed(anyhow::Error),
}

fn scopes(plan: &Plan) -> Vec<Scope> {
    let mut s: Vec<String> = plan.scopes.clone();
    for extra in ["openid", "offline_access"] {
        if !s.iter().any(|x| x == extra) {
            s.push(extra.to_owned());
        }
    }
    s.into_iter().map(Scope::new).collect()
}

async fn discovery(http: &IdpHttp, plan: &Plan) -> anyhow::Result<Discovery> {
    let url = plan
        .authority
        .discovery_url()
        .context("this login mode has no authority to sign in at")?;
    // Entra tenants may be given by domain name while the document names the GUID: only a
    // generic issuer URL can be compared as written.
    let expected = match &plan.authority {
        super::Authority::Oidc { issuer } => Some(issuer.as_str()),
        _ => None,
    };
    discover(http, &url, expected).await.context(
        "discovering the identity provider (check --issuer / --tenant-id / --authority-host, and --ca-file for a private CA)",
    )
}

/// Turns a token endpoint answer into what we cache.
fn stored_from(t: &oauth2::basic::BasicTokenResponse, previous_refresh: Option<&str>) -> Stored {
    let access_token = t.access_token().secret().clone();
    let expires_at = super::jwt_expiry(&access_token)
        .unwrap_or_else(|| unix_now() + t.expires_in().unwrap_or(FALLBACK_LIFETIME).as_secs());
    Stored {
        access_token,
        expires_at,
        // Providers that do not rotate refresh tokens leave the field out: keep the old one.
        refresh_token: t
            .refresh_token()
            .map(|r| r.secret().clone())
            .or_else(|| previous_refresh.map(str::to_owned)),
    }
}

/// The text of a token endpoint error, with what to do next.
fn describe<RE: std::error::Error + 'static, T: oauth2::ErrorResponse + 'static>(
    e: &RequestTokenError<RE, T>,
) -> String {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let v = serde_json::to_value(r).unwrap_or_default();
            let code = v["error"].as_str().unwrap_or("error").to_owned();
            let desc = v["error_description"]
                .as_str()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let text = format!("{code}: {desc}");
            match super::azure::hint(&text) {
                Some(h) => format!("{text}\n{h}"),
                None => text,
            }
        }
        RequestTokenError::Request(e) => format!("cannot reach the identity provider: {e}"),
        RequestTokenError::Parse(e, _) => {
            format!("the identity provider's answer is not a token response: {e}")
        }
        RequestTokenError::Other(s) => s.clone(),
    }
}

// === refresh ===

pub(crate) async fn refresh(
    http: &IdpHttp,
    plan: &Plan,
    refresh_token: &str,
) -> Result<Stored, RefreshError> {
    let d = discovery(http, plan).await.map_err(RefreshError::Failed)?;
    let client = BasicClient::new(ClientId::new(plan.client_id.clone())).set_token_uri(
        TokenUrl::new(d.token_endpoint.clone())
            .map_err(|e| RefreshError::Failed(anyhow::anyhow!("token endpoint: {e}")))?,
    );
    let rt = RefreshToken::new(refresh_token.to_owned());
    let mut req = client.exchange_refresh_token(&rt).add_scopes(scopes(plan));
    if let Some(r) = &plan.resource {
        req = req.add_extra_param("resource", r.clone());
    }
    if let Some(c) = &plan.claims {
        req = req.add_extra_param("claims", c.clone());
    }
    match req.request_async(&http.oauth2()).await {
        Ok(t) => Ok(stored_from(&t, Some(refresh_token))),
        Err(RequestTokenError::ServerResponse(r))
            if matches!(r.error(), BasicErrorResponseType::InvalidGrant)
                || matches!(r.error(), BasicErrorResponseType::Extension(c) if c == "interaction_required") =>
        {
            Err(RefreshError::Rejected(describe::<
                crate::net::idp::HttpError,
                _,
            >(
                &RequestTokenError::ServerResponse(r),
            )))
        }
        Err(e) => Err(RefreshError::Failed(anyhow::anyhow!("{}", describe(&e)))),
    }
}

// === browser ===

pub(crate) async fn browser(
    http: &IdpHttp,
    plan: &Plan,
    timeout: Duration,
    no_browser: bool,
) -> anyhow::Result<Stored> {
    let d = discovery(http, plan).await?;
    let auth = d
        .authorization_endpoint
        .clone()
        .context("the identity provider has no authorization_endpoint; try --login devicecode")?;
    // 127.0.0.1, not localhost: RFC 8252 §8.3 (no DNS, no IPv6/IPv4 guessing by the browser).
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("opening a loopback port for the sign-in redirect")?;
    let redirect = format!(
        "http://127.0.0.1:{}/callback",
        listener.local_addr()?.port()
    );
    let client = BasicClient::new(ClientId::new(plan.client_id.clone()))
        .set_auth_uri(AuthUrl::new(auth)?)
        .set_token_uri(TokenUrl::new(d.token_endpoint.clone())?)
        .set_redirect_uri(RedirectUrl::new(redirect)?);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes(plan))
        .set_pkce_challenge(challenge);
    if let Some(r) = &plan.resource {
        req = req.add_extra_param("resource", r.clone());
    }
    if let Some(c) = &plan.claims {
        // Step-up: the authority asks for what the authentication context requires.
        req = req.add_extra_param("claims", c.clone());
    }
    let (url, state) = req.url();
    eprintln!("kube-relay token: sign in at this URL (it opens in your browser unless --no-browser):\n\n  {url}\n");
    if !no_browser {
        open_browser(url.as_str());
    }
    let code = tokio::time::timeout(timeout, wait_for_code(listener, state.secret()))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no sign-in within {}; run the command again (or use --login devicecode)",
                humantime::format_duration(timeout)
            )
        })??;
    let mut req = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier);
    if let Some(r) = &plan.resource {
        req = req.add_extra_param("resource", r.clone());
    }
    let t = req
        .request_async(&http.oauth2())
        .await
        .map_err(|e| anyhow::anyhow!("redeeming the sign-in: {}", describe(&e)))?;
    eprintln!("kube-relay token: signed in");
    Ok(stored_from(&t, None))
}

/// Starts `$BROWSER` (its first entry; `%s` is replaced by the URL) or the desktop's opener.
/// Failing to start one is fine: the URL is on stderr.
fn open_browser(url: &str) {
    let configured = std::env::var("BROWSER")
        .ok()
        .and_then(|b| b.split(':').next().map(str::to_owned))
        .filter(|b| !b.trim().is_empty());
    let (program, args): (String, Vec<String>) = match configured {
        Some(b) => {
            let mut parts = b.split_whitespace().map(str::to_owned);
            let program = parts.next().unwrap_or_default();
            let mut args: Vec<String> = parts.collect();
            if args.iter().any(|a| a.contains("%s")) {
                args = args.into_iter().map(|a| a.replace("%s", url)).collect();
            } else {
                args.push(url.to_owned());
            }
            (program, args)
        }
        None if cfg!(target_os = "macos") => ("open".to_owned(), vec![url.to_owned()]),
        None => ("xdg-open".to_owned(), vec![url.to_owned()]),
    };
    let started = std::process::Command::new(&program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = started {
        eprintln!("kube-relay token: could not start a browser ({program}: {e}); open the URL above yourself");
    }
}

/// What the redirect brought.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CallbackError {
    /// The provider redirected with `error=` (the user said no, consent missing, ...).
    Refused { error: String, description: String },
}

impl std::fmt::Display for CallbackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused { error, description } => {
                write!(f, "the identity provider refused the sign-in: {error}")?;
                if !description.is_empty() {
                    write!(f, ": {description}")?;
                }
                if let Some(h) = super::azure::hint(&format!("{error} {description}")) {
                    write!(f, "\n{h}")?;
                } else if error == "access_denied" {
                    write!(f, "\nthe sign-in was cancelled or not allowed; run the command again, or ask an administrator for access to the app")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CallbackError {}

/// Serves the loopback redirect until a request with our `state` arrives; returns its code.
pub(crate) async fn wait_for_code(
    listener: TcpListener,
    expected_state: &str,
) -> Result<String, CallbackError> {
    let (tx, mut rx) = mpsc::channel::<Result<String, CallbackError>>(1);
    let expected = expected_state.to_owned();
    loop {
        tokio::select! {
            got = rx.recv() => {
                if let Some(result) = got {
                    return result;
                }
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // e.g. out of file descriptors: back off instead of spinning until the
                    // sign-in timeout.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let tx = tx.clone();
                let expected = expected.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (resp, outcome) = callback(&req, &expected);
                        let tx = tx.clone();
                        async move {
                            if let Some(o) = outcome {
                                let _ = tx.try_send(o);
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

type Outcome = Option<Result<String, CallbackError>>;

/// One redirect request: the page the browser shows, and the outcome if it ends the wait.
fn callback<B>(req: &http::Request<B>, expected_state: &str) -> (Response<Full<Bytes>>, Outcome) {
    if req.method() != http::Method::GET || req.uri().path() != "/callback" {
        return (page(StatusCode::NOT_FOUND, "Not found", ""), None);
    }
    let q: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let state_ok = q.get("state").is_some_and(|s| {
        aws_lc_rs::constant_time::verify_slices_are_equal(s.as_bytes(), expected_state.as_bytes())
            .is_ok()
    });
    if !state_ok {
        return (
            page(
                StatusCode::BAD_REQUEST,
                "Sign-in response refused",
                "This response does not belong to the sign-in kube-relay started (state mismatch). Start the sign-in again from your terminal.",
            ),
            None,
        );
    }
    if let Some(error) = q.get("error") {
        let description = q.get("error_description").cloned().unwrap_or_default();
        let shown = format!("{error}: {description}");
        return (
            page(StatusCode::OK, "Sign-in failed", &shown),
            Some(Err(CallbackError::Refused {
                error: error.clone(),
                description,
            })),
        );
    }
    match q.get("code").filter(|c| !c.is_empty()) {
        Some(code) => (
            page(
                StatusCode::OK,
                "Signed in",
                "kube-relay is signed in. You can close this tab.",
            ),
            Some(Ok(code.clone())),
        ),
        None => (
            page(
                StatusCode::BAD_REQUEST,
                "Sign-in response refused",
                "No code in the response.",
            ),
            None,
        ),
    }
}

fn page(status: StatusCode, title: &str, text: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>kube-relay: {t}</title></head><body><h1>{t}</h1><p>{x}</p></body></html>",
        t = html_escape(title),
        x = html_escape(text)
    );
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

use crate::html::html_escape;

// === device code ===

pub(crate) async fn device_code(
    http: &IdpHttp,
    plan: &Plan,
    timeout: Duration,
) -> anyhow::Result<Stored> {
    let d = discovery(http, plan).await?;
    // Entra's v2 metadata lists the device endpoint; construct it when a copy of the document
    // lacks it.
    let device = d
        .device_authorization_endpoint
        .clone()
        .or_else(|| match &plan.authority {
            Authority::Entra { host, tenant } => {
                Some(format!("{host}/{tenant}/oauth2/v2.0/devicecode"))
            }
            _ => None,
        })
        .context(
            "the identity provider has no device_authorization_endpoint; use --login browser",
        )?;
    let client = BasicClient::new(ClientId::new(plan.client_id.clone()))
        .set_token_uri(TokenUrl::new(d.token_endpoint.clone())?)
        .set_device_authorization_url(DeviceAuthorizationUrl::new(device)?);
    let mut req = client.exchange_device_code().add_scopes(scopes(plan));
    if let Some(r) = &plan.resource {
        req = req.add_extra_param("resource", r.clone());
    }
    if let Some(c) = &plan.claims {
        req = req.add_extra_param("claims", c.clone());
    }
    let details: StandardDeviceAuthorizationResponse = req
        .request_async(&http.oauth2())
        .await
        .map_err(|e| anyhow::anyhow!("starting the device code sign-in: {}", describe(&e)))?;
    let uri = details.verification_uri().as_str();
    match details.verification_uri_complete() {
        Some(c) => eprintln!(
            "kube-relay token: to sign in, open {} (or {uri} and enter the code {})",
            c.secret(),
            details.user_code().secret()
        ),
        None => eprintln!(
            "kube-relay token: to sign in, open {uri} and enter the code {}",
            details.user_code().secret()
        ),
    }
    let mut req = client.exchange_device_access_token(&details);
    if let Some(r) = &plan.resource {
        req = req.add_extra_param("resource", r.clone());
    }
    let t = req
        .request_async(&http.oauth2(), tokio::time::sleep, Some(timeout))
        .await
        .map_err(|e| anyhow::anyhow!("device code sign-in: {}", describe(&e)))?;
    eprintln!("kube-relay token: signed in");
    Ok(stored_from(&t, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: std::net::SocketAddr, target: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }

    async fn server() -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<String, CallbackError>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (
            addr,
            tokio::spawn(async move { wait_for_code(l, "s3cret-state").await }),
        )
    }

    #[tokio::test]
    async fn wrong_state_and_strays_are_refused_and_the_wait_goes_on() {
        let (addr, task) = server().await;
        let r = get(addr, "/favicon.ico").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(addr, "/callback?code=evil&state=forged").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("state mismatch"), "{r}");
        let r = get(addr, "/callback?code=evil").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        // A refused error without our state does not end the wait either.
        let r = get(addr, "/callback?error=access_denied&state=forged").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(!task.is_finished());
        let r = get(addr, "/callback?code=the-code&state=s3cret-state").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("You can close this tab"), "{r}");
        assert_eq!(task.await.unwrap(), Ok("the-code".to_owned()));
    }

    #[tokio::test]
    async fn access_denied_is_shown_and_returned() {
        let (addr, task) = server().await;
        let r = get(
            addr,
            "/callback?error=access_denied&error_description=The+user+said+%3Cno%3E&state=s3cret-state",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("Sign-in failed"), "{r}");
        // Reflected text is escaped.
        assert!(r.contains("The user said &lt;no&gt;"), "{r}");
        let err = task.await.unwrap().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("access_denied: The user said <no>"), "{text}");
        assert!(text.contains("run the command again"), "{text}");
    }

    #[test]
    fn requested_scopes_add_openid_and_offline_access_once() {
        let plan = Plan {
            mode: super::super::LoginMode::Browser,
            authority: Authority::Oidc {
                issuer: "https://x".into(),
            },
            client_id: "c".into(),
            scopes: vec!["api://kube-relay/.default".into(), "openid".into()],
            resource: None,
            claims: None,
        };
        let s: Vec<String> = scopes(&plan).iter().map(|s| s.to_string()).collect();
        assert_eq!(s, ["api://kube-relay/.default", "openid", "offline_access"]);
    }
}
