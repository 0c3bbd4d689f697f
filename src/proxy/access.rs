//! The access log line (docs/operations.md "Read the audit and access logs"), composed here
//! and handed to the process log as one message.
//!
//! Why not a tracing event with one field per value: the log formatter writes each field,
//! and then the message, through `core::fmt` with its styling and a character-by-character
//! escaping writer, about 15,000 instructions a request: more than anything else the relay
//! does for a request after TLS and HTTP/2 header decoding (docs/perf). When the process log
//! goes to its writer thread without colours (a file, journald, a container log: the
//! service), the line is composed here in the same layout the formatter gives it and queued
//! on that writer directly. Otherwise (colours at a terminal, the library's own tests) it is
//! an ordinary event. Either way the log filter (`RUST_LOG`) decides whether it is written.

use std::fmt::Write;
use std::sync::OnceLock;

use http::HeaderValue;

use crate::lines::LineWriter;

const TARGET: &str = "kube_relay::access";

/// The process log's writer, when access lines may skip the formatter (see the module docs).
static DIRECT: OnceLock<LineWriter> = OnceLock::new();

/// Queues access lines on `writer` directly from now on. For the binary's process log when
/// it is written without colours; a second call is ignored.
pub fn write_directly_to(writer: LineWriter) {
    let _ = DIRECT.set(writer);
}

/// Logs `line` at INFO under [`TARGET`], if the filter lets that through.
pub(super) fn log(line: &Line<'_>) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    match DIRECT.get() {
        Some(writer) => {
            // As the formatter's writer does: never dropped, a full queue waits.
            writer.write_blocking(direct(line, std::time::SystemTime::now()).into_bytes());
        }
        None => tracing::info!(target: TARGET, "{}", line.render()),
    }
}

/// `line` as the formatter lays out an event without colours: RFC 3339 UTC to the
/// microsecond, the level right-aligned in five columns, the target, the message.
fn direct(line: &Line<'_>, now: std::time::SystemTime) -> String {
    let mut s = String::with_capacity(224 + line.path.len());
    let _ = write!(
        s,
        "{}  INFO {TARGET}: ",
        humantime::format_rfc3339_micros(now)
    );
    line.render_into(&mut s);
    s.push('\n');
    s
}

/// One request's access line, without the timestamp, level and target the log adds.
pub(super) struct Line<'a> {
    pub(super) audit_id: &'a HeaderValue,
    pub(super) peer: std::net::SocketAddr,
    pub(super) method: &'a http::Method,
    /// The path without the query: queries can carry label values users consider sensitive.
    pub(super) path: &'a str,
    pub(super) cluster: &'a str,
    pub(super) verb: &'a str,
    /// `None` before authentication.
    pub(super) user: Option<&'a str>,
    pub(super) code: u16,
    pub(super) ms: u64,
}

impl Line<'_> {
    /// `request audit_id="…" peer=… method=… path=… cluster=… verb=… user="…" code=… ms=…`:
    /// quoted values are written as `{:?}` writes them, so a caller's odd bytes are escaped
    /// and cannot start a line of their own.
    pub(super) fn render(&self) -> String {
        let mut s = String::with_capacity(160 + self.path.len());
        self.render_into(&mut s);
        s
    }

    fn render_into(&self, s: &mut String) {
        s.push_str("request audit_id=");
        match self.audit_id.to_str() {
            Ok(id) => quoted(s, id),
            Err(_) => {
                let _ = write!(s, "{:?}", self.audit_id);
            }
        }
        let _ = write!(s, " peer={} method=", self.peer);
        s.push_str(self.method.as_str());
        s.push_str(" path=");
        s.push_str(self.path);
        s.push_str(" cluster=");
        s.push_str(self.cluster);
        s.push_str(" verb=");
        s.push_str(self.verb);
        s.push_str(" user=");
        match self.user {
            Some(user) => quoted(s, user),
            None => s.push_str("\"-\""),
        }
        let _ = write!(s, " code={} ms={}", self.code, self.ms);
    }
}

/// `v` as `{:?}` writes a string: printable ASCII without quotes or backslashes is copied
/// as it is (the common case); anything else goes through `Debug`'s escaping.
fn quoted(s: &mut String, v: &str) {
    if v.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        s.push('"');
        s.push_str(v);
        s.push('"');
    } else {
        let _ = write!(s, "{v:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(audit_id: &'a HeaderValue, user: Option<&'a str>, path: &'a str) -> Line<'a> {
        Line {
            audit_id,
            peer: "10.1.2.3:51234".parse().unwrap(),
            method: &http::Method::GET,
            path,
            cluster: "prod-weu",
            verb: "list",
            user,
            code: 200,
            ms: 41,
        }
    }

    #[test]
    fn the_line_reads_as_the_operations_guide_shows_it() {
        let id = HeaderValue::from_static("8c4e0f1a-0000-4000-8000-000000000001");
        assert_eq!(
            line(
                &id,
                Some("alice@contoso.com"),
                "/clusters/prod-weu/api/v1/pods"
            )
            .render(),
            "request audit_id=\"8c4e0f1a-0000-4000-8000-000000000001\" peer=10.1.2.3:51234 \
             method=GET path=/clusters/prod-weu/api/v1/pods cluster=prod-weu verb=list \
             user=\"alice@contoso.com\" code=200 ms=41"
        );
        assert!(line(&id, None, "/x").render().contains(" user=\"-\" "));
    }

    /// The line queued directly is the line the formatter writes for the event, byte for
    /// byte after the timestamp; the timestamps have the same shape.
    #[test]
    fn the_direct_line_is_laid_out_as_the_formatter_lays_it_out() {
        let id = HeaderValue::from_static("8c4e0f1a-0000-4000-8000-000000000001");
        let l = line(
            &id,
            Some("alice@contoso.com"),
            "/clusters/prod-weu/api/v1/pods",
        );
        let formatted = crate::lines::captured_log(|| {
            tracing::info!(target: TARGET, "{}", l.render());
        });
        let now = std::time::SystemTime::now();
        let ours = direct(&l, now);
        let (their_time, their_rest) = formatted.split_at(27);
        let (our_time, our_rest) = ours.split_at(27);
        assert_eq!(our_rest, their_rest);
        assert!(their_rest.starts_with("  INFO kube_relay::access: request audit_id="));
        for t in [their_time, our_time] {
            assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
            humantime::parse_rfc3339(t).unwrap();
        }
    }

    /// A token's username and a client's Audit-ID are the caller's text: quotes, newlines and
    /// other bytes come out escaped exactly as `{:?}` escapes them, on one line.
    #[test]
    fn callers_text_is_escaped_as_debug_escapes_it() {
        for user in [
            "alice",
            "a\"b",
            "a\\b",
            "eve\nINFO kube_relay::access: request user=\"admin\"",
            "tab\there",
            "ümlaut",
            "\u{1b}[31mred",
            "",
        ] {
            let mut s = String::new();
            quoted(&mut s, user);
            assert_eq!(s, format!("{user:?}"), "{user}");
            assert!(!s.contains('\n'));
        }
        let odd = HeaderValue::from_bytes(b"id\xff\"x").unwrap();
        let rendered = line(&odd, Some("a"), "/x").render();
        assert!(
            rendered.starts_with(&format!("request audit_id={odd:?} ")),
            "{rendered}"
        );
    }
}
