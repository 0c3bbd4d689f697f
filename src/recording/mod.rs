//! Session recording (docs/architecture.md "Session recording"): what the terminal of an exec or
//! attach session showed, with timing, as asciicast v2, streamed to a store while the session
//! runs, so that auditors can play it back in the portal.
//!
//! - [`decode`] reads the tunnel's bytes as they pass (never changing them).
//! - [`cast`] writes the asciicast lines.
//! - [`store`] keeps them: a directory, or append blobs in Azure Blob Storage.
//!
//! Memory stays bounded: the tunnel hands each session's lines to a spool of at most
//! [`SPOOL_BUDGET`] bytes, which a writer task empties into the store about once a second. When
//! the store falls behind, the spool fills and the tunnel waits (flow control then reaches the
//! pod), so the recording never loses what the user saw and never holds a session in memory.

pub mod cast;
pub mod decode;
pub mod store;

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use store::{RecordingStore, StoreError};

/// Bytes of asciicast lines one session may hold before its tunnel waits for the store.
pub const SPOOL_BUDGET: usize = 1 << 20;

/// How often a session's lines go to the store while it runs.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub use crate::config::RecordingMode;

/// Who a recording is about, for its header and its name.
pub struct SessionInfo {
    /// Names the recording: minted by the relay (a client's `Audit-ID` could be long or odd).
    pub id: String,
    pub cluster: String,
    pub user: String,
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
    pub command: String,
    /// Record what was typed as well (`recording.stdin`).
    pub stdin: bool,
    /// The recording stops when it would grow past this (`recording.max_session_size`).
    pub max_bytes: u64,
}

/// Why a session's recording stopped early.
#[derive(Debug, Clone)]
pub struct Failure(pub String);

/// Shared between the tunnel (which adds lines) and the writer task (which takes them).
struct Spool {
    inner: Mutex<SpoolInner>,
    ready: Notify,
}

#[derive(Default)]
struct SpoolInner {
    lines: String,
    closed: bool,
    failed: Option<String>,
    /// The tunnel, waiting for room.
    waiter: Option<Waker>,
}

/// A session being recorded: the tunnel's end of it.
pub struct Recording {
    pub name: String,
    spool: Arc<Spool>,
    /// Set once the cluster accepted the upgrade and its framing is known.
    decoder: Option<decode::Decoder>,
    started: Instant,
    header: Option<HeaderParts>,
    out: cast::Text,
    typed: cast::Text,
    stdin: bool,
    staged: String,
    /// Bytes handed to the spool so far, and the most the recording may hold.
    recorded: u64,
    max_bytes: u64,
    /// Recording stopped ([`Recording::stop`]): the tunnel's bytes are no longer decoded.
    stopped: bool,
    fail: Arc<FailOnce>,
}

/// Reports a failure to the session once, whoever notices it first (the writer, the decoder).
struct FailOnce {
    done: std::sync::atomic::AtomicBool,
    f: Box<dyn Fn(&str) + Send + Sync>,
}

impl FailOnce {
    fn fail(&self, why: &str) {
        if !self.done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            (self.f)(why);
        }
    }
}

struct HeaderParts {
    timestamp: u64,
    title: String,
    command: String,
}

/// The writer task's handle: resolves to the failure, if writing failed.
pub type Finished = tokio::task::JoinHandle<Option<Failure>>;

impl Recording {
    /// Creates the recording in the store (so a store that cannot be written is known before
    /// the session starts) and starts its writer task. `on_failure` runs once if recording
    /// fails mid-session (the store, or a tunnel the decoder cannot follow).
    pub async fn open(
        store: Arc<RecordingStore>,
        info: SessionInfo,
        on_failure: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<(Self, Finished), StoreError> {
        // `2026-12-07T02:30:00Z` → `20261207T023000Z`: sortable and safe in a blob name.
        let when: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let name = format!("{}_{when}_{}.cast", info.cluster, info.id);
        let mut object = store.create(&name).await?;
        let spool = Arc::new(Spool {
            inner: Mutex::new(SpoolInner::default()),
            ready: Notify::new(),
        });
        let task_spool = spool.clone();
        let fail = Arc::new(FailOnce {
            done: std::sync::atomic::AtomicBool::new(false),
            f: Box::new(on_failure),
        });
        let task_fail = fail.clone();
        let finished = tokio::spawn(async move {
            let failed = write_loop(&task_spool, &mut object).await;
            if let Some(f) = &failed {
                task_fail.fail(&f.0);
            }
            failed
        });
        let title = format!(
            "{} on {}: {}/{}{}",
            info.user,
            info.cluster,
            info.namespace,
            info.pod,
            info.container
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        );
        Ok((
            Self {
                name,
                spool,
                decoder: None,
                started: Instant::now(),
                header: Some(HeaderParts {
                    timestamp: crate::clock::unix_now(),
                    title,
                    command: info.command,
                }),
                out: cast::Text::default(),
                typed: cast::Text::default(),
                stdin: info.stdin,
                staged: String::new(),
                recorded: 0,
                max_bytes: info.max_bytes,
                stopped: false,
                fail,
            },
            finished,
        ))
    }

    /// Ready when the spool has room; the tunnel waits otherwise (the store is behind).
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.spool.inner.lock();
        if s.lines.len() < SPOOL_BUDGET || s.failed.is_some() {
            Poll::Ready(())
        } else {
            s.waiter = Some(cx.waker().clone());
            drop(s);
            self.spool.ready.notify_one();
            Poll::Pending
        }
    }

    /// The tunnel's framing, once the cluster accepted the upgrade: the WebSocket subprotocol
    /// it chose, or `None` for SPDY. The session's clock starts here.
    pub fn framing(&mut self, websocket_subprotocol: Option<&str>) {
        self.decoder = Some(decode::Decoder::new(websocket_subprotocol));
        self.started = Instant::now();
    }

    /// Bytes the client sent into the tunnel.
    pub fn from_client(&mut self, bytes: &[u8]) {
        self.feed(bytes, true);
    }

    /// Bytes the cluster sent to the client.
    pub fn from_server(&mut self, bytes: &[u8]) {
        self.feed(bytes, false);
    }

    fn feed(&mut self, bytes: &[u8], client: bool) {
        let Some(mut decoder) = self.decoder.take() else {
            return;
        };
        if client {
            decoder.from_client(bytes, self);
        } else {
            decoder.from_server(bytes, self);
        }
        self.hand_over();
        match decoder.failure() {
            // What follows could not be recorded faithfully: the recording stops here, and a
            // required one ends the session.
            Some(why) => self.stop(&format!("the recording stopped: {why}")),
            // Full (`recording.max_session_size`, see `hand_over`): nothing more is decoded.
            None if self.stopped => {}
            None => self.decoder = Some(decoder),
        }
    }

    /// Stops recording: the spool takes no more lines and the session is told.
    fn stop(&mut self, why: &str) {
        self.stopped = true;
        let mut s = self.spool.inner.lock();
        if s.failed.is_none() {
            s.failed = Some(why.to_owned());
        }
        if let Some(w) = s.waiter.take() {
            w.wake();
        }
        drop(s);
        self.spool.ready.notify_one();
        self.fail.fail(why);
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Writes the header before the first event: sized by that event if it is a resize.
    fn header_first(&mut self, size: Option<(u16, u16)>) -> bool {
        let Some(h) = self.header.take() else {
            return false;
        };
        let (width, height) = size.unwrap_or((80, 24));
        self.staged.push_str(
            &cast::Header {
                width,
                height,
                timestamp: h.timestamp,
                title: &h.title,
                command: &h.command,
            }
            .line(),
        );
        size.is_some()
    }

    fn hand_over(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        // At `recording.max_session_size` the recording is full: the whole lines that fit are
        // kept (the header always fits: the limit is at least 64Ki), a marker says where
        // recording ended (the player shows it on its timeline; it may pass the limit by its
        // own few bytes), and the session is told as of any other failure. A required
        // recording then ends its session; an optional one lets it go on unrecorded, and its
        // audit record says why.
        let room = self.max_bytes.saturating_sub(self.recorded);
        let full = self.staged.len() as u64 > room;
        if full {
            let keep = self.staged.as_bytes()[..room as usize]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            self.staged.truncate(keep);
            let t = self.elapsed();
            cast::marker(
                &mut self.staged,
                t,
                "recording stopped: recording.max_session_size",
            );
        }
        self.recorded += self.staged.len() as u64;
        let mut s = self.spool.inner.lock();
        // After a failure nobody empties the spool: lines are dropped, not kept.
        let before = s.lines.len();
        if s.failed.is_none() {
            s.lines.push_str(&self.staged);
        }
        // The writer wants to hear of the first lines of a batch and of a half-full spool,
        // not of every chunk in between.
        let wake = before == 0 || (before < SPOOL_BUDGET / 2 && s.lines.len() >= SPOOL_BUDGET / 2);
        drop(s);
        self.staged.clear();
        if wake {
            self.spool.ready.notify_one();
        }
        if full {
            self.stop(&format!(
                "the recording reached recording.max_session_size ({} bytes); the rest of the session was not recorded",
                self.max_bytes
            ));
        }
    }
}

impl decode::Events for Recording {
    fn output(&mut self, data: &[u8]) {
        self.header_first(None);
        let t = self.elapsed();
        self.out.event(&mut self.staged, t, "o", data);
    }

    fn input(&mut self, data: &[u8]) {
        if self.stdin {
            self.header_first(None);
            let t = self.elapsed();
            self.typed.event(&mut self.staged, t, "i", data);
        }
    }

    fn resize(&mut self, cols: u16, rows: u16) {
        if self.header_first(Some((cols, rows))) {
            return;
        }
        let t = self.elapsed();
        cast::resize(&mut self.staged, t, cols, rows);
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // A session that showed nothing still leaves a valid (empty) recording.
        if self.decoder.is_some() {
            self.header_first(None);
            self.hand_over();
        }
        let mut s = self.spool.inner.lock();
        s.closed = true;
        drop(s);
        self.spool.ready.notify_one();
    }
}

/// Moves the spool's lines to the store about once a second (sooner when the spool is half
/// full), and the rest when the session ends. Returns why recording stopped, if it did.
async fn write_loop(spool: &Spool, object: &mut store::Object) -> Option<Failure> {
    let mut last = Instant::now();
    loop {
        // Wait for lines, then gather more for up to FLUSH_EVERY since the last append: an
        // append per keystroke would exhaust an append blob's 50,000 blocks within hours.
        loop {
            let (len, closed) = {
                let s = spool.inner.lock();
                (s.lines.len(), s.closed || s.failed.is_some())
            };
            let due = last + FLUSH_EVERY;
            if closed || len >= SPOOL_BUDGET / 2 || (len > 0 && Instant::now() >= due) {
                break;
            }
            let wake = if len > 0 {
                due
            } else {
                Instant::now() + FLUSH_EVERY
            };
            tokio::select! {
                () = spool.ready.notified() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        let (lines, closed, failed) = {
            let mut s = spool.inner.lock();
            (std::mem::take(&mut s.lines), s.closed, s.failed.clone())
        };
        if !lines.is_empty() {
            last = Instant::now();
            if let Err(e) = object.append(lines.into_bytes()).await {
                let mut s = spool.inner.lock();
                s.failed = Some(e.to_string());
                if let Some(w) = s.waiter.take() {
                    w.wake();
                }
                return Some(Failure(e.to_string()));
            }
        }
        if let Some(w) = spool.inner.lock().waiter.take() {
            w.wake();
        }
        if let Some(why) = failed {
            return Some(Failure(why));
        }
        if closed {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![
            0x82,
            if mask.is_some() { 0x80 } else { 0 } | payload.len() as u8,
        ];
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    fn info(max_bytes: u64) -> SessionInfo {
        SessionInfo {
            id: "s1".into(),
            cluster: "alpha".into(),
            user: "alice".into(),
            namespace: "default".into(),
            pod: "web-0".into(),
            container: None,
            command: "sh".into(),
            stdin: false,
            max_bytes,
        }
    }

    /// A recording stops at `recording.max_session_size`: what came before is kept, a marker
    /// ends it, the session is told once, and nothing more is written however much follows.
    #[tokio::test]
    async fn a_recording_stops_at_its_size_limit_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RecordingStore::Dir(dir.path().to_owned()));
        let told = Arc::new(Mutex::new(Vec::<String>::new()));
        let t = told.clone();
        let limit = 64 << 10;
        let (mut rec, finished) = Recording::open(store, info(limit), move |why| {
            t.lock().push(why.to_owned());
        })
        .await
        .unwrap();
        let name = rec.name.clone();
        rec.framing(Some("v5.channel.k8s.io"));
        // 16 KiB of printable output per frame: the fourth no longer fits.
        let line = [b'x'; 16 << 10];
        let mut frame = vec![0x82, 127];
        frame.extend_from_slice(&(1 + line.len() as u64).to_be_bytes());
        frame.push(1);
        frame.extend_from_slice(&line);
        for _ in 0..40 {
            rec.from_server(&frame);
        }
        drop(rec);
        let failure = finished
            .await
            .unwrap()
            .expect("the recording says it stopped");
        assert!(
            failure.0.contains("recording.max_session_size"),
            "{}",
            failure.0
        );
        assert_eq!(told.lock().len(), 1, "{:?}", told.lock());
        let text = std::fs::read_to_string(dir.path().join(&name)).unwrap();
        assert!(text.len() as u64 <= limit + 200, "{} bytes", text.len());
        let events: Vec<serde_json::Value> = text
            .lines()
            .skip(1)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let shown: usize = events
            .iter()
            .filter(|e| e[1] == "o")
            .map(|e| e[2].as_str().unwrap().len())
            .sum();
        assert_eq!(
            shown,
            3 * line.len(),
            "whole frames before the limit are kept"
        );
        let last = events.last().unwrap();
        assert_eq!(last[1], "m", "{last}");
        assert!(
            last[2].as_str().unwrap().contains("max_session_size"),
            "{last}"
        );
    }

    #[tokio::test]
    async fn a_session_s_size_output_and_resizes_reach_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RecordingStore::Dir(dir.path().to_owned()));
        let (mut rec, finished) = Recording::open(store, info(1 << 20), |_| {}).await.unwrap();
        let name = rec.name.clone();
        rec.framing(Some("v5.channel.k8s.io"));
        let k = Some([9, 8, 7, 6]);
        rec.from_client(&ws(b"\x04{\"Width\":100,\"Height\":30}", k));
        rec.from_server(&ws(b"\x01hello\r\n", None));
        rec.from_client(&ws(b"\x04{\"Width\":90,\"Height\":20}", k));
        drop(rec);
        assert!(finished.await.unwrap().is_none());
        let text = std::fs::read_to_string(dir.path().join(&name)).unwrap();
        let mut lines = text.lines();
        let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(
            (header["width"].as_u64(), header["height"].as_u64()),
            (Some(100), Some(30)),
            "{text}"
        );
        let rest: Vec<serde_json::Value> =
            lines.map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rest[0][1], "o", "{text}");
        assert_eq!(rest[1][1], "r", "{text}");
        assert_eq!(rest[1][2], "90x20", "{text}");
    }
}
