//! asciicast v2 (the format asciinema-player plays): a JSON header line, then one JSON array per
//! event, `[seconds, code, data]`, with codes `o` (what the terminal showed), `i` (what was
//! typed), `r` (a resize, `"<cols>x<rows>"`) and `m` (a marker, shown on the player's timeline).
//!
//! Terminal output arrives in arbitrary pieces and may split a UTF-8 sequence; the few bytes of
//! an unfinished sequence are carried to the next piece so every event is valid text.

use serde_json::json;

/// One session's header.
pub struct Header<'a> {
    pub width: u16,
    pub height: u16,
    /// Seconds since the Unix epoch when the session opened.
    pub timestamp: u64,
    pub title: &'a str,
    pub command: &'a str,
}

impl Header<'_> {
    pub fn line(&self) -> String {
        let mut s = json!({
            "version": 2,
            "width": self.width,
            "height": self.height,
            "timestamp": self.timestamp,
            "title": self.title,
            "command": self.command,
            "env": {"TERM": "xterm-256color"},
        })
        .to_string();
        s.push('\n');
        s
    }
}

/// Encodes events of one direction, keeping an unfinished UTF-8 sequence for the next piece.
#[derive(Default)]
pub struct Text {
    carry: Vec<u8>,
}

impl Text {
    /// Appends `[t, code, text]` for `data` (plus what was carried) to `out`; nothing when the
    /// piece only starts a sequence.
    pub fn event(&mut self, out: &mut String, t: f64, code: &str, data: &[u8]) {
        let owned;
        let bytes: &[u8] = if self.carry.is_empty() {
            data
        } else {
            self.carry.extend_from_slice(data);
            owned = std::mem::take(&mut self.carry);
            &owned
        };
        let keep = unfinished_tail(bytes);
        let (text, rest) = bytes.split_at(bytes.len() - keep);
        self.carry.extend_from_slice(rest);
        if text.is_empty() {
            return;
        }
        push_event(out, t, code, &String::from_utf8_lossy(text));
    }
}

/// `[t, "r", "<cols>x<rows>"]`.
pub fn resize(out: &mut String, t: f64, cols: u16, rows: u16) {
    push_event(out, t, "r", &format!("{cols}x{rows}"));
}

/// `[t, "m", label]`.
pub fn marker(out: &mut String, t: f64, label: &str) {
    push_event(out, t, "m", label);
}

fn push_event(out: &mut String, t: f64, code: &str, text: &str) {
    out.push_str(&json!([(t * 1e6).round() / 1e6, code, text]).to_string());
    out.push('\n');
}

/// How many bytes at the end of `b` begin a UTF-8 sequence that is not complete yet (0-3).
fn unfinished_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let byte = b[b.len() - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: look further back for the lead
        }
        let need = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_asciicast_v2() {
        let h = Header {
            width: 80,
            height: 24,
            timestamp: 1_700_000_000,
            title: "dev/alice on alpha: default/web-0",
            command: "sh",
        };
        let v: serde_json::Value = serde_json::from_str(h.line().trim_end()).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["width"], 80);
        assert_eq!(v["height"], 24);
    }

    #[test]
    fn a_utf8_sequence_split_across_pieces_stays_whole() {
        let mut t = Text::default();
        let mut out = String::new();
        let euro = "€".as_bytes(); // three bytes
        t.event(&mut out, 0.5, "o", &[b'a', euro[0]]);
        t.event(&mut out, 0.6, "o", &euro[1..2]);
        t.event(&mut out, 0.7, "o", &[euro[2], b'b']);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], json!([0.5, "o", "a"]));
        assert_eq!(lines[1], json!([0.7, "o", "€b"]));
    }

    #[test]
    fn control_bytes_and_invalid_utf8_are_escaped_not_lost() {
        let mut t = Text::default();
        let mut out = String::new();
        t.event(&mut out, 1.0, "o", b"\x1b[31mred\r\n\xff");
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v[2], "\u{1b}[31mred\r\n\u{fffd}");
        resize(&mut out, 2.0, 120, 40);
        assert!(out.ends_with("[2.0,\"r\",\"120x40\"]\n"));
    }
}
