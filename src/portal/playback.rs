//! Playback of session recordings in the portal (README "Session recording"): `/-/recordings`
//! (the list), `/-/recordings/play/<name>` (a page with asciinema-player) and
//! `/-/recordings/file/<name>` (the asciicast itself), plus the player's static files.
//!
//! Only auditors (`recording.auditors`) signed in to the portal see any of it. Everyone else
//! gets the same 403 whether or not a recording exists, and a request without a session gets a
//! 401 (the file) or is sent to sign in (the pages): a recording's URL is useless on its own.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::web::{self, html};
use crate::body::RelayBody;
use crate::error::ProxyError;
use crate::state::State;

const PLAYER_JS: &[u8] = include_bytes!("../../assets/vendor/asciinema-player.min.js");
const PLAYER_CSS: &[u8] = include_bytes!("../../assets/vendor/asciinema-player.css");
const PLAYBACK_JS: &[u8] = include_bytes!("playback.js");

/// The player page runs the relay's own scripts, nothing else: the player compiles its
/// terminal emulator from WebAssembly (`'wasm-unsafe-eval'`), sets its element styles
/// (`'unsafe-inline'` for styles only) and fetches the recording from this origin.
const PLAYER_CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; font-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The paths served here.
pub fn serves(path: &str) -> bool {
    path == "/-/recordings"
        || path.starts_with("/-/recordings/")
        || matches!(
            path,
            "/-/static/asciinema-player.min.js"
                | "/-/static/asciinema-player.css"
                | "/-/static/playback.js"
        )
}

pub async fn handle(
    state: &State,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<RelayBody>, ProxyError> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(web::method_not_allowed("GET, HEAD"));
    }
    match path {
        "/-/static/asciinema-player.min.js" => {
            return Ok(web::static_file(PLAYER_JS, "text/javascript"))
        }
        "/-/static/asciinema-player.css" => {
            return Ok(web::static_file(PLAYER_CSS, "text/css; charset=utf-8"))
        }
        "/-/static/playback.js" => return Ok(web::static_file(PLAYBACK_JS, "text/javascript")),
        _ => {}
    }
    let Some(store) = &state.recordings else {
        return Err(ProxyError::NotFound(
            "session recording is not configured on this relay".into(),
        ));
    };
    let file = path.strip_prefix("/-/recordings/file/");
    let Some(p) = web::session_principal(state, req.headers()).await else {
        if file.is_some() {
            return Err(ProxyError::Unauthorized(crate::auth::AuthError {
                failure: crate::auth::AuthFailure::Missing,
                detail: "recordings need a signed-in portal session".into(),
            }));
        }
        let next = format!("/-/login?next={}", urlencode(path));
        return Ok(web::redirect(StatusCode::SEE_OTHER, &next, &[]));
    };
    if !web::is_auditor(state, &p, &state.groups.membership(&p).await) {
        tracing::info!(user = %p.user_key(), path, "recording access refused: not an auditor");
        return Ok(web::problem(
            StatusCode::FORBIDDEN,
            "Recordings are for auditors",
            "Only the relay's auditors (recording.auditors in its configuration) can list and play session recordings.",
            false,
        ));
    }
    if path == "/-/recordings" {
        let listed = store.list().await.map_err(store_error)?;
        return Ok(web::page(StatusCode::OK, list_page(&listed), &[]));
    }
    if let Some(name) = path.strip_prefix("/-/recordings/play/") {
        if !crate::recording::store::valid_name(name) {
            return Err(not_found());
        }
        let mut resp = web::page(StatusCode::OK, play_page(name), &[]);
        resp.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PLAYER_CSP),
        );
        return Ok(resp);
    }
    if let Some(name) = file {
        let Some(body) = store.open_read(name).await.map_err(store_error)? else {
            return Err(not_found());
        };
        tracing::info!(user = %p.user_key(), recording = name, "recording played");
        let mut resp = web::respond(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "no-store",
            Bytes::new(),
            &[],
            None,
        );
        *resp.body_mut() = body;
        // Opened directly, it is a download, never a page.
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
        return Ok(resp);
    }
    Err(not_found())
}

fn not_found() -> ProxyError {
    ProxyError::NotFound("no such recording".into())
}

fn store_error(e: crate::recording::StoreError) -> ProxyError {
    tracing::warn!(error = %e, "recording store");
    ProxyError::Internal(format!("recording store: {e}"))
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `<cluster>_<YYYYMMDDTHHMMSSZ>_<id>.cast` → (cluster, `YYYY-MM-DD HH:MM:SS UTC`).
fn describe(name: &str) -> (String, String) {
    let mut parts = name.trim_end_matches(".cast").splitn(3, '_');
    let cluster = parts.next().unwrap_or_default().to_owned();
    let t = parts.next().unwrap_or_default();
    let when = if t.len() == 16 && t.is_ascii() {
        format!(
            "{}-{}-{} {}:{}:{} UTC",
            &t[0..4],
            &t[4..6],
            &t[6..8],
            &t[9..11],
            &t[11..13],
            &t[13..15]
        )
    } else {
        t.to_owned()
    };
    (cluster, when)
}

fn list_page(listed: &[crate::recording::store::Listed]) -> String {
    use std::fmt::Write as _;
    let mut m = String::from("<h1>Session recordings</h1>\n");
    let shown: Vec<_> = listed.iter().filter(|l| l.bytes > 0).collect();
    if shown.is_empty() {
        m.push_str("<p id=\"no-recordings\">No sessions have been recorded yet.</p>\n");
    } else {
        m.push_str(
            "<table id=\"recordings\">\n<thead><tr><th scope=\"col\">Cluster</th><th scope=\"col\">Started</th><th scope=\"col\">Size</th><th scope=\"col\">Recording</th></tr></thead>\n<tbody>\n",
        );
        for l in shown {
            let (cluster, when) = describe(&l.name);
            let name = html::esc(&l.name);
            let _ = writeln!(
                m,
                "<tr data-recording=\"{name}\"><td>{cluster}</td><td>{when}</td><td>{kib} KiB</td><td><a href=\"/-/recordings/play/{name}\">Play</a></td></tr>",
                cluster = html::esc(&cluster),
                when = html::esc(&when),
                kib = l.bytes.div_ceil(1024),
            );
        }
        m.push_str("</tbody>\n</table>\n");
    }
    m.push_str("<p><a href=\"/\">Back to your clusters</a></p>\n");
    html::layout("Session recordings", &m)
}

fn play_page(name: &str) -> String {
    let (cluster, when) = describe(name);
    let name = html::esc(name);
    let m = format!(
        "<h1>Session recording</h1>\n<p id=\"recording-facts\">{cluster}, started {when}</p>\n\
         <div id=\"player\" data-src=\"/-/recordings/file/{name}\"></div>\n\
         <p class=\"actions\"><a href=\"/-/recordings/file/{name}\" id=\"download\">Download (asciicast v2)</a> \
         <a href=\"/-/recordings\">All recordings</a></p>\n",
        cluster = html::esc(&cluster),
        when = html::esc(&when),
    );
    html::layout_with(
        "Session recording",
        &m,
        "<link rel=\"stylesheet\" href=\"/-/static/asciinema-player.css\">\n",
        "<script src=\"/-/static/asciinema-player.min.js\"></script>\n<script src=\"/-/static/playback.js\"></script>\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_describe_cluster_and_time() {
        assert_eq!(
            describe("prod-weu_20261207T023000Z_abc.cast"),
            ("prod-weu".to_owned(), "2026-12-07 02:30:00 UTC".to_owned())
        );
    }

    #[test]
    fn pages_escape_names_and_use_only_our_scripts() {
        let page = play_page("a_20261207T023000Z_x.cast");
        assert!(page.contains("data-src=\"/-/recordings/file/a_20261207T023000Z_x.cast\""));
        assert!(!page.contains("<script>"), "no inline script");
        let listed = vec![crate::recording::store::Listed {
            name: "a_b_<x>.cast".into(),
            bytes: 10,
        }];
        assert!(list_page(&listed).contains("a_b_&lt;x&gt;.cast"));
    }
}
