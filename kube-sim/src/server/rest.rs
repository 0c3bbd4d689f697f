//! The resource API under `/api/v1`: list (with selectors, `limit`/`continue`), get, create,
//! update, patch, delete, deletecollection, watch, and `pods/log`; JSON or `meta.k8s.io` Table
//! output as the `Accept` header asks.
//!
//! Streams (watch, `log?follow=true`) are an mpsc channel feeding the response body: every
//! event or line is sent as its own chunk (HTTP/1.1 chunked, h2 DATA frame) as soon as it
//! exists. A stream ends on `timeoutSeconds`, shutdown, or when the client goes away (the body
//! is dropped, which closes the channel).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, mpsc};

use super::patch::{self, PatchError, PatchType};
use super::{accept_header, bytes_response, json_bytes, json_response, ApiError, Query, State};
use crate::store::{
    format_rfc3339, now_unix, parse_rfc3339, FieldSelector, LabelSelector, Resource, StoreError,
    WatchEvent, WatchFrom,
};
use crate::Body;

/// kube-apiserver's request body limit (3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// Lines a container "has logged" before any follow.
const LOG_LINES: u64 = 5;
/// How often a followed log grows by one line.
const LOG_INTERVAL: Duration = Duration::from_millis(200);
/// How often a watch that allows bookmarks gets one (kube-apiserver: about once a minute).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// What a path under `/api/v1/` names.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    /// Parses the segments after `/api/v1`; `None` for paths that name no served resource.
    pub(super) fn parse(segments: &[&str]) -> Option<Self> {
        let owned = |s: &&str| (*s).to_owned();
        let (resource, namespace, rest) = match segments {
            ["namespaces", ns, plural, rest @ ..]
                if Resource::from_plural(plural).is_some_and(Resource::namespaced) =>
            {
                (Resource::from_plural(plural)?, Some((*ns).to_owned()), rest)
            }
            ["namespaces", rest @ ..] => (Resource::Namespaces, None, rest),
            [plural] => (
                Resource::from_plural(plural).filter(|r| r.namespaced())?,
                None,
                &[][..],
            ),
            _ => return None,
        };
        match rest {
            [] | [_] | [_, _] => Some(Self {
                resource,
                namespace,
                name: rest.first().map(owned),
                subresource: rest.get(1).map(owned),
            }),
            _ => None,
        }
    }
}

pub(super) async fn serve(
    state: &Arc<State>,
    req: Request<Incoming>,
    t: Target,
) -> Result<Response<Body>, ApiError> {
    let q = Query::parse(req.uri().query());
    let method = req.method().clone();
    match (&t.name, &t.subresource) {
        (Some(name), Some(sub)) if sub == "log" && t.resource == Resource::Pods => {
            if method != Method::GET {
                return Err(ApiError::method_not_allowed());
            }
            logs(state, t.namespace.as_deref(), name, &q)
        }
        (Some(_), Some(_)) => Err(ApiError::path_not_found()),
        (None, _) => match method {
            Method::GET => {
                let format = negotiate(&req, &q)?;
                if q.flag("watch") {
                    watch(state, &t, &q, format)
                } else {
                    list(state, &t, &q, format)
                }
            }
            // Creating needs a namespace in the path: POST /api/v1/pods is not served.
            Method::POST if t.resource.namespaced() == t.namespace.is_some() => {
                let obj = read_object(req, &t).await?;
                let created =
                    state
                        .store
                        .create(t.resource, t.namespace.as_deref(), obj, dry_run(&q))?;
                Ok(json_response(StatusCode::CREATED, &created))
            }
            Method::DELETE if t.resource != Resource::Namespaces && t.namespace.is_some() => {
                delete_collection(state, &t, &q)
            }
            _ => Err(ApiError::method_not_allowed()),
        },
        (Some(name), None) => match method {
            Method::GET => {
                let format = negotiate(&req, &q)?;
                let obj = state
                    .store
                    .get(t.resource, t.namespace.as_deref(), name)
                    .ok_or_else(|| not_found(t.resource, name))?;
                Ok(match format {
                    Format::Json => json_response(StatusCode::OK, &obj),
                    Format::Table { version, include } => {
                        let rows = vec![table_row(t.resource, &obj, version, include)];
                        let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
                        json_response(
                            StatusCode::OK,
                            &table(t.resource, version, rows, meta, true),
                        )
                    }
                })
            }
            Method::PUT => {
                let obj = read_object(req, &t).await?;
                let updated = state.store.replace(
                    t.resource,
                    t.namespace.as_deref(),
                    name,
                    obj,
                    dry_run(&q),
                )?;
                Ok(json_response(StatusCode::OK, &updated))
            }
            Method::PATCH => patch_object(state, req, &t, name, &q).await,
            Method::DELETE => delete_object(state, req, &t, name, &q).await,
            _ => Err(ApiError::method_not_allowed()),
        },
    }
}

/// PATCH: JSON, merge or strategic merge patch, applied under the store lock.
async fn patch_object(
    state: &State,
    req: Request<Incoming>,
    t: &Target,
    name: &str,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // Server-side apply (`application/apply-patch+yaml`) is not simulated: 415, like a server
    // that does not know the patch type.
    let kind = PatchType::from_content_type(&content_type).ok_or_else(|| {
        let accepted = "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json";
        if content_type.starts_with("application/apply-patch") {
            // Say so in the answer: kubectl prints it after "Server-side apply not available".
            ApiError::unsupported_media_type(&format!(
                "{accepted} (kube-sim does not simulate server-side apply: use client-side `kubectl apply`, or a real cluster behind the relay)"
            ))
        } else {
            ApiError::unsupported_media_type(accepted)
        }
    })?;
    let body = read_body(req).await?;
    let resource = t.resource;
    let patched = state.store.update_with(
        resource,
        t.namespace.as_deref(),
        name,
        dry_run(q),
        |current| {
            patch::apply(kind, current, &body).map_err(|e| match e {
                PatchError::Malformed(m) => StoreError::BadRequest(m),
                PatchError::NotApplicable(message) => StoreError::Invalid {
                    resource,
                    name: name.to_owned(),
                    message,
                },
            })
        },
    )?;
    Ok(json_response(StatusCode::OK, &patched))
}

/// DELETE of one object. Pods (graceful deletion) and namespaces (finalizers) answer with the
/// object, configmaps with a success Status, as kube-apiserver does.
async fn delete_object(
    state: &State,
    req: Request<Incoming>,
    t: &Target,
    name: &str,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(req).await?;
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    let dry = dry_run(q)
        || options["dryRun"]
            .as_array()
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    let deleted = state
        .store
        .delete(t.resource, t.namespace.as_deref(), name, dry)?;
    let body = match t.resource {
        Resource::Pods | Resource::Namespaces => deleted,
        Resource::ConfigMaps | Resource::Events => json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "kind": t.resource.plural(), "uid": deleted["metadata"]["uid"]},
        }),
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn not_found(resource: Resource, name: &str) -> ApiError {
    StoreError::NotFound {
        resource,
        name: name.to_owned(),
    }
    .into()
}

fn dry_run(q: &Query) -> bool {
    q.get("dryRun") == Some("All")
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

/// A JSON object body for POST/PUT, checked against the path like kube-apiserver does.
async fn read_object(req: Request<Incoming>, t: &Target) -> Result<Value, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    if !content_type.starts_with("application/json") {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    let body = read_body(req).await?;
    let obj: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): {e}",
            t.resource.kind()
        ))
    })?;
    if !obj.is_object() {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {})",
            t.resource.kind()
        )));
    }
    if let Some(kind) = obj
        .get("kind")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
    {
        let version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("v1");
        if kind != t.resource.kind() || version != "v1" {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{version}\" cannot be handled as a {}: no kind \"{kind}\" is registered for version \"{version}\" in scheme",
                t.resource.kind()
            )));
        }
    }
    let body_ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    if let (Some(body_ns), Some(path_ns)) = (body_ns, t.namespace.as_deref()) {
        if body_ns != path_ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    Ok(obj)
}

// === Output formats ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    /// `meta.k8s.io` Table, in `version` (v1 or v1beta1).
    Table {
        version: &'static str,
        include: Include,
    },
}

/// `includeObject`: what each Table row carries as `object`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Include {
    None,
    Metadata,
    Object,
}

/// The first acceptable entry of `Accept` wins (kubectl lists Table v1, Table v1beta1, JSON).
fn negotiate(req: &Request<Incoming>, q: &Query) -> Result<Format, ApiError> {
    let include = match q.get("includeObject") {
        Some("None") => Include::None,
        Some("Object") => Include::Object,
        _ => Include::Metadata,
    };
    for range in accept_header(req).iter().filter(|r| r.accepts_json()) {
        match (range.param("as"), range.param("g"), range.param("v")) {
            (None, _, _) => return Ok(Format::Json),
            (Some("Table"), Some("meta.k8s.io"), Some("v1")) => {
                return Ok(Format::Table {
                    version: "v1",
                    include,
                })
            }
            (Some("Table"), Some("meta.k8s.io"), Some("v1beta1")) => {
                return Ok(Format::Table {
                    version: "v1beta1",
                    include,
                })
            }
            _ => {}
        }
    }
    Err(ApiError::not_acceptable())
}

fn strip_type_meta(mut obj: Value) -> Value {
    // Items of a list carry no kind/apiVersion on the wire (the list's kind says it).
    if let Some(map) = obj.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    obj
}

/// Column name, type, format, priority, description: kube-apiserver's printer columns.
type Column = (&'static str, &'static str, &'static str, u8, &'static str);

const NAME_COLUMN: Column = ("Name", "string", "name", 0, "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names");
const AGE_COLUMN: Column = ("Age", "string", "", 0, "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata");

fn columns(resource: Resource) -> Vec<Column> {
    match resource {
        Resource::Pods => vec![
            NAME_COLUMN,
            ("Ready", "string", "", 0, "The aggregate readiness state of this pod for accepting traffic."),
            ("Status", "string", "", 0, "The aggregate status of the containers in this pod."),
            ("Restarts", "string", "", 0, "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
            AGE_COLUMN,
            ("IP", "string", "", 1, "The IP address assigned to the pod"),
            ("Node", "string", "", 1, "The name of the node assigned to the pod"),
            ("Nominated Node", "string", "", 1, "The name of the node nominated by the scheduler"),
            ("Readiness Gates", "string", "", 1, "The readiness gates of the pod"),
        ],
        Resource::ConfigMaps => vec![
            NAME_COLUMN,
            ("Data", "integer", "", 0, "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_' or '.'."),
            AGE_COLUMN,
        ],
        Resource::Namespaces => vec![
            NAME_COLUMN,
            ("Status", "string", "", 0, "The status of the namespace"),
            AGE_COLUMN,
        ],
        Resource::Events => vec![
            ("Last Seen", "string", "", 0, "Time when this event was last seen."),
            ("Type", "string", "", 0, "Type of this event (Normal, Warning)."),
            ("Reason", "string", "", 0, "A short, machine understandable string that gives the reason for the transition into the object's current status."),
            ("Object", "string", "", 0, "The object that this event is about."),
            ("Message", "string", "", 0, "A human-readable description of the status of this operation."),
        ],
    }
}

fn table(
    resource: Resource,
    version: &str,
    rows: Vec<Value>,
    metadata: Value,
    with_columns: bool,
) -> Value {
    let columns: Value = if with_columns {
        columns(resource)
            .into_iter()
            .map(|(name, ty, format, priority, description)| {
                json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
            })
            .collect()
    } else {
        // Later watch events omit the columns to save bandwidth, as kube-apiserver does.
        Value::Null
    };
    json!({
        "kind": "Table",
        "apiVersion": format!("meta.k8s.io/{version}"),
        "metadata": metadata,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

fn table_row(resource: Resource, obj: &Value, version: &str, include: Include) -> Value {
    let s = |ptr: &str| {
        obj.pointer(ptr)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let or_none = |v: String| if v.is_empty() { "<none>".to_owned() } else { v };
    let age = parse_rfc3339(&s("/metadata/creationTimestamp")).map_or_else(
        || "<unknown>".to_owned(),
        |t| human_duration(now_unix() - t),
    );
    let cells = match resource {
        Resource::Pods => {
            let statuses = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let total = obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = statuses.map_or(0, |s| s.iter().filter(|c| c["ready"] == true).count());
            let restarts: i64 = statuses.map_or(0, |s| {
                s.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
            });
            let status = if obj.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating".to_owned()
            } else {
                or_none(s("/status/phase"))
            };
            json!([
                s("/metadata/name"),
                format!("{ready}/{total}"),
                status,
                restarts,
                age,
                or_none(s("/status/podIP")),
                or_none(s("/spec/nodeName")),
                "<none>",
                "<none>"
            ])
        }
        Resource::ConfigMaps => {
            let count = |ptr: &str| {
                obj.pointer(ptr)
                    .and_then(Value::as_object)
                    .map_or(0, Map::len)
            };
            json!([
                s("/metadata/name"),
                count("/data") + count("/binaryData"),
                age
            ])
        }
        Resource::Namespaces => json!([s("/metadata/name"), s("/status/phase"), age]),
        Resource::Events => {
            let object = format!(
                "{}/{}",
                s("/involvedObject/kind").to_ascii_lowercase(),
                s("/involvedObject/name")
            );
            json!([age, s("/type"), s("/reason"), object, s("/message")])
        }
    };
    let mut row = json!({"cells": cells});
    match include {
        Include::None => {}
        Include::Object => row["object"] = obj.clone(),
        Include::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": format!("meta.k8s.io/{version}"),
                "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
            });
        }
    }
    row
}

/// kube's `duration.HumanDuration`: `59s`, `5m10s`, `3h`, `4d2h`, `2y`…
fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (m, h) = (secs / 60, secs / 3600);
    let (d, y) = (h / 24, h / (24 * 365));
    match () {
        _ if secs < 120 => format!("{secs}s"),
        _ if m < 10 && secs % 60 == 0 => format!("{m}m"),
        _ if m < 10 => format!("{m}m{}s", secs % 60),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 && m % 60 == 0 => format!("{h}h"),
        _ if h < 8 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 && h % 24 == 0 => format!("{d}d"),
        _ if h < 24 * 8 => format!("{d}d{}h", h % 24),
        _ if h < 24 * 365 * 2 => format!("{d}d"),
        _ if h < 24 * 365 * 8 && d % 365 == 0 => format!("{y}y"),
        _ if h < 24 * 365 * 8 => format!("{y}y{}d", d % 365),
        _ => format!("{y}y"),
    }
}

// === list, deletecollection ===

struct Selectors {
    label: LabelSelector,
    field: FieldSelector,
}

impl Selectors {
    fn parse(q: &Query, resource: Resource) -> Result<Self, ApiError> {
        Ok(Self {
            label: LabelSelector::parse(q.get("labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?,
            field: FieldSelector::parse(q.get("fieldSelector").unwrap_or_default(), resource)
                .map_err(ApiError::bad_request)?,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        self.label.matches(obj) && self.field.matches(obj)
    }
}

/// The `continue` token: like kube-apiserver's, base64url JSON naming the last key returned.
fn continue_token(rv: u64, key: &str) -> String {
    URL_SAFE_NO_PAD.encode(
        json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{key}\u{0}")}).to_string(),
    )
}

fn continue_start(token: &str) -> Result<String, ApiError> {
    let invalid = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| invalid("incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?;
    let doc: Value = serde_json::from_slice(&raw).map_err(|_| invalid("invalid JSON"))?;
    doc["start"]
        .as_str()
        .map(|s| s.trim_end_matches('\u{0}').to_owned())
        .ok_or_else(|| invalid("no start key"))
}

fn item_key(obj: &Value) -> String {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    format!("{}/{}", s("/metadata/namespace"), s("/metadata/name"))
}

fn list(state: &State, t: &Target, q: &Query, format: Format) -> Result<Response<Body>, ApiError> {
    let selectors = Selectors::parse(q, t.resource)?;
    let (items, rv) = state.store.list(t.resource, t.namespace.as_deref());
    let start = q
        .get("continue")
        .filter(|c| !c.is_empty())
        .map(continue_start)
        .transpose()?;
    let mut items: Vec<Value> = items
        .into_iter()
        .filter(|o| selectors.matches(o))
        .filter(|o| start.as_ref().is_none_or(|s| item_key(o) > *s))
        .collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    if let Some(limit) = limit.filter(|l| items.len() > *l) {
        let remaining = items.len() - limit;
        items.truncate(limit);
        if let Some(last) = items.last() {
            meta["continue"] = json!(continue_token(rv, &item_key(last)));
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    Ok(match format {
        Format::Json => json_response(
            StatusCode::OK,
            &json!({
                "kind": t.resource.list_kind(),
                "apiVersion": "v1",
                "metadata": meta,
                "items": items.into_iter().map(strip_type_meta).collect::<Vec<_>>(),
            }),
        ),
        Format::Table { version, include } => {
            let rows = items
                .iter()
                .map(|o| table_row(t.resource, o, version, include))
                .collect();
            json_response(
                StatusCode::OK,
                &table(t.resource, version, rows, meta, true),
            )
        }
    })
}

fn delete_collection(state: &State, t: &Target, q: &Query) -> Result<Response<Body>, ApiError> {
    let selectors = Selectors::parse(q, t.resource)?;
    let (items, _) = state.store.list(t.resource, t.namespace.as_deref());
    let mut deleted = Vec::new();
    for obj in items.iter().filter(|o| selectors.matches(o)) {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match state
            .store
            .delete(t.resource, t.namespace.as_deref(), name, dry_run(q))
        {
            Ok(gone) => deleted.push(strip_type_meta(gone)),
            // Deleted concurrently: not an error for a collection delete.
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": t.resource.list_kind(),
            "apiVersion": "v1",
            "metadata": {"resourceVersion": state.store.resource_version().to_string()},
            "items": deleted,
        }),
    ))
}

// === Streaming bodies ===

/// A response body fed by a channel; each message is one frame, written as soon as it arrives.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

fn streaming_response(content_type: &str) -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel(16);
    let mut resp = bytes_response(StatusCode::OK, content_type, Bytes::new());
    *resp.body_mut() = ChannelBody(rx).boxed();
    (tx, resp)
}

// === watch ===

/// Encodes watch events; in Table form only the first event carries the column definitions.
struct Encoder {
    format: Format,
    resource: Resource,
    sent_columns: bool,
}

impl Encoder {
    fn event(&mut self, kind: &str, obj: &Value) -> Bytes {
        let object = match self.format {
            Format::Json => obj.clone(),
            Format::Table { version, include } => {
                let rows = if kind == "BOOKMARK" {
                    Vec::new()
                } else {
                    vec![table_row(self.resource, obj, version, include)]
                };
                let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
                let t = table(self.resource, version, rows, meta, !self.sent_columns);
                self.sent_columns = true;
                t
            }
        };
        json_bytes(&json!({"type": kind, "object": object}))
    }

    fn bookmark(&mut self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.resource.kind(), "apiVersion": "v1", "metadata": meta});
        self.event("BOOKMARK", &obj)
    }
}

fn watch(
    state: &Arc<State>,
    t: &Target,
    q: &Query,
    format: Format,
) -> Result<Response<Body>, ApiError> {
    let selectors = Selectors::parse(q, t.resource)?;
    let send_initial = q.flag("sendInitialEvents");
    let from = match q.get("resourceVersion") {
        _ if send_initial => WatchFrom::Current,
        None | Some("" | "0") => WatchFrom::Current,
        Some(rv) => WatchFrom::After(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
        ),
    };
    let bookmarks = q.flag("allowWatchBookmarks");
    // The watch-list protocol (KEP-3157) is only valid with bookmarks: the last initial event
    // is marked by one.
    if send_initial && !bookmarks {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled and allowWatchBookmarks is set",
        ));
    }
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let mut encoder = Encoder {
        format,
        resource: t.resource,
        sent_columns: false,
    };
    let (tx, response) = streaming_response("application/json");
    let (backlog, live) = match state.store.watch(t.resource, from) {
        Ok(started) => started,
        // kube-apiserver answers 200 and then a single ERROR event carrying the 410 Status.
        Err(e @ StoreError::Expired { .. }) => {
            let status = ApiError::from(e).to_status();
            let event = json_bytes(&json!({"type": "ERROR", "object": status}));
            tokio::spawn(async move {
                let _ = tx.send(event).await;
            });
            return Ok(response);
        }
        Err(e) => return Err(e.into()),
    };
    let namespace = t.namespace.clone();
    let wanted = move |ev: &WatchEvent| {
        namespace
            .as_deref()
            .is_none_or(|ns| ev.namespace() == Some(ns))
            && selectors.matches(&ev.object)
    };
    let (store, cancel) = (state.store.clone(), state.cancel.clone());
    let resource = t.resource;
    let guard = state.stream_guard();
    tokio::spawn(async move {
        let _guard = guard;
        let run = async {
            for ev in backlog.iter().filter(|e| wanted(e)) {
                tx.send(encoder.event(ev.kind.as_str(), &ev.object))
                    .await
                    .ok()?;
            }
            if send_initial && bookmarks {
                tx.send(encoder.bookmark(store.resource_version(), true))
                    .await
                    .ok()?;
            }
            pump_live(
                &tx,
                live,
                resource,
                &wanted,
                &mut encoder,
                bookmarks,
                &store,
            )
            .await
        };
        let timeout = tokio::time::sleep(timeout.unwrap_or(Duration::MAX));
        tokio::select! {
            _ = run => {}
            _ = timeout => {}
            _ = tx.closed() => {}
            _ = cancel.cancelled() => {}
        }
    });
    Ok(response)
}

/// Forwards live events until the client goes away or falls too far behind (then the watch
/// ends and the client re-lists, as after an apiserver watch-cache overflow).
async fn pump_live(
    tx: &mpsc::Sender<Bytes>,
    mut live: broadcast::Receiver<WatchEvent>,
    resource: Resource,
    wanted: &(impl Fn(&WatchEvent) -> bool + Sync),
    encoder: &mut Encoder,
    bookmarks: bool,
    store: &crate::store::Store,
) -> Option<()> {
    let mut tick = tokio::time::interval(BOOKMARK_INTERVAL);
    tick.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            ev = live.recv() => match ev {
                Ok(ev) if ev.resource == resource && wanted(&ev) => {
                    tx.send(encoder.event(ev.kind.as_str(), &ev.object)).await.ok()?;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return None,
            },
            _ = tick.tick(), if bookmarks => {
                tx.send(encoder.bookmark(store.resource_version(), false)).await.ok()?;
            }
        }
    }
}

// === logs ===

fn logs(
    state: &Arc<State>,
    namespace: Option<&str>,
    pod: &str,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let obj = state
        .store
        .get(Resource::Pods, namespace, pod)
        .ok_or_else(|| not_found(Resource::Pods, pod))?;
    let containers: Vec<String> = obj
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let container = match q.get("container").filter(|c| !c.is_empty()) {
        Some(c) if containers.iter().any(|n| n == c) => c.to_owned(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {pod}"
            )))
        }
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {pod}, choose one of: [{}]",
                containers.join(" ")
            )))
        }
    };
    if q.flag("previous") {
        return Err(ApiError::bad_request(format!(
            "previous terminated container \"{container}\" in pod \"{pod}\" not found"
        )));
    }
    let store = state.store.clone();
    let namespace = namespace.map(str::to_owned);
    let alive = move |pod: &str| {
        store
            .get(Resource::Pods, namespace.as_deref(), pod)
            .is_some()
    };
    Ok(container_log(state, pod, q, alive))
}

/// One container's log as the kubelet serves it (`tailLines`, `timestamps`, `limitBytes`,
/// `follow`): [`LOG_LINES`] lines, then one more every [`LOG_INTERVAL`] while following, until
/// `alive` says the pod is gone, the client leaves or the simulator shuts down. Shared by the
/// API server's `pods/log` and the kubelet mode's `/containerLogs`.
pub(super) fn container_log(
    state: &Arc<State>,
    pod: &str,
    q: &Query,
    alive: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> Response<Body> {
    let timestamps = q.flag("timestamps");
    let pod = pod.to_owned();
    let line = {
        let pod = pod.clone();
        move |n: u64| {
            let text = format!("{pod} line {n}\n");
            if timestamps {
                format!("{} {text}", rfc3339_nano())
            } else {
                text
            }
        }
    };
    let first = match q.get("tailLines").and_then(|t| t.parse::<i64>().ok()) {
        Some(tail) if tail >= 0 => LOG_LINES.saturating_sub(tail.unsigned_abs()) + 1,
        _ => 1,
    };
    let mut initial: String = (first..=LOG_LINES).map(&line).collect();
    if !q.flag("follow") {
        if let Some(limit) = q.get("limitBytes").and_then(|l| l.parse::<usize>().ok()) {
            let mut cut = limit.min(initial.len());
            while !initial.is_char_boundary(cut) {
                cut -= 1;
            }
            initial.truncate(cut);
        }
        return bytes_response(StatusCode::OK, "text/plain", Bytes::from(initial));
    }
    let (tx, response) = streaming_response("text/plain");
    let cancel = state.cancel.clone();
    let guard = state.stream_guard();
    tokio::spawn(async move {
        let _guard = guard;
        let run = async {
            if !initial.is_empty() {
                tx.send(Bytes::from(initial)).await.ok()?;
            }
            let mut tick = tokio::time::interval(LOG_INTERVAL);
            tick.tick().await;
            for n in LOG_LINES + 1.. {
                tick.tick().await;
                // The container's log ends when its pod is gone.
                if !alive(&pod) {
                    return None;
                }
                tx.send(Bytes::from(line(n))).await.ok()?;
            }
            Some(())
        };
        tokio::select! {
            _ = run => {}
            _ = tx.closed() => {}
            _ = cancel.cancelled() => {}
        }
    });
    response
}

/// `2024-05-01T12:00:00.123456789Z`, the form kubelet timestamps log lines with.
fn rfc3339_nano() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = format_rfc3339(i64::try_from(now.as_secs()).unwrap_or(i64::MAX));
    format!("{}.{:09}Z", secs.trim_end_matches('Z'), now.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = |p: &str| Target::parse(&p.split('/').collect::<Vec<_>>());
        assert_eq!(
            t("namespaces/default/pods/web-0/log"),
            Some(Target {
                resource: Resource::Pods,
                namespace: Some("default".into()),
                name: Some("web-0".into()),
                subresource: Some("log".into()),
            })
        );
        assert_eq!(
            t("namespaces").map(|t| t.resource),
            Some(Resource::Namespaces)
        );
        assert_eq!(
            t("namespaces/kube-system").and_then(|t| t.name),
            Some("kube-system".into())
        );
        assert_eq!(
            t("pods").map(|t| (t.resource, t.namespace)),
            Some((Resource::Pods, None))
        );
        assert_eq!(
            t("namespaces/x/configmaps").map(|t| t.resource),
            Some(Resource::ConfigMaps)
        );
        assert!(t("namespaces/x/secrets")
            .is_some_and(|t| t.resource == Resource::Namespaces
                && t.subresource.as_deref() == Some("secrets")));
        assert_eq!(t("namespaces/x/pods/a/b/c"), None);
        assert_eq!(t("secrets"), None);
    }

    #[test]
    fn human_durations() {
        for (secs, want) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (130, "2m10s"),
            (600, "10m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
            (3 * 86_400, "3d"),
            (3 * 86_400 + 3600, "3d1h"),
            (30 * 86_400, "30d"),
            (3 * 365 * 86_400, "3y"),
            (3 * 365 * 86_400 + 86_400, "3y1d"),
            (10 * 365 * 86_400, "10y"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = continue_token(42, "default/web-0");
        assert_eq!(continue_start(&token).unwrap(), "default/web-0");
        assert!(continue_start("!!!").is_err());
        assert!(continue_start(&URL_SAFE_NO_PAD.encode("{}")).is_err());
    }

    #[test]
    fn table_rows() {
        let store = crate::store::Store::seeded("alpha");
        let pod = store.get(Resource::Pods, Some("default"), "web-0").unwrap();
        let row = table_row(Resource::Pods, &pod, "v1", Include::Metadata);
        assert_eq!(row["cells"][0], "web-0");
        assert_eq!(row["cells"][1], "1/1");
        assert_eq!(row["cells"][2], "Running");
        assert_eq!(row["cells"][3], 0);
        assert_eq!(row["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(row["object"]["metadata"]["name"], "web-0");
        let t = table(Resource::Pods, "v1", vec![row], json!({}), true);
        assert_eq!(t["columnDefinitions"].as_array().map(Vec::len), Some(9));
        assert!(
            table(Resource::Pods, "v1", vec![], json!({}), false)["columnDefinitions"].is_null()
        );
        let ns = store.get(Resource::Namespaces, None, "default").unwrap();
        let row = table_row(Resource::Namespaces, &ns, "v1beta1", Include::None);
        assert_eq!(row["cells"], json!(["default", "Active", row["cells"][2]]));
        assert!(row.get("object").is_none());
    }
}
