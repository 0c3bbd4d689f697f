//! SPDY/3.1 framing and a server-side session (hand-written: no maintained crate exists).
//!
//! Kubernetes streaming (exec, attach, cp, port-forward) still runs over SPDY/3.1 as spoken by
//! `moby/spdystream`, the library inside kubectl, client-go, kube-apiserver and the kubelet. This
//! module implements the subset those peers use, from the SPDY/3.1 draft:
//!
//! - Control frame: `C=1 | version:15 | type:16 | flags:8 | length:24 | payload`; data frame:
//!   `C=0 | stream-id:31 | flags:8 | length:24 | data` (§2.2).
//! - Types: SYN_STREAM 1, SYN_REPLY 2, RST_STREAM 3, SETTINGS 4, PING 6, GOAWAY 7, HEADERS 8,
//!   WINDOW_UPDATE 9 (§2.6; 3.1 dropped CREDENTIAL and added session flow control on stream 0).
//! - Header blocks: `u32 count`, then `u32 len, name, u32 len, value` pairs, names lower-case,
//!   several values joined by NUL (§2.6.10). Each block is zlib-compressed with the SPDY/3
//!   dictionary (§2.6.10.1); there is **one compression context per direction for the whole
//!   session** and every block ends with a sync flush, so blocks must be encoded in the order they
//!   are written and decoded in the order they are read (even blocks of frames we then ignore).
//! - Client-initiated streams have odd ids, strictly increasing; PINGs from the client have odd
//!   ids and are echoed unchanged.
//!
//! Flow control, as the real peers do it: spdystream never sends WINDOW_UPDATE and ignores the
//! ones it receives, so a server that waited for the client's window to reopen would stall after
//! 64 KiB, as the kubelet would if it did. This session therefore *sends* WINDOW_UPDATE for data it
//! has handed to the application (per stream and for the session, once half the default window
//! is consumed) and *enforces* the peer's windows only after the peer has shown it does flow
//! control (it sent a WINDOW_UPDATE or a SETTINGS with INITIAL_WINDOW_SIZE).
//!
//! Invariants: nothing here panics on peer input. A malformed frame (bad length, bad version,
//! undecodable header block, stream id 0 where one is required) ends the session with
//! GOAWAY(PROTOCOL_ERROR). Backpressure: the reader blocks while a stream's receive queue is full,
//! which stops reading from the socket (TCP backpressure) without blocking the writer.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// The protocol version carried in every control frame.
pub const VERSION: u16 = 3;
/// The initial per-stream and session window (SPDY/3.1 §2.6.8: 64 KiB unless SETTINGS say).
pub const DEFAULT_WINDOW: u32 = 64 * 1024;
/// The largest payload a frame can carry (24-bit length).
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// `FLAG_FIN` on SYN_STREAM, SYN_REPLY, HEADERS and DATA: the sender's half is closed.
pub const FLAG_FIN: u8 = 0x01;
/// `FLAG_UNIDIRECTIONAL` on SYN_STREAM: the recipient's half starts closed.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;

/// Largest decompressed header block we accept (a zlib bomb guard; real blocks are < 1 KiB).
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Data frames we send are cut to this size so one stream cannot hog the socket.
const DATA_CHUNK: usize = 32 * 1024;
/// Frames queued per stream before the reader stops reading the socket.
const STREAM_QUEUE: usize = 64;
/// How long the reader keeps draining after we sent GOAWAY, waiting for the peer to close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Control frame types (§2.6).
pub mod frame_type {
    pub const SYN_STREAM: u16 = 1;
    pub const SYN_REPLY: u16 = 2;
    pub const RST_STREAM: u16 = 3;
    pub const SETTINGS: u16 = 4;
    pub const PING: u16 = 6;
    pub const GOAWAY: u16 = 7;
    pub const HEADERS: u16 = 8;
    pub const WINDOW_UPDATE: u16 = 9;
}

/// RST_STREAM status codes (§2.6.3).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const UNSUPPORTED_VERSION: u32 = 4;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes (§2.6.6, numbered as spdystream numbers them).
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// SETTINGS ids we look at (§2.6.4).
pub mod settings_id {
    pub const MAX_CONCURRENT_STREAMS: u32 = 4;
    pub const INITIAL_WINDOW_SIZE: u32 = 7;
}

/// Why a session or a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
    #[error("SPDY header compression error: {0}")]
    Compression(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn protocol(msg: impl Into<String>) -> SpdyError {
    SpdyError::Protocol(msg.into())
}

// === SPDY/3 header dictionary ===

/// The zlib dictionary of SPDY/3 (§2.6.10.1): 65 length-prefixed header names and values,
/// then a run of common status codes, dates and media types. Its Adler-32 is 0xe3c6a7c2,
/// which a unit test checks, so a typo cannot hide. The list is the relay's own (the relay
/// reads SPDY sessions to record them), included rather than copied.
pub static HEADER_DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(spdy3_dictionary);

include!("../../src/recording/spdy3_dictionary.rs");

// === Headers ===

/// A SPDY header block: lower-case names in order; a value may hold several values joined by
/// NUL (§2.6.10), which [`Headers::get`] splits off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a header; the name is lower-cased as SPDY requires.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.push(name, value);
        self
    }

    pub fn push(&mut self, name: &str, value: &str) {
        self.0.push((name.to_ascii_lowercase(), value.to_owned()));
    }

    /// The first value of a header (names compare case-insensitively, as spdystream's
    /// `http.Header` canonicalisation makes them).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or(""))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn encode_raw(&self) -> Result<Vec<u8>, SpdyError> {
        let too_long = || protocol("header block too large");
        let mut out = Vec::with_capacity(4 + self.0.len() * 32);
        out.put_u32(u32::try_from(self.0.len()).map_err(|_| too_long())?);
        for (name, value) in &self.0 {
            out.put_u32(u32::try_from(name.len()).map_err(|_| too_long())?);
            out.extend_from_slice(name.as_bytes());
            out.put_u32(u32::try_from(value.len()).map_err(|_| too_long())?);
            out.extend_from_slice(value.as_bytes());
        }
        Ok(out)
    }

    fn decode_raw(mut raw: &[u8]) -> Result<Self, SpdyError> {
        fn take<'a>(raw: &mut &'a [u8], n: usize) -> Result<&'a [u8], SpdyError> {
            if raw.len() < n {
                return Err(protocol("truncated header block"));
            }
            let (head, rest) = raw.split_at(n);
            *raw = rest;
            Ok(head)
        }
        fn take_u32(raw: &mut &[u8]) -> Result<usize, SpdyError> {
            let b = take(raw, 4)?;
            let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            usize::try_from(n).map_err(|_| protocol("header length overflow"))
        }
        let count = take_u32(&mut raw)?;
        // Each pair needs at least 8 bytes, which bounds the allocation by the input size.
        if count > raw.len() / 8 {
            return Err(protocol("header count exceeds block size"));
        }
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let n = take_u32(&mut raw)?;
            let name = String::from_utf8_lossy(take(&mut raw, n)?).to_ascii_lowercase();
            let n = take_u32(&mut raw)?;
            let value = String::from_utf8_lossy(take(&mut raw, n)?).into_owned();
            headers.push((name, value));
        }
        if !raw.is_empty() {
            return Err(protocol("trailing bytes in header block"));
        }
        Ok(Self(headers))
    }
}

// === Frames ===

/// One SETTINGS entry (§2.6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

/// A decoded SPDY/3.1 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame type we do not know; SPDY says to ignore it (§2.2.1).
    Unknown {
        frame_type: u16,
    },
}

/// Encodes frames; owns the outbound header compression context, so one encoder per session
/// direction and frames must be written in the order they were encoded.
pub struct FrameEncoder {
    zlib: Compress,
}

impl FrameEncoder {
    pub fn new() -> Result<Self, SpdyError> {
        let mut zlib = Compress::new(Compression::best(), true);
        // Before the first deflate call, so the zlib header carries FDICT and the dictionary id.
        zlib.set_dictionary(&HEADER_DICTIONARY)
            .map_err(|e| SpdyError::Compression(e.to_string()))?;
        Ok(Self { zlib })
    }

    /// Appends the wire form of `frame` to `dst`.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), SpdyError> {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let block = self.compress(headers)?;
                let mut payload = Vec::with_capacity(10 + block.len());
                payload.put_u32(stream_id & 0x7fff_ffff);
                payload.put_u32(associated_to & 0x7fff_ffff);
                payload.put_u8((priority & 0x07) << 5);
                payload.put_u8(0); // slot: unused in SPDY/3.1
                payload.extend_from_slice(&block);
                put_control(dst, frame_type::SYN_STREAM, *flags, &payload)
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => self.put_with_headers(dst, frame_type::SYN_REPLY, *stream_id, *flags, headers),
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => self.put_with_headers(dst, frame_type::HEADERS, *stream_id, *flags, headers),
            Frame::RstStream { stream_id, status } => {
                let mut payload = [0u8; 8];
                payload[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                payload[4..].copy_from_slice(&status.to_be_bytes());
                put_control(dst, frame_type::RST_STREAM, 0, &payload)
            }
            Frame::Settings { flags, entries } => {
                let mut payload = Vec::with_capacity(4 + 8 * entries.len());
                payload.put_u32(
                    u32::try_from(entries.len()).map_err(|_| protocol("too many settings"))?,
                );
                for s in entries {
                    payload.put_u32((u32::from(s.flags) << 24) | (s.id & 0x00ff_ffff));
                    payload.put_u32(s.value);
                }
                put_control(dst, frame_type::SETTINGS, *flags, &payload)
            }
            Frame::Ping { id } => put_control(dst, frame_type::PING, 0, &id.to_be_bytes()),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                let mut payload = [0u8; 8];
                payload[..4].copy_from_slice(&(last_good_stream_id & 0x7fff_ffff).to_be_bytes());
                payload[4..].copy_from_slice(&status.to_be_bytes());
                put_control(dst, frame_type::GOAWAY, 0, &payload)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let mut payload = [0u8; 8];
                payload[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                payload[4..].copy_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
                put_control(dst, frame_type::WINDOW_UPDATE, 0, &payload)
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_PAYLOAD {
                    return Err(protocol("data frame too large"));
                }
                dst.reserve(8 + data.len());
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32((u32::from(*flags) << 24) | data.len() as u32);
                dst.extend_from_slice(data);
                Ok(())
            }
            Frame::Unknown { .. } => Err(protocol("cannot encode an unknown frame")),
        }
    }

    fn put_with_headers(
        &mut self,
        dst: &mut BytesMut,
        ty: u16,
        stream_id: u32,
        flags: u8,
        headers: &Headers,
    ) -> Result<(), SpdyError> {
        let block = self.compress(headers)?;
        let mut payload = Vec::with_capacity(4 + block.len());
        payload.put_u32(stream_id & 0x7fff_ffff);
        payload.extend_from_slice(&block);
        put_control(dst, ty, flags, &payload)
    }

    /// Compresses one header block and sync-flushes, so the peer can decode it from this
    /// frame's bytes alone (spdystream checks the block consumed exactly the frame's payload).
    fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        let raw = headers.encode_raw()?;
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input: &[u8] = &raw;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = self.zlib.total_in();
            self.zlib
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Compression(e.to_string()))?;
            let consumed = usize::try_from(self.zlib.total_in() - before)
                .map_err(|_| SpdyError::Compression("counter overflow".into()))?;
            input = input.get(consumed..).unwrap_or_default();
            // zlib finished the flush when it consumed everything and left output space unused.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

fn put_control(dst: &mut BytesMut, ty: u16, flags: u8, payload: &[u8]) -> Result<(), SpdyError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(protocol("control frame too large"));
    }
    dst.reserve(8 + payload.len());
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(ty);
    dst.put_u32((u32::from(flags) << 24) | payload.len() as u32);
    dst.extend_from_slice(payload);
    Ok(())
}

/// Decodes frames; owns the inbound header decompression context.
pub struct FrameDecoder {
    zlib: Decompress,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self {
            zlib: Decompress::new(true),
        }
    }

    /// Takes one whole frame off the front of `src`, or returns `Ok(None)` if more bytes are
    /// needed. Any error is fatal for the session (the compression context may be out of step).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if src.len() < 8 {
            return Ok(None);
        }
        let word0 = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let word1 = u32::from_be_bytes([src[4], src[5], src[6], src[7]]);
        let flags = (word1 >> 24) as u8;
        let len = (word1 & 0x00ff_ffff) as usize;
        if src.len() < 8 + len {
            src.reserve(8 + len - src.len());
            return Ok(None);
        }
        src.advance(8);
        let payload = src.split_to(len).freeze();
        if word0 & 0x8000_0000 == 0 {
            let stream_id = word0 & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(protocol("data frame on stream 0"));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: payload,
            }));
        }
        let version = ((word0 >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(protocol(format!("unsupported SPDY version {version}")));
        }
        self.control((word0 & 0xffff) as u16, flags, payload)
            .map(Some)
    }

    fn control(&mut self, ty: u16, flags: u8, mut p: Bytes) -> Result<Frame, SpdyError> {
        let exact = |p: &Bytes, n: usize, what: &str| {
            if p.len() == n {
                Ok(())
            } else {
                Err(protocol(format!("{what} frame has length {}", p.len())))
            }
        };
        let at_least = |p: &Bytes, n: usize, what: &str| {
            if p.len() >= n {
                Ok(())
            } else {
                Err(protocol(format!("{what} frame too short")))
            }
        };
        let frame = match ty {
            frame_type::SYN_STREAM => {
                at_least(&p, 10, "SYN_STREAM")?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let associated_to = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                let headers = self.decompress(&p)?;
                if stream_id == 0 {
                    return Err(protocol("SYN_STREAM on stream 0"));
                }
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers,
                }
            }
            frame_type::SYN_REPLY | frame_type::HEADERS => {
                at_least(&p, 4, "SYN_REPLY/HEADERS")?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let headers = self.decompress(&p)?;
                if stream_id == 0 {
                    return Err(protocol("header frame on stream 0"));
                }
                if ty == frame_type::SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            frame_type::RST_STREAM => {
                exact(&p, 8, "RST_STREAM")?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let status = p.get_u32();
                if stream_id == 0 {
                    return Err(protocol("RST_STREAM on stream 0"));
                }
                Frame::RstStream { stream_id, status }
            }
            frame_type::SETTINGS => {
                at_least(&p, 4, "SETTINGS")?;
                let count = p.get_u32() as usize;
                if p.len() != count.saturating_mul(8) {
                    return Err(protocol("SETTINGS length does not match its entry count"));
                }
                let entries = (0..count)
                    .map(|_| {
                        let word = p.get_u32();
                        Setting {
                            flags: (word >> 24) as u8,
                            id: word & 0x00ff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            frame_type::PING => {
                exact(&p, 4, "PING")?;
                Frame::Ping { id: p.get_u32() }
            }
            frame_type::GOAWAY => {
                exact(&p, 8, "GOAWAY")?;
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            frame_type::WINDOW_UPDATE => {
                exact(&p, 8, "WINDOW_UPDATE")?;
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    delta: p.get_u32() & 0x7fff_ffff,
                }
            }
            other => Frame::Unknown { frame_type: other },
        };
        Ok(frame)
    }

    fn decompress(&mut self, compressed: &[u8]) -> Result<Headers, SpdyError> {
        let fail = |e: String| SpdyError::Compression(e);
        let mut out: Vec<u8> = Vec::with_capacity(compressed.len() * 4 + 64);
        let mut input = compressed;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(fail("header block too large".into()));
                }
                out.reserve(out.len().max(256));
            }
            let (in_before, out_before) = (self.zlib.total_in(), self.zlib.total_out());
            let result = self
                .zlib
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let consumed = usize::try_from(self.zlib.total_in() - in_before)
                .map_err(|_| fail("counter overflow".into()))?;
            let produced = self.zlib.total_out() - out_before;
            input = input.get(consumed..).unwrap_or_default();
            match result {
                Ok(Status::StreamEnd) => {
                    // A peer must never end its header stream: later blocks could not be read.
                    return Err(fail("header compression stream ended".into()));
                }
                Ok(_) => {
                    if input.is_empty() && out.len() < out.capacity() {
                        break;
                    }
                    if consumed == 0 && produced == 0 && out.len() < out.capacity() {
                        return Err(fail("zlib made no progress".into()));
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    // The first block's zlib header names the dictionary (FDICT).
                    self.zlib
                        .set_dictionary(&HEADER_DICTIONARY)
                        .map_err(|e| fail(e.to_string()))?;
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        if out.len() > MAX_HEADER_BLOCK {
            return Err(fail("header block too large".into()));
        }
        Headers::decode_raw(&out)
    }
}

// === Session ===

/// Commands for the writer task. Encoding happens there so header blocks hit the wire in the
/// order they were compressed.
enum Out {
    Frame(Frame),
    Data {
        stream_id: u32,
        data: Bytes,
        fin: bool,
    },
    /// Send GOAWAY, flush, shut the write half down.
    GoAway(u32),
}

/// Send-side state shared by the application handles, the reader and the writer.
#[derive(Default)]
struct SendState {
    /// Streams the peer opened and we have not fully closed. Missing means "gone": writes are
    /// refused by [`StreamSender`] and dropped by the writer if the peer reset it.
    streams: HashMap<u32, StreamSend>,
    /// Set once the peer shows it does flow control; until then windows are tracked but not
    /// enforced (spdystream never reopens them).
    enforce_windows: bool,
    session_window: i64,
    initial_window: i64,
    /// The highest stream id we accepted (for GOAWAY's last-good-stream-id).
    last_accepted: u32,
    going_away: bool,
}

struct StreamSend {
    window: i64,
    /// We queued FIN or RST: no more writes from the application.
    local_closed: bool,
    /// The peer reset the stream: drop whatever is still queued for it.
    reset_by_peer: bool,
    /// The peer sent FIN (or reset).
    remote_closed: bool,
}

struct Shared {
    send: Mutex<SendState>,
    window_opened: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SendState> {
        // The lock guards plain bookkeeping; a panic elsewhere must not wedge the session.
        self.send.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The application's handle on a session: GOAWAY and closure.
#[derive(Clone)]
pub struct SessionHandle {
    out: mpsc::Sender<Out>,
    shared: Arc<Shared>,
    closed: CancellationToken,
}

impl SessionHandle {
    /// Sends GOAWAY(OK) after everything already queued, then closes our write half. The peer
    /// is given a short grace period to close its side before the session is dropped.
    pub async fn go_away(&self) {
        let status = goaway::OK;
        self.shared.lock().going_away = true;
        let _ = self.out.send(Out::GoAway(status)).await;
    }

    /// Resolves when the peer closed the connection, sent GOAWAY and we finished, or the
    /// session failed.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

/// A stream the peer opened (and we accepted with SYN_REPLY).
pub struct Stream {
    id: u32,
    headers: Headers,
    rx: mpsc::Receiver<Bytes>,
    sender: StreamSender,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The next chunk of data; `None` once the peer sent FIN, reset the stream, or the session
    /// ended.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    pub fn sender(&self) -> StreamSender {
        self.sender.clone()
    }

    /// Splits the stream so reading and writing can live in different tasks.
    pub fn split(self) -> (StreamReceiver, StreamSender) {
        (
            StreamReceiver {
                id: self.id,
                rx: self.rx,
            },
            self.sender,
        )
    }
}

/// The receiving half of a [`Stream`]. Dropping it makes further data for the stream vanish.
pub struct StreamReceiver {
    id: u32,
    rx: mpsc::Receiver<Bytes>,
}

impl StreamReceiver {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

/// The sending half of a stream; cheap to clone.
#[derive(Clone)]
pub struct StreamSender {
    id: u32,
    out: mpsc::Sender<Out>,
    shared: Arc<Shared>,
}

impl StreamSender {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Queues data (cut into frames of at most 32 KiB). Fails once the stream was closed by us
    /// or reset by the peer, or the session is gone.
    pub async fn send(&self, data: Bytes) -> io::Result<()> {
        self.check_open()?;
        let mut data = data;
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(DATA_CHUNK));
            self.enqueue(Out::Data {
                stream_id: self.id,
                data: chunk,
                fin: false,
            })
            .await?;
        }
        Ok(())
    }

    /// Half-closes our side with an empty DATA frame carrying FIN, as spdystream's
    /// `Stream.Close` does. Idempotent.
    pub async fn finish(&self) -> io::Result<()> {
        if !self.mark_local_closed() {
            return Ok(());
        }
        self.enqueue(Out::Data {
            stream_id: self.id,
            data: Bytes::new(),
            fin: true,
        })
        .await
    }

    /// Resets the stream (both directions) with RST_STREAM. Idempotent.
    pub async fn reset(&self, status: u32) -> io::Result<()> {
        if !self.mark_local_closed() {
            return Ok(());
        }
        self.enqueue(Out::Frame(Frame::RstStream {
            stream_id: self.id,
            status,
        }))
        .await
    }

    fn check_open(&self) -> io::Result<()> {
        let state = self.shared.lock();
        match state.streams.get(&self.id) {
            Some(s) if !s.local_closed && !s.reset_by_peer => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "SPDY stream closed",
            )),
        }
    }

    /// Returns false if the stream was already closed on our side.
    fn mark_local_closed(&self) -> bool {
        let mut state = self.shared.lock();
        let Some(s) = state.streams.get_mut(&self.id) else {
            return false;
        };
        if s.local_closed {
            return false;
        }
        s.local_closed = true;
        if s.remote_closed {
            // Both halves closed: forget the stream (the writer treats unknown ids as open).
            state.streams.remove(&self.id);
        }
        true
    }

    async fn enqueue(&self, out: Out) -> io::Result<()> {
        self.out
            .send(out)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "SPDY session closed"))
    }
}

/// Runs the server side of a SPDY/3.1 session on `io`. `accept` decides, from its headers,
/// whether a new stream is accepted (SYN_REPLY) or refused (RST_STREAM CANCEL, as the kubelet's
/// `stream.Reset()` does). Accepted streams arrive on the returned receiver in the order the
/// peer opened them. The session ends when the peer closes, after [`SessionHandle::go_away`],
/// or on a protocol error.
pub fn serve<IO>(
    io: IO,
    accept: impl Fn(&Headers) -> bool + Send + Sync + 'static,
) -> (SessionHandle, mpsc::Receiver<Stream>)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel::<Out>(256);
    let (incoming_tx, incoming_rx) = mpsc::channel::<Stream>(32);
    let shared = Arc::new(Shared {
        send: Mutex::new(SendState {
            session_window: i64::from(DEFAULT_WINDOW),
            initial_window: i64::from(DEFAULT_WINDOW),
            ..SendState::default()
        }),
        window_opened: Notify::new(),
    });
    let closed = CancellationToken::new();
    let write_done = CancellationToken::new();
    let handle = SessionHandle {
        out: out_tx.clone(),
        shared: shared.clone(),
        closed: closed.clone(),
    };
    tokio::spawn(write_loop(
        write_half,
        out_rx,
        shared.clone(),
        closed.clone(),
        write_done.clone(),
    ));
    let reader = Reader {
        out: out_tx,
        shared,
        incoming: incoming_tx,
        accept: Box::new(accept),
        streams: HashMap::new(),
        last_peer_stream: 0,
        session_unacked: 0,
    };
    tokio::spawn(async move {
        let result = tokio::select! {
            r = reader_run(reader, read_half) => r,
            // After our GOAWAY the peer should close; do not wait for it forever.
            _ = async { write_done.cancelled().await; tokio::time::sleep(CLOSE_GRACE).await } => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "SPDY session ended with an error");
        }
        closed.cancel();
    });
    (handle, incoming_rx)
}

async fn write_loop<W: AsyncWrite + Send + Unpin>(
    io: W,
    mut rx: mpsc::Receiver<Out>,
    shared: Arc<Shared>,
    closed: CancellationToken,
    done: CancellationToken,
) {
    let result: Result<(), SpdyError> = async {
        let mut w = FrameWriter {
            io,
            encoder: FrameEncoder::new()?,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        while let Some(out) = rx.recv().await {
            let stop = match out {
                Out::Frame(frame) => {
                    w.encoder.encode(&frame, &mut w.buf)?;
                    false
                }
                Out::Data {
                    stream_id,
                    data,
                    fin,
                } => {
                    write_data(&mut w, &shared, &closed, stream_id, data, fin).await?;
                    false
                }
                Out::GoAway(status) => {
                    let last_good_stream_id = shared.lock().last_accepted;
                    w.encoder.encode(
                        &Frame::GoAway {
                            last_good_stream_id,
                            status,
                        },
                        &mut w.buf,
                    )?;
                    true
                }
            };
            // Batch frames that are already queued; flush before waiting for more.
            if stop || rx.is_empty() || w.buf.len() >= 64 * 1024 {
                w.flush().await?;
            }
            if stop {
                w.io.shutdown().await?;
                break;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "SPDY writer stopped");
    }
    done.cancel();
}

/// The write half with its compression context and a batch buffer.
struct FrameWriter<W> {
    io: W,
    encoder: FrameEncoder,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    async fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.io.flush().await
    }
}

/// Writes one application DATA item, honouring the peer's windows when it does flow control.
async fn write_data<W: AsyncWrite + Send + Unpin>(
    w: &mut FrameWriter<W>,
    shared: &Shared,
    closed: &CancellationToken,
    stream_id: u32,
    mut data: Bytes,
    fin: bool,
) -> Result<(), SpdyError> {
    loop {
        // Register for WINDOW_UPDATE before looking at the windows, so an update that lands
        // between the check and the wait is not missed.
        let opened = shared.window_opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        let allowed = {
            let mut state = shared.lock();
            let enforce = state.enforce_windows;
            let session_window = state.session_window;
            let allowed = match state.streams.get(&stream_id) {
                Some(s) if s.reset_by_peer => return Ok(()),
                Some(s) if enforce => s.window.min(session_window).max(0) as usize,
                _ => data.len(),
            }
            .min(data.len());
            if let Some(s) = state.streams.get_mut(&stream_id) {
                s.window -= allowed as i64;
            }
            state.session_window -= allowed as i64;
            allowed
        };
        if allowed == 0 && !data.is_empty() {
            // Flush what we have, then wait for the reader to see a WINDOW_UPDATE.
            w.flush().await?;
            tokio::select! {
                _ = opened => continue,
                _ = closed.cancelled() => {
                    return Err(SpdyError::Io(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "SPDY session closed while waiting for the peer's window",
                    )))
                }
            }
        }
        let chunk = data.split_to(allowed);
        let last = data.is_empty();
        w.encoder.encode(
            &Frame::Data {
                stream_id,
                flags: if fin && last { FLAG_FIN } else { 0 },
                data: chunk,
            },
            &mut w.buf,
        )?;
        if last {
            return Ok(());
        }
    }
}

struct Reader {
    out: mpsc::Sender<Out>,
    shared: Arc<Shared>,
    incoming: mpsc::Sender<Stream>,
    accept: Box<dyn Fn(&Headers) -> bool + Send + Sync>,
    /// Receive side of open streams: where their data goes, and bytes not yet acknowledged
    /// with WINDOW_UPDATE.
    streams: HashMap<u32, (mpsc::Sender<Bytes>, u32)>,
    last_peer_stream: u32,
    session_unacked: u32,
}

async fn reader_run<R: AsyncRead + Send + Unpin>(
    mut reader: Reader,
    mut io: R,
) -> Result<(), SpdyError> {
    let mut decoder = FrameDecoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            let frame = match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    // A malformed frame: tell the peer and end the session.
                    let _ = reader.out.send(Out::GoAway(goaway::PROTOCOL_ERROR)).await;
                    return Err(e);
                }
            };
            if let Err(e) = reader.handle(frame).await {
                let _ = reader.out.send(Out::GoAway(goaway::PROTOCOL_ERROR)).await;
                return Err(e);
            }
        }
        if buf.capacity() - buf.len() < 8 * 1024 {
            buf.reserve(64 * 1024);
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

impl Reader {
    async fn handle(&mut self, frame: Frame) -> Result<(), SpdyError> {
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => self.open_stream(stream_id, flags, headers).await,
            Frame::Data {
                stream_id,
                flags,
                data,
            } => self.data(stream_id, flags, data).await,
            Frame::RstStream { stream_id, .. } => {
                self.streams.remove(&stream_id);
                let mut state = self.shared.lock();
                if let Some(s) = state.streams.get_mut(&stream_id) {
                    s.reset_by_peer = true;
                    s.remote_closed = true;
                    s.local_closed = true;
                }
                drop(state);
                // A writer waiting on this stream's window must re-check.
                self.shared.window_opened.notify_waiters();
                Ok(())
            }
            Frame::Headers {
                stream_id, flags, ..
            } => {
                if flags & FLAG_FIN != 0 {
                    self.remote_fin(stream_id);
                }
                Ok(())
            }
            Frame::Ping { id } => {
                // Odd ids are the client's (§2.6.5); echo them. Even ids would answer our own
                // pings, and we send none (the kubelet's upgrader has no ping period).
                if id % 2 == 1 {
                    self.send(Out::Frame(Frame::Ping { id })).await;
                }
                Ok(())
            }
            Frame::Settings { entries, .. } => {
                for s in entries {
                    if s.id == settings_id::INITIAL_WINDOW_SIZE {
                        let new = i64::from(s.value & 0x7fff_ffff);
                        let mut state = self.shared.lock();
                        let delta = new - state.initial_window;
                        state.initial_window = new;
                        state.enforce_windows = true;
                        for st in state.streams.values_mut() {
                            st.window = st.window.saturating_add(delta);
                        }
                    }
                }
                self.shared.window_opened.notify_waiters();
                Ok(())
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let mut state = self.shared.lock();
                state.enforce_windows = true;
                if stream_id == 0 {
                    state.session_window = state.session_window.saturating_add(i64::from(delta));
                } else if let Some(s) = state.streams.get_mut(&stream_id) {
                    s.window = s.window.saturating_add(i64::from(delta));
                }
                drop(state);
                self.shared.window_opened.notify_waiters();
                Ok(())
            }
            Frame::GoAway { .. } => {
                // The peer opens no more streams; existing ones carry on until it closes.
                self.shared.lock().going_away = true;
                Ok(())
            }
            // We never open streams, so a SYN_REPLY is answered with nothing; unknown control
            // frames are ignored as SPDY asks.
            Frame::SynReply { .. } | Frame::Unknown { .. } => Ok(()),
        }
    }

    async fn open_stream(
        &mut self,
        stream_id: u32,
        flags: u8,
        headers: Headers,
    ) -> Result<(), SpdyError> {
        // Client streams are odd and strictly increasing (§2.3.2); spdystream answers a bad id
        // with RST_STREAM(PROTOCOL_ERROR) and carries on, and so do we.
        if stream_id.is_multiple_of(2) || stream_id <= self.last_peer_stream {
            self.send(Out::Frame(Frame::RstStream {
                stream_id,
                status: rst::PROTOCOL_ERROR,
            }))
            .await;
            return Ok(());
        }
        self.last_peer_stream = stream_id;
        if self.shared.lock().going_away {
            // After GOAWAY new streams are ignored (§2.6.6).
            return Ok(());
        }
        if !(self.accept)(&headers) {
            self.send(Out::Frame(Frame::RstStream {
                stream_id,
                status: rst::CANCEL,
            }))
            .await;
            return Ok(());
        }
        let (data_tx, data_rx) = mpsc::channel(STREAM_QUEUE);
        let remote_closed = flags & (FLAG_FIN | FLAG_UNIDIRECTIONAL) != 0;
        {
            let mut state = self.shared.lock();
            let window = state.initial_window;
            state.last_accepted = stream_id;
            state.streams.insert(
                stream_id,
                StreamSend {
                    window,
                    local_closed: false,
                    reset_by_peer: false,
                    remote_closed,
                },
            );
        }
        if !remote_closed {
            self.streams.insert(stream_id, (data_tx, 0));
        }
        // The reply goes out before any data the application writes on the stream, because
        // both travel through the same ordered writer queue.
        self.send(Out::Frame(Frame::SynReply {
            stream_id,
            flags: 0,
            headers: Headers::new(),
        }))
        .await;
        let stream = Stream {
            id: stream_id,
            headers,
            rx: data_rx,
            sender: StreamSender {
                id: stream_id,
                out: self.out.clone(),
                shared: self.shared.clone(),
            },
        };
        if self.incoming.send(stream).await.is_err() {
            // Nobody takes streams any more: refuse it.
            self.streams.remove(&stream_id);
            self.send(Out::Frame(Frame::RstStream {
                stream_id,
                status: rst::REFUSED_STREAM,
            }))
            .await;
        }
        Ok(())
    }

    async fn data(&mut self, stream_id: u32, flags: u8, data: Bytes) -> Result<(), SpdyError> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        if !data.is_empty() {
            if let Some((tx, _)) = self.streams.get(&stream_id) {
                // Blocks while the application is behind: TCP backpressure. A dropped receiver
                // just discards the data (the stream is being torn down).
                if tx.send(data).await.is_err() {
                    self.streams.remove(&stream_id);
                }
            }
            // Data for unknown or closed streams is dropped, as spdystream drops it.
        }
        self.acknowledge(stream_id, len).await;
        if flags & FLAG_FIN != 0 {
            self.remote_fin(stream_id);
        }
        Ok(())
    }

    /// Sends WINDOW_UPDATE once half the default window has been consumed, per stream and for
    /// the session, so peers that do flow control never stall.
    async fn acknowledge(&mut self, stream_id: u32, len: u32) {
        const THRESHOLD: u32 = DEFAULT_WINDOW / 2;
        if len == 0 {
            return;
        }
        let mut updates = Vec::new();
        if let Some((_, unacked)) = self.streams.get_mut(&stream_id) {
            *unacked = unacked.saturating_add(len);
            if *unacked >= THRESHOLD {
                updates.push((stream_id, *unacked));
                *unacked = 0;
            }
        }
        self.session_unacked = self.session_unacked.saturating_add(len);
        if self.session_unacked >= THRESHOLD {
            updates.push((0, self.session_unacked));
            self.session_unacked = 0;
        }
        for (stream_id, delta) in updates {
            self.send(Out::Frame(Frame::WindowUpdate {
                stream_id,
                delta: delta.min(0x7fff_ffff),
            }))
            .await;
        }
    }

    fn remote_fin(&mut self, stream_id: u32) {
        // Dropping the sender makes the application's recv() return None after queued data.
        self.streams.remove(&stream_id);
        let mut state = self.shared.lock();
        if let Some(s) = state.streams.get_mut(&stream_id) {
            s.remote_closed = true;
            if s.local_closed && !s.reset_by_peer {
                state.streams.remove(&stream_id);
            }
        }
    }

    async fn send(&self, out: Out) {
        // The writer only goes away when the session is ending; nothing to do then.
        let _ = self.out.send(out).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frames: &[Frame]) -> Vec<Frame> {
        let mut enc = FrameEncoder::new().unwrap();
        let mut dec = FrameDecoder::new();
        let mut wire = BytesMut::new();
        for f in frames {
            enc.encode(f, &mut wire).unwrap();
        }
        let mut out = Vec::new();
        while let Some(f) = dec.decode(&mut wire).unwrap() {
            out.push(f);
        }
        assert!(wire.is_empty());
        out
    }

    #[test]
    fn dictionary_matches_the_spdy3_spec() {
        let dict = &*HEADER_DICTIONARY;
        assert_eq!(dict.len(), 1423);
        // Adler-32 as zlib computes it for the FDICT id.
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in dict {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    #[test]
    fn every_frame_type_round_trips() {
        let h = Headers::new()
            .with("streamType", "stdout")
            .with("port", "8080")
            .with("x", "a\0b");
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 3,
                flags: FLAG_FIN,
                headers: h.clone(),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Headers::new(),
            },
            Frame::Headers {
                stream_id: 3,
                flags: FLAG_FIN,
                headers: h.clone(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: rst::CANCEL,
            },
            Frame::Settings {
                flags: 0,
                entries: vec![Setting {
                    flags: 1,
                    id: settings_id::INITIAL_WINDOW_SIZE,
                    value: 1 << 20,
                }],
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good_stream_id: 9,
                status: goaway::OK,
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 32768,
            },
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
        ];
        let decoded = roundtrip(&frames);
        assert_eq!(decoded.len(), frames.len());
        for (a, b) in frames.iter().zip(&decoded) {
            match (a, b) {
                (Frame::SynStream { headers: ha, .. }, Frame::SynStream { headers: hb, .. }) => {
                    assert_eq!(hb.get("streamtype"), Some("stdout"));
                    assert_eq!(hb.get("x"), Some("a"));
                    assert_eq!(ha.len(), hb.len());
                }
                _ => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn header_block_uses_dictionary_and_one_context() {
        let mut enc = FrameEncoder::new().unwrap();
        let h = Headers::new().with("streamtype", "error");
        let first = enc.compress(&h).unwrap();
        // zlib header with FDICT set, then the dictionary's Adler-32.
        assert_eq!(first[0] & 0x0f, 8);
        assert_ne!(first[1] & 0x20, 0);
        assert_eq!(&first[2..6], &[0xe3, 0xc6, 0xa7, 0xc2]);
        // The shared context makes the repeated block much smaller and header-less.
        let second = enc.compress(&h).unwrap();
        assert!(second.len() < first.len());
        // Sync flush marker ends every block.
        assert!(first.ends_with(&[0, 0, 0xff, 0xff]));
        assert!(second.ends_with(&[0, 0, 0xff, 0xff]));
    }

    #[test]
    fn decodes_in_pieces() {
        let mut enc = FrameEncoder::new().unwrap();
        let mut wire = BytesMut::new();
        enc.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: Headers::new().with("streamtype", "data"),
            },
            &mut wire,
        )
        .unwrap();
        let mut dec = FrameDecoder::new();
        let mut partial = BytesMut::new();
        let mut frames = 0;
        for byte in wire.iter() {
            partial.put_u8(*byte);
            if dec.decode(&mut partial).unwrap().is_some() {
                frames += 1;
            }
        }
        assert_eq!(frames, 1);
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            // wrong version
            vec![0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1],
            // PING with the wrong length
            vec![0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1],
            // data on stream 0
            vec![0, 0, 0, 0, 0, 0, 0, 1, 9],
            // SYN_STREAM with a garbage header block
            vec![
                0x80, 0x03, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
            ],
            // SETTINGS claiming more entries than it carries
            vec![0x80, 0x03, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
        ];
        for case in cases {
            let mut dec = FrameDecoder::new();
            let mut buf = BytesMut::from(&case[..]);
            assert!(dec.decode(&mut buf).is_err(), "{case:?}");
        }
        // Unknown control types are skipped, not fatal.
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::from(&[0x80, 0x03, 0, 0x0a, 0, 0, 0, 2, 1, 2][..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Frame::Unknown { frame_type: 10 })
        );
    }

    #[test]
    fn header_block_parser_rejects_lies() {
        assert!(Headers::decode_raw(&[0, 0, 0, 1]).is_err());
        assert!(Headers::decode_raw(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Headers::decode_raw(&[0, 0, 0, 1, 0, 0, 0, 9, b'a', 0, 0, 0, 0]).is_err());
        assert_eq!(Headers::decode_raw(&[0, 0, 0, 0]).unwrap(), Headers::new());
    }

    /// A tiny deterministic PRNG (xorshift) so the fuzz-style tests need no extra crate.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed.max(1);
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut next = rng(0x5eed);
        // Valid frames with random bytes flipped, and pure noise behind a plausible header.
        let mut enc = FrameEncoder::new().unwrap();
        let mut valid = BytesMut::new();
        enc.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: Headers::new()
                    .with("streamtype", "stdin")
                    .with("port", "80"),
            },
            &mut valid,
        )
        .unwrap();
        enc.encode(&Frame::Ping { id: 1 }, &mut valid).unwrap();
        for round in 0..5000 {
            let mut bytes = valid.to_vec();
            if round % 2 == 0 {
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] ^= (next() % 255 + 1) as u8;
                }
            } else {
                let len = (next() % 64) as usize;
                bytes = (0..len).map(|_| next() as u8).collect();
                if round % 4 == 1 && bytes.len() >= 8 {
                    bytes[0] = 0x80;
                    bytes[1] = 0x03;
                }
            }
            let mut dec = FrameDecoder::new();
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
            let _ = Headers::decode_raw(&bytes);
        }
    }

    /// A minimal SPDY client for tests: encodes and decodes frames over a duplex pipe.
    struct TestClient {
        io: tokio::io::DuplexStream,
        enc: FrameEncoder,
        dec: FrameDecoder,
        buf: BytesMut,
    }

    impl TestClient {
        async fn send(&mut self, f: Frame) {
            let mut wire = BytesMut::new();
            self.enc.encode(&f, &mut wire).unwrap();
            self.io.write_all(&wire).await.unwrap();
        }

        async fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                let n =
                    tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf))
                        .await
                        .expect("timed out waiting for a frame")
                        .unwrap();
                if n == 0 {
                    return None;
                }
            }
        }
    }

    fn client_server() -> (TestClient, SessionHandle, mpsc::Receiver<Stream>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (handle, incoming) = serve(b, |h| h.get("streamtype").is_some());
        let client = TestClient {
            io: a,
            enc: FrameEncoder::new().unwrap(),
            dec: FrameDecoder::new(),
            buf: BytesMut::new(),
        };
        (client, handle, incoming)
    }

    #[tokio::test]
    async fn session_echo_ping_fin_and_goaway() {
        let (mut c, handle, mut incoming) = client_server();
        c.send(Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("streamtype", "data"),
        })
        .await;
        // A stream without the required header is refused with RST_STREAM(CANCEL).
        c.send(Frame::SynStream {
            stream_id: 3,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("other", "x"),
        })
        .await;
        assert!(matches!(
            c.next().await,
            Some(Frame::SynReply { stream_id: 1, .. })
        ));
        assert_eq!(
            c.next().await,
            Some(Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL
            })
        );
        let mut stream = incoming.recv().await.unwrap();
        assert_eq!(stream.headers().get("streamtype"), Some("data"));

        c.send(Frame::Ping { id: 1 }).await;
        assert_eq!(c.next().await, Some(Frame::Ping { id: 1 }));

        c.send(Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"abc"),
        })
        .await;
        assert_eq!(stream.recv().await.as_deref(), Some(&b"abc"[..]));
        assert_eq!(stream.recv().await, None);

        let tx = stream.sender();
        tx.send(Bytes::from_static(b"xyz")).await.unwrap();
        tx.finish().await.unwrap();
        assert!(tx.send(Bytes::from_static(b"late")).await.is_err());
        assert_eq!(
            c.next().await,
            Some(Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"xyz")
            })
        );
        assert_eq!(
            c.next().await,
            Some(Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::new()
            })
        );
        handle.go_away().await;
        assert_eq!(
            c.next().await,
            Some(Frame::GoAway {
                last_good_stream_id: 1,
                status: goaway::OK
            })
        );
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), handle.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn large_transfer_without_peer_window_updates_does_not_stall() {
        let (mut c, _handle, mut incoming) = client_server();
        c.send(Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("streamtype", "stdout"),
        })
        .await;
        let stream = incoming.recv().await.unwrap();
        let tx = stream.sender();
        let total = 1 << 20;
        tokio::spawn(async move {
            tx.send(Bytes::from(vec![7u8; total])).await.unwrap();
            tx.finish().await.unwrap();
        });
        let mut got = 0;
        loop {
            match c.next().await {
                Some(Frame::Data { data, flags, .. }) => {
                    got += data.len();
                    if flags & FLAG_FIN != 0 {
                        break;
                    }
                }
                Some(_) => {}
                None => panic!("session closed early"),
            }
        }
        assert_eq!(got, total);
    }

    #[tokio::test]
    async fn receiver_sends_window_updates_and_enforces_peer_windows() {
        let (mut c, _handle, mut incoming) = client_server();
        c.send(Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("streamtype", "data"),
        })
        .await;
        let mut stream = incoming.recv().await.unwrap();
        assert!(matches!(c.next().await, Some(Frame::SynReply { .. })));
        c.send(Frame::Data {
            stream_id: 1,
            flags: 0,
            data: Bytes::from(vec![1u8; 40_000]),
        })
        .await;
        assert_eq!(stream.recv().await.map(|b| b.len()), Some(40_000));
        let mut updates = Vec::new();
        for _ in 0..2 {
            match c.next().await {
                Some(Frame::WindowUpdate { stream_id, delta }) => updates.push((stream_id, delta)),
                other => panic!("expected WINDOW_UPDATE, got {other:?}"),
            }
        }
        updates.sort();
        assert_eq!(updates, vec![(0, 40_000), (1, 40_000)]);

        // The client now shrinks our window to 10 bytes: we must stop after 10.
        c.send(Frame::Settings {
            flags: 0,
            entries: vec![Setting {
                flags: 0,
                id: settings_id::INITIAL_WINDOW_SIZE,
                value: 10,
            }],
        })
        .await;
        c.send(Frame::Ping { id: 3 }).await;
        assert_eq!(c.next().await, Some(Frame::Ping { id: 3 }));
        let tx = stream.sender();
        tokio::spawn(async move {
            tx.send(Bytes::from_static(b"0123456789abcdef"))
                .await
                .unwrap();
        });
        assert_eq!(
            c.next().await,
            Some(Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"0123456789")
            })
        );
        c.send(Frame::WindowUpdate {
            stream_id: 1,
            delta: 100,
        })
        .await;
        assert_eq!(
            c.next().await,
            Some(Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"abcdef")
            })
        );
    }

    #[tokio::test]
    async fn garbage_closes_the_session_with_goaway() {
        let (mut c, handle, _incoming) = client_server();
        c.io.write_all(&[0x80, 0x07, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1])
            .await
            .unwrap();
        assert_eq!(
            c.next().await,
            Some(Frame::GoAway {
                last_good_stream_id: 0,
                status: goaway::PROTOCOL_ERROR
            })
        );
        tokio::time::timeout(Duration::from_secs(10), handle.closed())
            .await
            .unwrap();
    }
}
