//! Reads what passes through an exec or attach tunnel, without changing a byte, to find what the
//! terminal showed (docs/protocols.md §4): stdout and stderr, what was typed, resizes, and the
//! Status that ends the session.
//!
//! Two framings carry the same streams:
//! - WebSocket (`v4.channel.k8s.io`, `v5.channel.k8s.io`, and the `base64.` variants): each
//!   message starts with its channel byte (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize).
//! - SPDY/3.1: kubectl opens one stream per channel with SYN_STREAM, whose `streamtype` header
//!   names it; header blocks are zlib-compressed with the SPDY/3 dictionary, one compression
//!   context per direction for the whole connection, so every block the client sends is inflated
//!   to keep that context in step.
//!
//! Memory is bounded: only the small messages that must be whole (a resize, the error Status, a
//! control frame) are gathered, each up to a cap; everything else is handed on as it passes.

use std::collections::HashMap;

use base64::Engine as _;

/// What a decoder finds.
pub trait Events {
    /// Bytes the terminal showed (stdout or stderr).
    fn output(&mut self, data: &[u8]);
    /// Bytes typed into the session (stdin).
    fn input(&mut self, data: &[u8]);
    fn resize(&mut self, cols: u16, rows: u16);
}

/// The cap on a message gathered whole (resize, error Status, SPDY control frame).
const GATHER_CAP: usize = 64 * 1024;

/// What one channel carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Channel {
    Stdin,
    Output,
    Error,
    Resize,
    Other,
}

fn ws_channel(b: u8) -> Channel {
    match b {
        0 => Channel::Stdin,
        1 | 2 => Channel::Output,
        3 => Channel::Error,
        4 => Channel::Resize,
        _ => Channel::Other,
    }
}

/// A decoder for one tunnel, fed with the bytes of both directions in the order they pass.
pub enum Decoder {
    WebSocket(Box<WebSocket>),
    Spdy(Box<Spdy>),
}

/// Both directions of a WebSocket connection.
pub struct WebSocket {
    base64: bool,
    from_client: WsReader,
    from_server: WsReader,
}

impl Decoder {
    /// `subprotocol`: the WebSocket subprotocol the cluster chose; `None` for SPDY.
    pub fn new(subprotocol: Option<&str>) -> Self {
        match subprotocol {
            None => Self::Spdy(Box::default()),
            Some(p) => Self::WebSocket(Box::new(WebSocket {
                base64: p.starts_with("base64.") || p.contains(".base64."),
                from_client: WsReader::default(),
                from_server: WsReader::default(),
            })),
        }
    }

    /// Why the decoder lost track of the session, if it did: what it decodes after that
    /// would be wrong, so the recording stops there (the session itself is not touched).
    pub fn failure(&self) -> Option<&'static str> {
        match self {
            Self::WebSocket(ws) => ws.from_client.failed.or(ws.from_server.failed),
            Self::Spdy(s) => s.failed,
        }
    }

    pub fn from_client(&mut self, bytes: &[u8], ev: &mut impl Events) {
        match self {
            Self::WebSocket(ws) => ws
                .from_client
                .feed(bytes, ws.base64, &mut |ch, data, whole| {
                    client_message(ch, data, whole, ev)
                }),
            Self::Spdy(s) => s.feed(true, bytes, ev),
        }
    }

    pub fn from_server(&mut self, bytes: &[u8], ev: &mut impl Events) {
        match self {
            Self::WebSocket(ws) => ws.from_server.feed(bytes, ws.base64, &mut |ch, data, _| {
                if ch == Channel::Output {
                    ev.output(data);
                }
            }),
            Self::Spdy(s) => s.feed(false, bytes, ev),
        }
    }
}

/// Stdin passes piece by piece; a resize is read once whole.
fn client_message(ch: Channel, data: &[u8], whole: bool, ev: &mut impl Events) {
    match ch {
        Channel::Stdin => ev.input(data),
        Channel::Resize if whole => resize_messages(data, ev),
        _ => {}
    }
}

/// kubectl writes each terminal size as JSON, `{"Width":120,"Height":40}`, one after another.
fn resize_messages(data: &[u8], ev: &mut impl Events) {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width")]
        width: u16,
        #[serde(rename = "Height")]
        height: u16,
    }
    for s in serde_json::Deserializer::from_slice(data)
        .into_iter::<Size>()
        .map_while(Result::ok)
    {
        ev.resize(s.width, s.height);
    }
}

/// One direction of a WebSocket connection (RFC 6455 §5.2).
#[derive(Default)]
pub struct WsReader {
    head: Vec<u8>,
    /// Payload bytes left in the current frame.
    remaining: u64,
    in_payload: bool,
    mask: Option<[u8; 4]>,
    /// Position in the frame's payload (for unmasking).
    offset: u64,
    control: bool,
    fin: bool,
    /// The current message's channel, once its first payload byte passed.
    channel: Option<Channel>,
    /// A message gathered whole: a resize or error on the binary protocols, every message on the
    /// base64 ones (decoded once complete).
    gathered: Vec<u8>,
    scratch: Vec<u8>,
    failed: Option<&'static str>,
}

impl WsReader {
    /// `on(channel, data, whole)`: data of a message as it passes (`whole == false`), or a
    /// gathered message once complete (`whole == true`).
    fn feed(&mut self, mut bytes: &[u8], base64: bool, on: &mut impl FnMut(Channel, &[u8], bool)) {
        while !bytes.is_empty() && self.failed.is_none() {
            if !self.in_payload {
                let need = self.head_len();
                let take = (need - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.head.len() < self.head_len() {
                    continue;
                }
                self.start_frame();
                if self.remaining == 0 {
                    self.end_frame(base64, on);
                }
                continue;
            }
            let take = (self.remaining.min(bytes.len() as u64)) as usize;
            let (piece, rest) = bytes.split_at(take);
            bytes = rest;
            self.payload(piece, base64, on);
            self.remaining -= take as u64;
            if self.remaining == 0 {
                self.end_frame(base64, on);
            }
        }
    }

    /// The header's length, as far as the bytes so far tell.
    fn head_len(&self) -> usize {
        if self.head.len() < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn start_frame(&mut self) {
        let h = std::mem::take(&mut self.head);
        let opcode = h[0] & 0x0f;
        self.fin = h[0] & 0x80 != 0;
        self.control = opcode >= 8;
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (
                u64::from_be_bytes(h[2..10].try_into().unwrap_or_default()),
                10,
            ),
            n => (u64::from(n), 2),
        };
        self.mask = (h[1] & 0x80 != 0).then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        self.remaining = len;
        self.offset = 0;
        self.in_payload = true;
        if opcode == 1 || opcode == 2 {
            self.channel = None; // a new message
            self.gathered.clear();
        }
    }

    fn payload(&mut self, piece: &[u8], base64: bool, on: &mut impl FnMut(Channel, &[u8], bool)) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let data: &[u8] = match self.mask {
            Some(m) => {
                scratch.clear();
                scratch.extend(
                    piece
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ m[((self.offset + i as u64) % 4) as usize]),
                );
                &scratch
            }
            None => piece,
        };
        self.offset += piece.len() as u64;
        if !self.control && !data.is_empty() {
            let mut data = data;
            if self.channel.is_none() {
                let ch = if base64 {
                    ws_channel(data[0].wrapping_sub(b'0'))
                } else {
                    ws_channel(data[0])
                };
                self.channel = Some(ch);
                data = &data[1..];
            }
            let ch = self.channel.unwrap_or(Channel::Other);
            let gather = base64 || matches!(ch, Channel::Resize | Channel::Error);
            if gather {
                if self.gathered.len() + data.len() <= GATHER_CAP * 16 {
                    self.gathered.extend_from_slice(data);
                } else {
                    self.failed = Some("a WebSocket message too large to follow");
                }
            } else if ch != Channel::Other && !data.is_empty() {
                on(ch, data, false);
            }
        }
        self.scratch = scratch;
    }

    fn end_frame(&mut self, base64: bool, on: &mut impl FnMut(Channel, &[u8], bool)) {
        self.in_payload = false;
        if self.control || !self.fin {
            return;
        }
        let Some(ch) = self.channel.take() else {
            return;
        };
        let gathered = std::mem::take(&mut self.gathered);
        if base64 {
            if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(&gathered) {
                if matches!(ch, Channel::Resize | Channel::Error) {
                    on(ch, &raw, true);
                } else if ch != Channel::Other {
                    on(ch, &raw, false);
                }
            }
        } else if matches!(ch, Channel::Resize | Channel::Error) {
            on(ch, &gathered, true);
        }
        self.gathered = gathered;
        self.gathered.clear();
    }
}

// The SPDY/3 header-compression dictionary, shared with kube-sim's SPDY server (which cannot
// depend on this crate): one list for both.
include!("spdy3_dictionary.rs");

/// An SPDY/3.1 connection as kubectl's exec and attach use it.
pub struct Spdy {
    from_client: SpdyReader,
    from_server: SpdyReader,
    /// Stream id to what it carries, from the client's SYN_STREAM headers.
    streams: HashMap<u32, Channel>,
    /// The client's header-compression context; `None` once inflating failed (the session
    /// goes on; the recording then holds what was decoded until then).
    inflate: Option<flate2::Decompress>,
    dictionary: Vec<u8>,
    /// Bytes gathered across all streams (resize and error messages being read).
    gathered: usize,
    failed: Option<&'static str>,
}

/// kubectl opens at most five streams per session (error, stdin, stdout, stderr, resize).
const MAX_STREAMS: usize = 64;

impl Default for Spdy {
    fn default() -> Self {
        Self {
            from_client: SpdyReader::default(),
            from_server: SpdyReader::default(),
            streams: HashMap::new(),
            inflate: Some(flate2::Decompress::new(true)),
            dictionary: spdy3_dictionary(),
            gathered: 0,
            failed: None,
        }
    }
}

/// One direction of an SPDY connection: frame boundaries.
#[derive(Default)]
struct SpdyReader {
    head: Vec<u8>,
    remaining: u32,
    in_payload: bool,
    /// A control frame's type and body, gathered whole (up to [`GATHER_CAP`]); `None` for a
    /// data frame.
    control: Option<(u16, Vec<u8>)>,
    stream: u32,
    fin: bool,
    /// Per stream, a resize or error message being gathered.
    gathered: HashMap<u32, Vec<u8>>,
}

impl Spdy {
    fn feed(&mut self, client: bool, mut bytes: &[u8], ev: &mut impl Events) {
        while !bytes.is_empty() && self.failed.is_none() {
            let r = if client {
                &mut self.from_client
            } else {
                &mut self.from_server
            };
            if !r.in_payload {
                let take = (8 - r.head.len()).min(bytes.len());
                r.head.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if r.head.len() < 8 {
                    continue;
                }
                let h = std::mem::take(&mut r.head);
                let length = u32::from_be_bytes([0, h[5], h[6], h[7]]);
                r.fin = h[4] & 0x01 != 0;
                if h[0] & 0x80 != 0 {
                    r.control = Some((u16::from_be_bytes([h[2], h[3]]), Vec::new()));
                    r.stream = 0;
                } else {
                    r.control = None;
                    r.stream = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x7fff_ffff;
                }
                r.remaining = length;
                r.in_payload = true;
                r.head = h;
                r.head.clear();
                if length == 0 {
                    self.end_frame(client, ev);
                }
                continue;
            }
            let take = (r.remaining as usize).min(bytes.len());
            let (piece, rest) = bytes.split_at(take);
            bytes = rest;
            r.remaining -= take as u32;
            if let Some((_, c)) = r.control.as_mut() {
                if c.len() + piece.len() <= GATHER_CAP {
                    c.extend_from_slice(piece);
                } else {
                    // Its header block could not be inflated whole, and every later one
                    // depends on it.
                    self.failed = Some("an SPDY control frame too large to follow");
                    return;
                }
            } else {
                let ch = self
                    .streams
                    .get(&r.stream)
                    .copied()
                    .unwrap_or(Channel::Other);
                match (client, ch) {
                    (true, Channel::Stdin) => ev.input(piece),
                    (false, Channel::Output) => ev.output(piece),
                    (_, Channel::Resize | Channel::Error) => {
                        if self.gathered + piece.len() > GATHER_CAP * 4 {
                            self.failed = Some("SPDY resize or error messages too large to follow");
                            return;
                        }
                        self.gathered += piece.len();
                        r.gathered
                            .entry(r.stream)
                            .or_default()
                            .extend_from_slice(piece);
                    }
                    _ => {}
                }
            }
            if r.remaining == 0 {
                self.end_frame(client, ev);
            }
        }
    }

    fn end_frame(&mut self, client: bool, ev: &mut impl Events) {
        let r = if client {
            &mut self.from_client
        } else {
            &mut self.from_server
        };
        r.in_payload = false;
        let stream = r.stream;
        match r.control.take() {
            None => {
                // A resize stream carries one JSON object per size: read what is complete.
                if client && self.streams.get(&stream) == Some(&Channel::Resize) {
                    if let Some(g) = r.gathered.get_mut(&stream) {
                        if let Some(end) = g.iter().rposition(|&b| b == b'\n' || b == b'}') {
                            let done: Vec<u8> = g.drain(..=end).collect();
                            self.gathered = self.gathered.saturating_sub(done.len());
                            resize_messages(&done, ev);
                        }
                    }
                }
                if r.fin {
                    if let Some(g) = r.gathered.remove(&stream) {
                        self.gathered = self.gathered.saturating_sub(g.len());
                    }
                }
            }
            Some((kind, frame)) => {
                if client {
                    self.client_control(kind, &frame);
                }
            }
        }
    }

    /// A control frame from the client, without its 8-byte head: SYN_STREAM (1) names a new
    /// stream's channel; its header block, like that of HEADERS (8), moves the shared
    /// compression context on.
    fn client_control(&mut self, kind: u16, frame: &[u8]) {
        const SYN_STREAM: u16 = 1;
        const RST_STREAM: u16 = 3;
        const HEADERS: u16 = 8;
        if kind == RST_STREAM && frame.len() >= 4 {
            let id = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) & 0x7fff_ffff;
            self.streams.remove(&id);
            for r in [&mut self.from_client, &mut self.from_server] {
                if let Some(g) = r.gathered.remove(&id) {
                    self.gathered = self.gathered.saturating_sub(g.len());
                }
            }
            return;
        }
        let (stream, block) = match kind {
            SYN_STREAM if frame.len() >= 10 => (
                u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) & 0x7fff_ffff,
                &frame[10..],
            ),
            HEADERS if frame.len() >= 4 => (0, &frame[4..]),
            _ => return,
        };
        let Some(headers) = self.inflate(block) else {
            self.failed = Some("an SPDY header block that does not inflate");
            return;
        };
        if kind == SYN_STREAM {
            if self.streams.len() >= MAX_STREAMS && !self.streams.contains_key(&stream) {
                self.failed = Some("more SPDY streams than a session opens");
                return;
            }
            let ch = match header_value(&headers, b"streamtype") {
                Some(b"stdin") => Channel::Stdin,
                Some(b"stdout" | b"stderr") => Channel::Output,
                Some(b"error") => Channel::Error,
                Some(b"resize") => Channel::Resize,
                _ => Channel::Other,
            };
            self.streams.insert(stream, ch);
        }
    }

    /// Inflates one header block in the client's compression context.
    fn inflate(&mut self, mut input: &[u8]) -> Option<Vec<u8>> {
        let d = self.inflate.as_mut()?;
        let mut out = Vec::with_capacity(input.len() * 4 + 256);
        loop {
            let (in0, out0) = (d.total_in(), out.len());
            let r = d.decompress_vec(input, &mut out, flate2::FlushDecompress::Sync);
            input = &input[(d.total_in() - in0) as usize..];
            match r {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    if d.set_dictionary(&self.dictionary).is_err() {
                        self.inflate = None;
                        return None;
                    }
                    continue;
                }
                Err(_) => {
                    self.inflate = None;
                    return None;
                }
            }
            if input.is_empty() && out.len() < out.capacity() {
                return Some(out);
            }
            if out.len() >= GATHER_CAP {
                // More than any header block of a session: the context would lose step if the
                // rest were not consumed, and the headers are not worth reading.
                return None;
            }
            if out.len() == out0 && input.is_empty() {
                return Some(out);
            }
            out.reserve(4096);
        }
    }
}

/// The first value of `name` in an inflated SPDY/3 header block (32-bit counts and lengths).
fn header_value<'a>(block: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let take = |b: &'a [u8], at: usize| -> Option<(&'a [u8], usize)> {
        let n = u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        Some((b.get(at + 4..at + 4 + n)?, at + 4 + n))
    };
    let count = u32::from_be_bytes(block.get(..4)?.try_into().ok()?);
    let mut at = 4;
    for _ in 0..count {
        let (n, next) = take(block, at)?;
        let (v, next) = take(block, next)?;
        at = next;
        if n == name {
            return v.split(|&b| b == 0).next();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq)]
    struct Seen {
        output: Vec<u8>,
        input: Vec<u8>,
        sizes: Vec<(u16, u16)>,
    }

    impl Events for Seen {
        fn output(&mut self, data: &[u8]) {
            self.output.extend_from_slice(data);
        }
        fn input(&mut self, data: &[u8]) {
            self.input.extend_from_slice(data);
        }
        fn resize(&mut self, cols: u16, rows: u16) {
            self.sizes.push((cols, rows));
        }
    }

    /// One WebSocket frame; masked as a client sends it when `mask` is set.
    fn ws_frame(opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    /// Feeds `bytes` one byte at a time and in one piece: both must see the same.
    fn both_ways(bytes: &[u8], client: bool, sub: Option<&str>) -> Seen {
        let mut whole = Seen::default();
        let mut d = Decoder::new(sub);
        if client {
            d.from_client(bytes, &mut whole);
        } else {
            d.from_server(bytes, &mut whole);
        }
        let mut split = Seen::default();
        let mut d = Decoder::new(sub);
        for b in bytes {
            if client {
                d.from_client(std::slice::from_ref(b), &mut split);
            } else {
                d.from_server(std::slice::from_ref(b), &mut split);
            }
        }
        assert_eq!(whole, split, "split reads decode the same");
        whole
    }

    #[test]
    fn websocket_output_skips_the_error_channel_and_control_frames() {
        let mut s = Vec::new();
        s.extend(ws_frame(2, true, &[1], None)); // the empty first message
        s.extend(ws_frame(2, true, b"\x01hello ", None));
        s.extend(ws_frame(9, true, b"ping", None));
        s.extend(ws_frame(2, true, b"\x02oops\n", None));
        s.extend(ws_frame(2, true, b"\x03{\"status\":\"Success\"}", None));
        let big = [&[1u8][..], &[b'x'; 70_000][..]].concat();
        s.extend(ws_frame(2, true, &big, None));
        let seen = both_ways(&s, false, Some("v5.channel.k8s.io"));
        assert!(seen.output.starts_with(b"hello oops\n"));
        assert_eq!(seen.output.len(), 11 + 70_000);
    }

    #[test]
    fn websocket_client_frames_are_unmasked_and_fragments_keep_their_channel() {
        let k = [0x12, 0x34, 0x56, 0x78];
        let mut c = Vec::new();
        c.extend(ws_frame(
            2,
            true,
            b"\x04{\"Width\":120,\"Height\":40}",
            Some(k),
        ));
        c.extend(ws_frame(2, false, b"\x00ls ", Some(k)));
        c.extend(ws_frame(10, true, b"", Some(k))); // a pong between fragments
        c.extend(ws_frame(0, true, b"-la\r", Some(k)));
        c.extend(ws_frame(2, true, &[255, 0], Some(k))); // v5: stdin closed
        let seen = both_ways(&c, true, Some("v5.channel.k8s.io"));
        assert_eq!(seen.sizes, vec![(120, 40)]);
        assert_eq!(seen.input, b"ls -la\r");
    }

    #[test]
    fn websocket_base64_channels_are_decoded() {
        let mut s = ws_frame(1, true, b"1aGk=", None);
        s.extend(ws_frame(1, true, b"2dGhlcmU=", None));
        let seen = both_ways(&s, false, Some("base64.channel.k8s.io"));
        assert_eq!(seen.output, b"hithere");
    }

    /// An SPDY/3 control frame.
    fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80, 0x03];
        f.extend_from_slice(&kind.to_be_bytes());
        f.push(flags);
        f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(body);
        f
    }

    fn data(stream: u32, fin: bool, body: &[u8]) -> Vec<u8> {
        let mut f = stream.to_be_bytes().to_vec();
        f.push(u8::from(fin));
        f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(body);
        f
    }

    /// A SYN_STREAM whose header block is compressed in `z`, as a client's would be.
    fn syn_stream(z: &mut flate2::Compress, id: u32, kind: &str) -> Vec<u8> {
        let mut block = Vec::new();
        let pairs = [("streamtype", kind)];
        block.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
        for (n, v) in pairs {
            block.extend_from_slice(&(n.len() as u32).to_be_bytes());
            block.extend_from_slice(n.as_bytes());
            block.extend_from_slice(&(v.len() as u32).to_be_bytes());
            block.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(block.len() + 1024);
        z.compress_vec(&block, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&out);
        control(1, 0, &body)
    }

    #[test]
    fn the_spdy_dictionary_is_the_one_spdy3_defines() {
        let d = spdy3_dictionary();
        assert_eq!(d.len(), 1423);
        let mut a = flate2::Compress::new(flate2::Compression::default(), true);
        // zlib identifies a preset dictionary by its Adler-32: the SPDY/3 one is 0xe3c6a7c2.
        assert_eq!(a.set_dictionary(&d).unwrap(), 0xe3c6_a7c2);
    }

    #[test]
    fn spdy_streams_are_told_apart_by_their_compressed_headers() {
        let mut z = flate2::Compress::new(flate2::Compression::best(), true);
        z.set_dictionary(&spdy3_dictionary()).unwrap();
        let mut c = Vec::new();
        c.extend(syn_stream(&mut z, 1, "error"));
        c.extend(syn_stream(&mut z, 3, "stdin"));
        c.extend(syn_stream(&mut z, 5, "stdout"));
        c.extend(syn_stream(&mut z, 7, "resize"));
        c.extend(control(6, 0, &[0, 0, 0, 1])); // PING
        c.extend(data(3, false, b"echo hi\r"));
        c.extend(data(7, false, b"{\"Width\":100,\"Height\":30}\n"));
        let mut s = Vec::new();
        s.extend(control(2, 0, &[0, 0, 0, 1])); // a SYN_REPLY (server side, not inflated)
        s.extend(data(5, false, b"hi\r\n"));
        s.extend(data(1, true, b"{\"status\":\"Success\"}"));
        for split in [false, true] {
            let mut seen = Seen::default();
            let mut d = Decoder::new(None);
            if split {
                for b in &c {
                    d.from_client(std::slice::from_ref(b), &mut seen);
                }
                for b in &s {
                    d.from_server(std::slice::from_ref(b), &mut seen);
                }
            } else {
                d.from_client(&c, &mut seen);
                d.from_server(&s, &mut seen);
            }
            assert_eq!(seen.output, b"hi\r\n", "split {split}");
            assert_eq!(seen.input, b"echo hi\r");
            assert_eq!(seen.sizes, vec![(100, 30)]);
        }
    }

    #[test]
    fn a_session_the_decoder_cannot_follow_says_so_instead_of_recording_wrongly() {
        // More streams than any session opens.
        let mut z = flate2::Compress::new(flate2::Compression::best(), true);
        z.set_dictionary(&spdy3_dictionary()).unwrap();
        let mut d = Decoder::new(None);
        let mut seen = Seen::default();
        for id in 0..(MAX_STREAMS as u32 + 1) {
            d.from_client(&syn_stream(&mut z, 2 * id + 1, "stdout"), &mut seen);
        }
        assert!(d.failure().is_some());
        // A control frame larger than any header block.
        let mut d = Decoder::new(None);
        d.from_client(&control(1, 0, &vec![0u8; GATHER_CAP + 10]), &mut seen);
        assert!(d.failure().is_some());
        // A header block that is not zlib.
        let mut d = Decoder::new(None);
        d.from_client(
            &control(1, 0, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3]),
            &mut seen,
        );
        assert!(d.failure().is_some());
        // A WebSocket resize message of a megabyte and more.
        let mut d = Decoder::new(Some("v5.channel.k8s.io"));
        let big = [&[4u8][..], &vec![b' '; GATHER_CAP * 16 + 1][..]].concat();
        d.from_client(&ws_frame(2, true, &big, Some([1, 2, 3, 4])), &mut seen);
        assert!(d.failure().is_some());
        // Closed streams give their memory back.
        let mut z = flate2::Compress::new(flate2::Compression::best(), true);
        z.set_dictionary(&spdy3_dictionary()).unwrap();
        let mut d = Decoder::new(None);
        d.from_client(&syn_stream(&mut z, 1, "error"), &mut seen);
        for _ in 0..100 {
            d.from_server(&data(1, false, &[b'x'; 1000]), &mut seen);
            d.from_client(&control(3, 0, &[0, 0, 0, 1, 0, 0, 0, 5]), &mut seen); // RST_STREAM 1
            d.from_client(&syn_stream(&mut z, 1, "error"), &mut seen);
        }
        assert!(d.failure().is_none(), "{:?}", d.failure());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seen = Seen::default();
        for sub in [
            None,
            Some("v4.channel.k8s.io"),
            Some("base64.channel.k8s.io"),
        ] {
            let mut d = Decoder::new(sub);
            let junk: Vec<u8> = (0..20_000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            d.from_client(&junk, &mut seen);
            d.from_server(&junk, &mut seen);
        }
    }
}
