//! The web terminal and live logs page (`/-/terminal`, with `login.portal.terminal: true`) and
//! its scripts. The page only renders the pickers and the terminal; everything it does goes
//! through the gateway (`gateway.rs`) as the signed-in user.

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::fmt::Write as _;

use super::web::{self, html};
use crate::body::RelayBody;
use crate::error::ProxyError;
use crate::state::State;

const XTERM_JS: &[u8] = include_bytes!("../../assets/vendor/xterm.js");
const XTERM_CSS: &[u8] = include_bytes!("../../assets/vendor/xterm.css");
const FIT_JS: &[u8] = include_bytes!("../../assets/vendor/addon-fit.js");
const TERMINAL_JS: &[u8] = include_bytes!("terminal.js");

/// Only the relay's own scripts; xterm sets element styles (`'unsafe-inline'` for styles
/// only); the page talks to this origin alone (fetch and the terminal's WebSocket).
const TERMINAL_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; font-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn serves(path: &str) -> bool {
    matches!(
        path,
        "/-/terminal"
            | "/-/static/xterm.js"
            | "/-/static/xterm.css"
            | "/-/static/addon-fit.js"
            | "/-/static/terminal.js"
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
        "/-/static/xterm.js" => return Ok(web::static_file(XTERM_JS, "text/javascript")),
        "/-/static/xterm.css" => return Ok(web::static_file(XTERM_CSS, "text/css; charset=utf-8")),
        "/-/static/addon-fit.js" => return Ok(web::static_file(FIT_JS, "text/javascript")),
        "/-/static/terminal.js" => return Ok(web::static_file(TERMINAL_JS, "text/javascript")),
        _ => {}
    }
    let enabled = state
        .cfg
        .login
        .as_ref()
        .and_then(|l| l.portal.as_ref())
        .is_some_and(|p| p.terminal);
    if !enabled {
        return Err(ProxyError::NotFound(
            "the web terminal is not enabled on this relay (login.portal.terminal)".into(),
        ));
    }
    let Some((session, p)) = web::signed_in(state, req.headers()).await else {
        return Ok(web::redirect(
            StatusCode::SEE_OTHER,
            "/-/login?next=/-/terminal",
            &[],
        ));
    };
    let membership = state.groups.membership(&p).await;
    let clusters: Vec<String> = state
        .cfg
        .clusters
        .iter()
        .filter(|c| crate::authz::permissions(&p, c, &membership).is_some())
        .map(|c| c.name.to_string())
        .collect();
    let mut resp = web::page(StatusCode::OK, page(&clusters, &session.csrf), &[]);
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(TERMINAL_CSP),
    );
    Ok(resp)
}

fn page(clusters: &[String], csrf: &str) -> String {
    let mut options = String::new();
    for c in clusters {
        let c = html::esc(c);
        let _ = write!(options, "<option value=\"{c}\">{c}</option>");
    }
    let m = format!(
        "<h1>Terminal</h1>\n\
         <div id=\"terminal-app\" data-csrf=\"{csrf}\" data-namespace=\"default\">\n\
         <div class=\"pickers\">\n\
         <label>Cluster <select id=\"cluster\">{options}</select></label>\n\
         <label>Namespace <select id=\"namespace\"></select></label>\n\
         <label>Pod <select id=\"pod\"></select></label>\n\
         <label>Container <select id=\"container\"></select></label>\n\
         <label>Command <input id=\"command\" value=\"sh\" autocomplete=\"off\"></label>\n\
         <p class=\"actions\"><button type=\"button\" id=\"open-terminal\">Open terminal</button> \
         <button type=\"button\" class=\"secondary\" id=\"close-terminal\">Close terminal</button></p>\n\
         <label>Log lines <input id=\"tail\" type=\"number\" min=\"1\" max=\"10000\" value=\"100\"></label>\n\
         <p class=\"actions\"><button type=\"button\" id=\"follow-logs\">Follow logs</button> \
         <button type=\"button\" class=\"secondary\" id=\"stop-logs\">Stop logs</button></p>\n\
         </div>\n\
         <p id=\"terminal-status\" role=\"status\" aria-live=\"polite\">Choose a pod.</p>\n\
         <p class=\"muted\">Exit code: <span id=\"exit-code\"></span></p>\n\
         <div id=\"terminal\" aria-label=\"Terminal\"></div>\n\
         <h2>Logs</h2>\n<pre id=\"logs\" aria-label=\"Logs\" tabindex=\"0\"></pre>\n\
         </div>\n<p><a href=\"/\">Back to your clusters</a></p>\n",
        csrf = html::esc(csrf),
    );
    html::layout_with(
        "Terminal",
        &m,
        "<link rel=\"stylesheet\" href=\"/-/static/xterm.css\">\n",
        "<script src=\"/-/static/xterm.js\"></script>\n<script src=\"/-/static/addon-fit.js\"></script>\n<script src=\"/-/static/terminal.js\"></script>\n",
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_has_no_inline_script_and_escapes_names() {
        let p = super::page(&["a<b".to_owned()], "tok\"en");
        assert!(!p.contains("<script>"));
        assert!(p.contains("a&lt;b") && p.contains("tok&quot;en"));
    }
}
