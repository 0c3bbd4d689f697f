//! HTML escaping, the one way dynamic text enters markup the relay writes: the portal's pages
//! and the CLI's sign-in result page. User names, cluster names and provider error text are
//! dynamic and attacker-influenced, so none reaches a page unescaped.

/// Escapes text for HTML element content and double- or single-quoted attribute values (the
/// portal's pages and the CLI's sign-in result page).
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
