//! The audit log: one JSON line per request, shaped like Kubernetes' `audit.k8s.io/v1` Event
//! (docs/protocols.md §5.2) so relay records join AKS `kube-audit` rows on `auditID` (the relay
//! sends
//! the same id upstream as `Audit-ID`).
//!
//! Long-running requests (watch, `logs -f`, exec, attach, port-forward) get two records: stage
//! `ResponseStarted` when the stream opens and `ResponseComplete` when it closes, with bytes each
//! way and the close reason. Denials carry the decision and its reason. A token never appears.
//!
//! Records are written by one background thread ([`crate::lines`]) so the request path never
//! waits on the disk; the queue is bounded, and records that do not fit are counted
//! (`relay_audit_dropped_total`) and logged rather than blocking traffic.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::lines::LineWriter;
use crate::metrics::Metrics;

const QUEUE: usize = 65_536;

pub use crate::config::AuditSink;

/// A handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    out: Option<LineWriter>,
    metrics: Arc<Metrics>,
}

impl AuditLog {
    /// Opens the sink (a file is created or appended to, mode 0600) and starts the writer.
    pub fn start(sink: &AuditSink, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let out: Box<dyn std::io::Write + Send> = match sink {
            AuditSink::Off => return Ok(Self { out: None, metrics }),
            // Buffered: the writer hands over a whole batch at a time.
            AuditSink::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
            AuditSink::File(p) => {
                let mut o = std::fs::OpenOptions::new();
                o.create(true).append(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    o.mode(0o600);
                }
                Box::new(std::io::BufWriter::new(o.open(p).map_err(|e| {
                    anyhow::anyhow!("audit.path: cannot open {}: {e}", p.display())
                })?))
            }
        };
        // A plain thread: writes are blocking I/O and must not stall the async workers.
        let out = LineWriter::spawn("kube-relay-audit", out, QUEUE)?;
        Ok(Self {
            out: Some(out),
            metrics,
        })
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
    pub fn emit(
        &self,
        base: &AuditBase,
        stage: &'static str,
        code: u16,
        extra: &[(&'static str, String)],
    ) {
        let Some(out) = &self.out else { return };
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
            user: base.user.as_ref().map_or_else(User::default, User::from),
            impersonated_user: base.impersonated.as_ref().map(User::from),
            source_ips: &base.source_ips,
            user_agent: base.user_agent.as_deref(),
            object_ref: base.object_ref.as_ref().map(|o| ObjectRef {
                resource: o.resource.as_deref(),
                namespace: o.namespace.as_deref(),
                name: o.name.as_deref(),
                api_group: &o.api_group,
                subresource: o.subresource.as_deref(),
            }),
            response_status: ResponseStatus { code },
            request_received_timestamp: timestamp(base.received),
            stage_timestamp: timestamp(None),
            annotations,
        };
        let Ok(mut line) = serde_json::to_vec(&ev) else {
            return;
        };
        line.push(b'\n');
        if out.try_write(line).is_err() {
            self.metrics.audit_dropped.inc();
            tracing::warn!(audit_id = %base.audit_id, "audit queue full; record dropped");
        }
    }
}

/// What the audit log knows about a request, filled in as the phases run.
#[derive(Clone, Debug, Default)]
pub struct AuditBase {
    pub audit_id: String,
    pub request_uri: String,
    pub verb: String,
    pub user: Option<AuditUser>,
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
    user: User<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    impersonated_user: Option<User<'a>>,
    #[serde(rename = "sourceIPs")]
    source_ips: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    object_ref: Option<ObjectRef<'a>>,
    response_status: ResponseStatus,
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
}
