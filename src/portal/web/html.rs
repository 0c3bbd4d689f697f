//! The portal's HTML, rendered on the server from plain view structs (no state, no I/O, so
//! every page is unit-testable).
//!
//! Invariant: every dynamic value reaches the markup through [`esc`]; the only unescaped
//! strings are literals in this file. Element ids, `data-cluster` attributes, `<h1>` texts and
//! button labels are relied on by the browser tests: change them together.

use std::fmt::Write as _;

pub use crate::html::html_escape as esc;

/// A whole document: `title` is text (escaped here), `main` is markup built with [`esc`].
pub fn layout(title: &str, main: &str) -> String {
    layout_with(title, main, "", "")
}

/// [`layout`] with more of the relay's own static assets: `head` (stylesheets) and `scripts`,
/// literal markup naming `/-/static/` files only.
pub fn layout_with(title: &str, main: &str, head: &str, scripts: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · kube-relay</title>\n\
         <link rel=\"stylesheet\" href=\"/-/static/portal.css\">\n{head}</head>\n<body>\n\
         <header class=\"site\"><a class=\"brand\" href=\"/\">kube-relay</a></header>\n\
         <main id=\"main\">\n{main}</main>\n\
         <footer class=\"site\"><p>kube-relay: one authenticated entry point to your Kubernetes clusters.</p></footer>\n\
         {scripts}</body>\n</html>\n",
        title = esc(title),
    )
}

/// A notice shown above the landing page's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Signed out of the portal only: the provider may still know this browser.
    SignedOut,
    /// Back from the provider's sign-out page.
    SignedOutAtProvider,
}

/// What the signed-out landing page needs.
pub struct Landing<'a> {
    /// How the sign-in button names the identity provider; `None`: the portal is off.
    pub issuer: Option<&'a str>,
    /// `kube-relay kubeconfig --relay <this>`.
    pub public_url: &'a str,
    pub notice: Option<Notice>,
    /// A session cookie came but could not be used: the page says so first.
    pub expired: bool,
}

pub fn landing(v: &Landing<'_>) -> String {
    let mut m = String::new();
    if v.expired {
        m.push_str(
            "<h1>Your session has expired</h1>\n\
             <p class=\"notice problem\" role=\"status\" id=\"notice\">Your session expired or is invalid. Sign in again to continue.</p>\n",
        );
    } else {
        m.push_str("<h1>kube-relay</h1>\n");
        let provider = v
            .issuer
            .map_or_else(|| "your identity provider".to_owned(), esc);
        match v.notice {
            // A shared computer is the case that matters: the next "Sign in" would go straight
            // through while the provider still remembers the browser.
            Some(Notice::SignedOut) => {
                let _ = writeln!(
                    m,
                    "<p class=\"notice\" role=\"status\" id=\"notice\">You have signed out of \
                     kube-relay. You may still be signed in at {provider}: on a shared computer, \
                     sign out there too or close every browser window.</p>"
                );
            }
            Some(Notice::SignedOutAtProvider) => {
                let _ = writeln!(
                    m,
                    "<p class=\"notice\" role=\"status\" id=\"notice\">You have signed out of \
                     kube-relay and returned from {provider}'s sign-out page.</p>"
                );
            }
            None => {}
        }
    }
    m.push_str(
        "<p>kube-relay is the one authenticated, audited entry point to this organisation's \
         private Kubernetes clusters. It checks who you are with your organisation's sign-in, \
         checks which clusters you may use, and relays kubectl to them: no VPN or jump host \
         needed.</p>\n",
    );
    match v.issuer {
        Some(issuer) => {
            let _ = write!(
                m,
                "<h2>Sign in with your browser</h2>\n\
                 <p>Sign in with your {issuer} account to see the clusters you may use and \
                 download a ready-made kubeconfig.</p>\n\
                 <p class=\"actions\"><a class=\"button\" id=\"sign-in\" href=\"/-/login\">Sign in</a></p>\n",
                issuer = esc(issuer),
            );
        }
        None => m.push_str(
            "<h2>Browser sign-in is off</h2>\n\
             <p id=\"portal-off\">This relay does not offer browser sign-in. Use the command line \
             below, or any tool that gets you a token this relay accepts.</p>\n",
        ),
    }
    let _ = write!(
        m,
        "<h2>Use the command line</h2>\n\
         <p>With the <code>kube-relay</code> binary installed, this signs you in and adds a \
         kubectl context for every cluster you may use:</p>\n\
         <pre><code id=\"cli-kubeconfig\">kube-relay kubeconfig --relay {url}</code></pre>\n",
        url = esc(v.public_url),
    );
    layout(
        if v.expired {
            "Session expired"
        } else {
            "Welcome"
        },
        &m,
    )
}

/// One cluster the signed-in user may use.
pub struct ClusterView {
    pub name: String,
    pub up: bool,
    /// `None`: every verb.
    pub verbs: Option<Vec<String>>,
    /// `None`: every namespace.
    pub namespaces: Option<Vec<String>>,
    /// Authentication contexts some of the caller's rules require (step-up); empty: none.
    pub auth_contexts: Vec<String>,
}

/// What the signed-in page needs.
pub struct Home<'a> {
    pub username: &'a str,
    pub issuer: &'a str,
    pub groups: usize,
    pub minutes_left: u64,
    pub clusters: &'a [ClusterView],
    pub public_url: &'a str,
    pub csrf: &'a str,
    /// The form asks for sign-out at the provider too (the page allows that redirect).
    pub sign_out_at_provider: bool,
    /// The user is one of `recording.auditors`: the page links to the recordings.
    pub auditor: bool,
    /// `login.portal.terminal`: the page links to the web terminal.
    pub terminal: bool,
}

pub fn home(v: &Home<'_>) -> String {
    let mut m = String::new();
    let _ = write!(
        m,
        "<h1>kube-relay</h1>\n\
         <section aria-labelledby=\"you\">\n<h2 id=\"you\">Signed in</h2>\n\
         <dl class=\"facts\" id=\"whoami\">\n\
         <dt>User</dt><dd id=\"username\">{user}</dd>\n\
         <dt>Identity provider</dt><dd id=\"issuer\">{issuer}</dd>\n\
         <dt>Groups</dt><dd id=\"groups\">{groups}</dd>\n\
         <dt>Session</dt><dd id=\"session-left\">ends in {mins} min</dd>\n\
         </dl>\n\
         <form class=\"actions\" method=\"post\" action=\"/-/logout\">\n\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\n{provider}\
         <button type=\"submit\" class=\"secondary\" id=\"sign-out\">Sign out</button>\n\
         </form>\n</section>\n",
        user = esc(v.username),
        issuer = esc(v.issuer),
        groups = v.groups,
        mins = v.minutes_left,
        csrf = esc(v.csrf),
        provider = if v.sign_out_at_provider {
            "<input type=\"hidden\" name=\"at_provider\" value=\"1\">\n"
        } else {
            ""
        },
    );

    m.push_str("<section aria-labelledby=\"your-clusters\">\n<h2 id=\"your-clusters\">Your clusters</h2>\n");
    // The list is always there when signed in (tests and assistive tech find it by id), even
    // when it is empty.
    // The name /-/kubeconfig gives the file: one per relay host, so two relays never clash.
    let file = esc(&url::Url::parse(v.public_url)
        .ok()
        .and_then(|u| u.host_str().map(|h| format!("{h}.kubeconfig")))
        .unwrap_or_else(|| "kube-relay.kubeconfig".to_owned()));
    if v.clusters.is_empty() {
        m.push_str(
            "<p id=\"no-clusters\">No cluster admits you yet. Ask the relay's administrators \
             for access, naming the user shown above.</p>\n",
        );
    } else {
        let _ = write!(
            m,
            "<p class=\"actions\">\
             <a class=\"button\" id=\"download-kubeconfig\" href=\"/-/kubeconfig\" download=\"{file}\">Download kubeconfig</a> \
             <a id=\"download-kubeconfig-sni\" href=\"/-/kubeconfig?style=sni\" download=\"{file}\">Download kubeconfig (SNI routing)</a></p>\n\
             <p class=\"muted\">The kubeconfig signs you in with <code>kube-relay token</code> when a token is needed.</p>\n",
        );
    }
    m.push_str("<ul class=\"clusters\" id=\"clusters\" aria-label=\"Clusters you may use\">\n");
    for c in v.clusters {
        let name = esc(&c.name);
        let (class, health) = if c.up { ("up", "up") } else { ("down", "down") };
        let _ = write!(
            m,
            "<li data-cluster=\"{name}\">\n<h3>{name}</h3>\n\
             <dl class=\"facts\">\n\
             <dt>Health</dt><dd><span class=\"health {class}\" data-health=\"{class}\">{health}</span></dd>\n\
             <dt>Verbs</dt><dd>{verbs}</dd>\n\
             <dt>Namespaces</dt><dd>{namespaces}</dd>\n\
             </dl>\n\
             <pre><code>kubectl --kubeconfig ~/Downloads/{file} --context {name} get pods</code></pre>\n",
            verbs = list_or_all(c.verbs.as_deref(), "all"),
            namespaces = list_or_all(c.namespaces.as_deref(), "all"),
        );
        for ctx in &c.auth_contexts {
            // Rules with `auth_context` admit only tokens from a step-up sign-in; the
            // kubeconfig has a second context for each (docs/architecture.md "Identity").
            let ctx = esc(ctx);
            let _ = write!(
                m,
                "<p class=\"step-up\" data-step-up=\"{ctx}\">Some actions need a step-up sign-in \
                 (authentication context <code>{ctx}</code>): use the context \
                 <code>{name}@{ctx}</code>.</p>\n\
                 <pre><code>kubectl --kubeconfig ~/Downloads/{file} --context {name}@{ctx} exec -it &lt;pod&gt; -- sh</code></pre>\n",
            );
        }
        m.push_str("</li>\n");
    }
    m.push_str("</ul>\n");
    m.push_str("</section>\n");
    if v.terminal && !v.clusters.is_empty() {
        m.push_str(
            "<section aria-labelledby=\"in-browser\">\n<h2 id=\"in-browser\">In the browser</h2>\n\
             <p><a class=\"button\" id=\"terminal-link\" href=\"/-/terminal\">Open a terminal</a> \
             in a pod, or follow its logs, without kubectl.</p>\n</section>\n",
        );
    }
    if v.auditor {
        m.push_str(
            "<section aria-labelledby=\"audit\">\n<h2 id=\"audit\">Audit</h2>\n\
             <p><a id=\"recordings-link\" href=\"/-/recordings\">Session recordings</a>: play back recorded exec and attach sessions.</p>\n</section>\n",
        );
    }
    let _ = write!(
        m,
        "<section aria-labelledby=\"cli\">\n<h2 id=\"cli\">Command line</h2>\n\
         <p>Or let <code>kube-relay</code> write the contexts into your kubeconfig:</p>\n\
         <pre><code id=\"cli-kubeconfig\">kube-relay kubeconfig --relay {url}</code></pre>\n</section>\n",
        url = esc(v.public_url),
    );
    layout("Your clusters", &m)
}

fn list_or_all(items: Option<&[String]>, all: &str) -> String {
    match items {
        None => esc(all),
        Some([]) => "none".to_owned(),
        Some(items) => items
            .iter()
            .map(|i| format!("<code>{}</code>", esc(i)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A page explaining one problem: `heading` becomes the `<h1>` (tests match on it), `text` a
/// paragraph; both are escaped. `retry`: offer "Sign in again".
pub fn problem(heading: &str, text: &str, retry: bool) -> String {
    let mut m = format!(
        "<h1>{}</h1>\n<p class=\"notice problem\" id=\"problem\">{}</p>\n",
        esc(heading),
        esc(text)
    );
    m.push_str("<p class=\"actions\">");
    if retry {
        m.push_str("<a class=\"button\" id=\"sign-in\" href=\"/-/login\">Sign in again</a> ");
    }
    m.push_str("<a href=\"/\" id=\"home\">Go to the start page</a></p>\n");
    layout(heading, &m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            esc(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
        assert_eq!(esc("plain café"), "plain café");
    }

    #[test]
    fn home_escapes_every_value() {
        let evil = "<img src=x onerror=alert(1)>\"'";
        let clusters = [ClusterView {
            name: evil.into(),
            up: false,
            verbs: Some(vec![evil.into()]),
            namespaces: Some(vec![evil.into()]),
            auth_contexts: vec![evil.into()],
        }];
        let page = home(&Home {
            username: evil,
            issuer: evil,
            groups: 3,
            minutes_left: 5,
            clusters: &clusters,
            public_url: evil,
            csrf: evil,
            sign_out_at_provider: false,
            auditor: false,
            terminal: false,
        });
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("\"'"), "{page}");
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;&quot;&#39;"));
        assert!(
            page.contains(">down</span>"),
            "health is text, not only colour"
        );
    }

    #[test]
    fn pages_are_accessible_shape() {
        let l = landing(&Landing {
            issuer: Some("dev"),
            public_url: "https://relay.example.com",
            notice: Some(Notice::SignedOut),
            expired: false,
        });
        for needle in [
            "<html lang=\"en\">",
            "<main",
            "<h1>kube-relay</h1>",
            ">Sign in</a>",
            "You have signed out of kube-relay. You may still be signed in at dev",
            "kube-relay kubeconfig --relay https://relay.example.com",
        ] {
            assert!(l.contains(needle), "{needle} missing in {l}");
        }
        let off = landing(&Landing {
            issuer: None,
            public_url: "https://r",
            notice: None,
            expired: true,
        });
        assert!(off.contains("<h1>Your session has expired</h1>"));
        assert!(off.contains("id=\"portal-off\""));
        assert!(!off.contains("/-/login"));
        let p = problem("Sign-in was denied", "<b>", true);
        assert!(p.contains("<h1>Sign-in was denied</h1>") && p.contains("&lt;b&gt;"));
    }
}
