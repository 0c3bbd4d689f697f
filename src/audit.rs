//! The audit log: one JSON line per request, shaped like Kubernetes' `audit.k8s.io/v1` Event
//! (docs/protocols.md §5.2) so relay records join AKS `kube-audit` rows on `auditID` (the relay
//! sends
//! the same id upstream as `Audit-ID`).
//!
//! Long-running requests (watch, `logs -f`, exec, attach, port-forward) get two records: stage
//! `ResponseStarted` when the stream opens and `ResponseComplete` when it closes, with bytes each
//! way and the close reason. Denials carry the decision and its reason. A token never appears.
//!
//! Records are written by one background thread ([`crate::lines`]). A file sink takes each
//! batch whole or not at all (no torn lines on a full disk). What happens when records cannot be
//! written is `audit.mode`:
//! - `best_effort` (default): the request path never waits on the disk; records that do not fit
//!   the bounded queue or that the sink refuses are counted (`relay_audit_dropped_total`) and
//!   logged.
//! - `blocking`: an admitted request gets a `RequestReceived` record, written before it goes to
//!   the cluster, and every answer waits until its own record is written; either failing turns
//!   the answer into a 503 naming the sink, and while the sink fails requests are refused with
//!   that 503 before any other work. So nothing reaches a cluster unrecorded, and every answer
//!   other than that 503 has its record.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use serde_json::value::RawValue;

use crate::config::AuditMode;
use crate::lines::LineWriter;
use crate::metrics::Metrics;

const QUEUE: usize = 65_536;

pub use crate::config::AuditSink;

/// A handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    out: Option<LineWriter>,
    metrics: Arc<Metrics>,
    mode: AuditMode,
    /// The sink as the 503 names it (`audit.path`).
    sink: Arc<str>,
}

impl AuditLog {
    /// Opens the sink (a file is created or appended to, mode 0600) and starts the writer.
    pub fn start(sink: &AuditSink, mode: AuditMode, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let (out, name): (Box<dyn std::io::Write + Send>, String) = match sink {
            AuditSink::Off => {
                return Ok(Self {
                    out: None,
                    metrics,
                    mode,
                    sink: Arc::from("off"),
                })
            }
            // Buffered: the writer hands over a whole batch at a time.
            AuditSink::Stdout => (
                Box::new(std::io::BufWriter::new(std::io::stdout())),
                "stdout".to_owned(),
            ),
            AuditSink::File(p) => {
                let mut o = std::fs::OpenOptions::new();
                o.create(true).append(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    o.mode(0o600);
                }
                let file = o
                    .open(p)
                    .map_err(|e| anyhow::anyhow!("audit.path: cannot open {}: {e}", p.display()))?;
                (Box::new(AppendFile::new(file)), p.display().to_string())
            }
        };
        let m = metrics.clone();
        let on_lost: crate::lines::OnLost = Box::new(move |n| {
            m.audit_dropped.inc_by(n);
            tracing::warn!(records = n, "audit sink refused a write; records lost");
        });
        // A plain thread: writes are blocking I/O and must not stall the async workers.
        let out = LineWriter::spawn_reporting("kube-relay-audit", out, QUEUE, on_lost)?;
        Ok(Self {
            out: Some(out),
            metrics,
            mode,
            sink: Arc::from(name),
        })
    }

    /// `audit.mode: blocking` and the sink is failing: the sink's name, for the 503.
    pub fn refusing(&self) -> Option<&str> {
        match (&self.out, self.mode) {
            (Some(out), AuditMode::Blocking) if !out.is_writing() => Some(&self.sink),
            _ => None,
        }
    }

    /// The sink's name (`audit.path`), for messages.
    pub fn sink(&self) -> &str {
        &self.sink
    }

    /// Resolves once every record emitted before the call is written and flushed. The process
    /// exits right after draining, and the writer is a detached thread: without this the last
    /// streams' `ResponseComplete` records could die in the queue.
    pub async fn flush(&self) {
        if let Some(out) = &self.out {
            out.flush().await;
        }
    }

    /// Writes one record for `base` at `stage` with the response code and extra annotations.
    /// In `blocking` mode the answer says whether it was written (await it before answering);
    /// `None` in `best_effort` mode and without a sink.
    pub fn emit(
        &self,
        base: &AuditBase,
        stage: &'static str,
        code: u16,
        extra: &[(&'static str, String)],
    ) -> Option<Written> {
        self.write(base, stage, Some(code), extra)
    }

    /// `audit.mode: blocking` with a sink: admitted requests get a `RequestReceived` record
    /// ([`emit_received`](Self::emit_received)) before they go to the cluster. Asked first, so
    /// `best_effort` builds no record for it.
    pub fn records_received(&self) -> bool {
        self.mode == AuditMode::Blocking && self.out.is_some()
    }

    /// A `RequestReceived` record for an admitted request, written before it goes to the
    /// cluster, so nothing reaches a cluster unrecorded (as kube-apiserver's blocking audit
    /// does). Only when [`records_received`](Self::records_received).
    pub fn emit_received(&self, base: &AuditBase) -> Written {
        self.write(base, "RequestReceived", None, &[])
            .unwrap_or(Written(None))
    }

    fn write(
        &self,
        base: &AuditBase,
        stage: &'static str,
        code: Option<u16>,
        extra: &[(&'static str, String)],
    ) -> Option<Written> {
        let out = self.out.as_ref()?;
        let annotations = Annotations {
            base: &base.annotations,
            extra,
        };
        let ev = Event {
            api_version: "audit.k8s.io/v1",
            kind: "Event",
            level: "Metadata",
            audit_id: &base.audit_id,
            stage,
            request_uri: &base.request_uri,
            verb: &base.verb,
            user: base
                .user
                .as_deref()
                .map_or_else(|| UserField::Fields(User::default()), UserField::of),
            impersonated_user: base.impersonated.as_ref().map(UserField::of),
            source_ips: &base.source_ips,
            user_agent: base.user_agent.as_deref(),
            object_ref: base.object_ref.as_ref().map(|o| ObjectRef {
                resource: o.resource.as_deref(),
                namespace: o.namespace.as_deref(),
                name: o.name.as_deref(),
                api_group: &o.api_group,
                subresource: o.subresource.as_deref(),
            }),
            response_status: code.map(|code| ResponseStatus { code }),
            request_received_timestamp: timestamp(base.received),
            stage_timestamp: timestamp(None),
            annotations,
        };
        let Ok(mut line) = serde_json::to_vec(&ev) else {
            return None;
        };
        line.push(b'\n');
        if self.mode == AuditMode::Blocking {
            return Some(Written(out.write_acked(line).ok()));
        }
        if out.try_write(line).is_err() {
            self.metrics.audit_dropped.inc();
            tracing::warn!(audit_id = %base.audit_id, "audit queue full; record dropped");
        }
        None
    }
}

/// Whether one record of a `blocking` audit log was written.
pub struct Written(Option<tokio::sync::oneshot::Receiver<bool>>);

/// How long an answer waits for its record before the sink counts as failing: a sink that
/// hangs (a stuck disk or pipe) must not hold requests for ever.
const WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Written {
    /// True once the record is in the sink; false if the queue was full, the write failed, or
    /// it took longer than [`WRITE_WAIT`].
    pub async fn wait(self) -> bool {
        match self.0 {
            Some(rx) => tokio::time::timeout(WRITE_WAIT, rx)
                .await
                .is_ok_and(|r| r.unwrap_or(false)),
            None => false,
        }
    }
}

/// The audit file: every flush appends all that was written since the last one, or nothing (a
/// write cut short by a full disk is truncated away, so no record is ever torn). With nothing
/// to write after a failure, a flush checks that a record-sized append fits again.
struct AppendFile {
    file: std::fs::File,
    buf: Vec<u8>,
    failing: bool,
}

/// Bytes a probe appends (and removes again): about one record.
const PROBE_BYTES: usize = 4096;

impl AppendFile {
    fn new(file: std::fs::File) -> Self {
        Self {
            file,
            buf: Vec::with_capacity(64 * 1024),
            failing: false,
        }
    }

    /// Appends `bytes`, or leaves the file as it was.
    fn append_all_or_nothing(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        let len = self.file.metadata()?.len();
        let r = self.file.write_all(bytes);
        if r.is_err() {
            let _ = self.file.set_len(len);
        }
        r
    }
}

impl std::io::Write for AppendFile {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            if !self.failing {
                return Ok(());
            }
            let len = self.file.metadata()?.len();
            self.append_all_or_nothing(&[b' '; PROBE_BYTES])?;
            self.file.set_len(len)?;
            self.failing = false;
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.append_all_or_nothing(&buf);
        // Kept for reuse, emptied either way: a failed batch is reported lost, not retried
        // (its requests were answered, or refused in blocking mode, already).
        self.buf = buf;
        self.buf.clear();
        // A burst's buffer is not kept for ever.
        self.buf.shrink_to(64 * 1024);
        self.failing = r.is_err();
        r
    }
}

/// What the audit log knows about a request, filled in as the phases run.
#[derive(Clone, Debug, Default)]
pub struct AuditBase {
    pub audit_id: String,
    pub request_uri: String,
    pub verb: String,
    pub user: Option<Arc<AuditUser>>,
    /// The identity a permitted `kubectl --as` asked for (the caller stays in `user`).
    pub impersonated: Option<AuditUser>,
    pub source_ips: Vec<String>,
    pub user_agent: Option<String>,
    pub object_ref: Option<AuditObject>,
    pub annotations: BTreeMap<&'static str, String>,
    pub received: Option<std::time::SystemTime>,
}

#[derive(Clone, Debug, Default)]
pub struct AuditUser {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Arc<[String]>,
    pub extra: BTreeMap<&'static str, Vec<String>>,
    /// The record's `user` object as JSON, serialized by the first record that writes it: a
    /// caller's records share one `AuditUser` (`auth::Memo`), and escaping dozens of group
    /// names for every record was most of the cost of writing it.
    json: OnceLock<Option<Box<RawValue>>>,
}

impl AuditUser {
    pub fn new(
        username: String,
        uid: Option<String>,
        groups: Arc<[String]>,
        extra: BTreeMap<&'static str, Vec<String>>,
    ) -> Self {
        Self {
            username,
            uid,
            groups,
            extra,
            json: OnceLock::new(),
        }
    }

    fn json(&self) -> Option<&RawValue> {
        self.json
            .get_or_init(|| serde_json::value::to_raw_value(&User::from(self)).ok())
            .as_deref()
    }
}

/// The record's `user` (or `impersonatedUser`): the memoised JSON when there is one.
#[derive(Serialize)]
#[serde(untagged)]
enum UserField<'a> {
    Json(&'a RawValue),
    Fields(User<'a>),
}

impl<'a> UserField<'a> {
    fn of(u: &'a AuditUser) -> Self {
        match u.json() {
            Some(j) => UserField::Json(j),
            None => UserField::Fields(User::from(u)),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct AuditObject {
    pub resource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub api_group: String,
    pub subresource: Option<String>,
}

/// One audit record (`audit.k8s.io/v1` Event, level Metadata).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    api_version: &'static str,
    kind: &'static str,
    level: &'static str,
    #[serde(rename = "auditID")]
    audit_id: &'a str,
    stage: &'static str,
    #[serde(rename = "requestURI")]
    request_uri: &'a str,
    verb: &'a str,
    user: UserField<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    impersonated_user: Option<UserField<'a>>,
    #[serde(rename = "sourceIPs")]
    source_ips: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    object_ref: Option<ObjectRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_status: Option<ResponseStatus>,
    request_received_timestamp: String,
    stage_timestamp: String,
    annotations: Annotations<'a>,
}

/// The record's annotations: the request's, then the stage's (which win on a shared key),
/// serialized from where they are rather than merged into a copy for every record.
struct Annotations<'a> {
    base: &'a BTreeMap<&'static str, String>,
    extra: &'a [(&'static str, String)],
}

impl Serialize for Annotations<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.base {
            if !self.extra.iter().any(|(e, _)| e == k) {
                m.serialize_entry(k, v)?;
            }
        }
        for (k, v) in self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Serialize, Default)]
struct User<'a> {
    username: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extra: BTreeMap<&'static str, Vec<&'a str>>,
}

impl<'a> From<&'a AuditUser> for User<'a> {
    fn from(u: &'a AuditUser) -> Self {
        User {
            username: &u.username,
            uid: u.uid.as_deref(),
            groups: &u.groups,
            extra: u
                .extra
                .iter()
                .map(|(k, v)| (*k, v.iter().map(String::as_str).collect()))
                .collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    api_group: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subresource: Option<&'a str>,
}

#[derive(Serialize)]
struct ResponseStatus {
    code: u16,
}

/// RFC 3339 with microseconds, as Kubernetes audit writes timestamps.
pub fn timestamp(t: Option<std::time::SystemTime>) -> String {
    let t = t.unwrap_or_else(std::time::SystemTime::now);
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_annotations_join_the_requests_and_win_on_a_shared_key() {
        let mut base = BTreeMap::new();
        base.insert("kube-relay.io/cluster", "prod".to_owned());
        base.insert("kube-relay.io/latency-ms", "stale".to_owned());
        let extra = [("kube-relay.io/latency-ms", "7".to_owned())];
        let json = serde_json::to_value(Annotations {
            base: &base,
            extra: &extra,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kube-relay.io/cluster": "prod", "kube-relay.io/latency-ms": "7"})
        );
        // Exactly one entry per key in the text, as a JSON object must have.
        let text = serde_json::to_string(&Annotations {
            base: &base,
            extra: &extra,
        })
        .unwrap();
        assert_eq!(text.matches("latency-ms").count(), 1, "{text}");
    }

    #[test]
    fn a_shared_user_is_written_the_same_in_every_record() {
        let mut extra = BTreeMap::new();
        extra.insert("oid", vec!["a1".to_owned()]);
        let user = AuditUser::new(
            "alice@example.com".into(),
            Some("a1".into()),
            Arc::from(["g\"1".to_owned(), "g2".to_owned()]),
            extra,
        );
        let expected = serde_json::json!({
            "username": "alice@example.com", "uid": "a1", "groups": ["g\"1", "g2"],
            "extra": {"oid": ["a1"]}
        });
        // The first record serializes the user; later ones reuse that text.
        for _ in 0..2 {
            let v = serde_json::to_value(UserField::of(&user)).unwrap();
            assert_eq!(v, expected);
        }
        assert!(user.json.get().is_some_and(Option::is_some));
        // A clone made after the first record carries the same text.
        let copy = user.clone();
        assert_eq!(
            serde_json::to_value(UserField::of(&copy)).unwrap(),
            expected
        );
        // No user: the record still has one, empty, as before.
        let none = serde_json::to_value(UserField::Fields(User::default())).unwrap();
        assert_eq!(none, serde_json::json!({"username": ""}));
    }
}
