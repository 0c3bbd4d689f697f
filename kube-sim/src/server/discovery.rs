//! Static documents: `/version`, health checks, discovery (legacy and aggregated v2/v2beta1)
//! and OpenAPI v2/v3. Built once per simulator from the resource table in [`crate::store`].
//!
//! Aggregated discovery follows client-go (`discovery/aggregated_discovery.go`): the client
//! sends `Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,…` and
//! decides how to parse the body from the response `Content-Type` alone, so that header must
//! name the negotiated version exactly. Every resource and subresource needs `responseKind`,
//! or client-go drops the group version.
//!
//! The OpenAPI documents themselves come from [`super::openapi`].

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::openapi::{self, Flavor};
use super::{accept_header, bytes_response, json_bytes, ApiError};
use crate::store::Resource;
use crate::Body;

const AUTH_GROUP: &str = "authentication.k8s.io";
const AUTH_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
const AGGREGATED_VERSIONS: [&str; 2] = ["v2", "v2beta1"];

/// The documents, pre-serialised.
pub(super) struct Documents {
    version: Bytes,
    api_versions: Bytes,
    core_resources: Bytes,
    group_list: Bytes,
    group: Bytes,
    auth_resources: BTreeMap<&'static str, Bytes>,
    /// (`/api` or `/apis`, discovery version) → body.
    aggregated: BTreeMap<(&'static str, &'static str), Bytes>,
    openapi_v2: Bytes,
    openapi_v2_pb: Bytes,
    openapi_v3_root: Bytes,
    /// `api/v1`, `apis/authentication.k8s.io/v1`, … → (body, hash).
    openapi_v3: BTreeMap<String, (Bytes, String)>,
}

impl Documents {
    pub(super) fn new(git_version: &str) -> Self {
        let mut aggregated = BTreeMap::new();
        for v in AGGREGATED_VERSIONS {
            aggregated.insert(
                ("api", v),
                json_bytes(&aggregated_list(v, vec![core_group_discovery()])),
            );
            aggregated.insert(
                ("apis", v),
                json_bytes(&aggregated_list(v, vec![auth_group_discovery()])),
            );
        }
        let mut openapi_v3 = BTreeMap::new();
        let mut root = Map::new();
        let mut add = |path: String, doc: Value| {
            let body = json_bytes(&doc);
            let hash =
                hex_upper(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, &body).as_ref());
            root.insert(
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
            );
            openapi_v3.insert(path, (body, hash));
        };
        add("api/v1".into(), openapi::core_v1(Flavor::V3, git_version));
        for v in AUTH_VERSIONS {
            add(
                format!("apis/{AUTH_GROUP}/{v}"),
                openapi::auth(Flavor::V3, git_version, v),
            );
        }
        let openapi_v2 = openapi::core_v1(Flavor::V2, git_version);
        Self {
            version: json_bytes(&version_info(git_version)),
            api_versions: json_bytes(&json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "10.224.0.4:443"}],
            })),
            core_resources: json_bytes(&resource_list("v1", core_resources_legacy())),
            group_list: json_bytes(
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [auth_group()]}),
            ),
            group: json_bytes(&{
                let mut g = auth_group();
                g["kind"] = json!("APIGroup");
                g["apiVersion"] = json!("v1");
                g
            }),
            auth_resources: AUTH_VERSIONS
                .into_iter()
                .map(|v| {
                    (
                        v,
                        json_bytes(&resource_list(
                            &format!("{AUTH_GROUP}/{v}"),
                            auth_resources_legacy(),
                        )),
                    )
                })
                .collect(),
            aggregated,
            openapi_v2: json_bytes(&openapi_v2),
            openapi_v2_pb: Bytes::from(openapi::v2_protobuf(&openapi_v2)),
            openapi_v3_root: json_bytes(&json!({"paths": root})),
            openapi_v3,
        }
    }
}

/// Answers discovery, OpenAPI, `/version` and health paths; 404 for anything else.
pub(super) fn serve(
    docs: &Documents,
    req: &Request<Incoming>,
    segments: &[&str],
) -> Result<Response<Body>, ApiError> {
    let known = matches!(
        segments,
        [] | ["version"]
            | ["healthz" | "livez" | "readyz", ..]
            | ["api"]
            | ["api", "v1"]
            | ["apis"]
            | ["apis", AUTH_GROUP]
            | ["apis", AUTH_GROUP, "v1" | "v1beta1"]
            | ["openapi", "v2" | "v3", ..]
    );
    if !known {
        return Err(ApiError::path_not_found());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::method_not_allowed());
    }
    let json = |bytes: &Bytes| {
        Ok(bytes_response(
            StatusCode::OK,
            "application/json",
            bytes.clone(),
        ))
    };
    match segments {
        [] => Ok(bytes_response(
            StatusCode::OK,
            "application/json",
            json_bytes(&json!({"paths": [
                "/api", "/api/v1", "/apis", "/apis/", "/apis/authentication.k8s.io",
                "/apis/authentication.k8s.io/v1", "/apis/authentication.k8s.io/v1beta1",
                "/healthz", "/livez", "/openapi/v2", "/openapi/v3", "/openapi/v3/", "/readyz", "/version",
            ]})),
        )),
        ["version"] => json(&docs.version),
        ["healthz" | "livez" | "readyz", ..] => Ok(bytes_response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"ok"),
        )),
        [root @ ("api" | "apis")] => {
            let legacy = if *root == "api" {
                &docs.api_versions
            } else {
                &docs.group_list
            };
            match negotiate(&accept_header(req)).ok_or_else(ApiError::not_acceptable)? {
                None => json(legacy),
                Some(v) => {
                    let key = (if *root == "api" { "api" } else { "apis" }, v);
                    let body = docs.aggregated.get(&key).cloned().unwrap_or_default();
                    let content_type = format!(
                        "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"
                    );
                    Ok(with_etag(req, &content_type, body))
                }
            }
        }
        ["api", "v1"] => json(&docs.core_resources),
        ["apis", _] => json(&docs.group),
        ["apis", _, v] => docs
            .auth_resources
            .get(v)
            .map_or_else(|| Err(ApiError::path_not_found()), json),
        ["openapi", "v2"] => {
            // client-go asks for protobuf only; other clients for JSON.
            for range in accept_header(req) {
                if range
                    .essence
                    .starts_with("application/com.github.proto-openapi.spec.v2")
                {
                    // Answered without the `@`, which Go's mime parser rejects in a Content-Type.
                    let content_type = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";
                    return Ok(with_etag(req, content_type, docs.openapi_v2_pb.clone()));
                }
                if range.accepts_json() {
                    return Ok(with_etag(req, "application/json", docs.openapi_v2.clone()));
                }
            }
            Err(ApiError::not_acceptable())
        }
        ["openapi", "v3"] => json(&docs.openapi_v3_root),
        ["openapi", "v3", rest @ ..] => {
            let path = rest.join("/");
            let (body, hash) = docs
                .openapi_v3
                .get(&path)
                .ok_or_else(ApiError::path_not_found)?;
            if !accept_header(req).iter().any(|r| r.accepts_json()) {
                return Err(ApiError::not_acceptable());
            }
            let asked = super::Query::parse(req.uri().query())
                .get("hash")
                .map(str::to_owned);
            match asked {
                // An outdated hash is redirected to the current document, like kube-apiserver.
                Some(h) if h != *hash => {
                    let mut resp =
                        bytes_response(StatusCode::MOVED_PERMANENTLY, "text/plain", Bytes::new());
                    if let Ok(loc) =
                        HeaderValue::from_str(&format!("/openapi/v3/{path}?hash={hash}"))
                    {
                        resp.headers_mut().insert(header::LOCATION, loc);
                    }
                    Ok(resp)
                }
                Some(_) => {
                    let mut resp = with_etag(req, "application/json", body.clone());
                    resp.headers_mut().insert(
                        header::CACHE_CONTROL,
                        HeaderValue::from_static("public, immutable"),
                    );
                    Ok(resp)
                }
                None => Ok(with_etag(req, "application/json", body.clone())),
            }
        }
        _ => Err(ApiError::path_not_found()),
    }
}

/// The first acceptable `Accept` entry decides: `Some(Some(v))` for aggregated discovery in
/// version `v`, `Some(None)` for the legacy documents, `None` when nothing acceptable was
/// offered (406).
fn negotiate(accept: &[super::MediaRange]) -> Option<Option<&'static str>> {
    for range in accept.iter().filter(|r| r.accepts_json()) {
        match (range.param("g"), range.param("v"), range.param("as")) {
            (Some("apidiscovery.k8s.io"), Some(v), Some("APIGroupDiscoveryList")) => {
                if let Some(v) = AGGREGATED_VERSIONS.into_iter().find(|known| *known == v) {
                    return Some(Some(v));
                }
            }
            (_, _, None) => return Some(None),
            _ => {}
        }
    }
    None
}

/// A cacheable document: strong ETag, `If-None-Match` → 304, `Vary: Accept` (the same path has
/// several representations). kubectl keeps discovery in an HTTP cache and revalidates.
fn with_etag(req: &Request<Incoming>, content_type: &str, body: Bytes) -> Response<Body> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
    let etag = format!("\"{}\"", hex_upper(digest.as_ref()));
    let not_modified = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag || tag.trim() == "*");
    let mut resp = if not_modified {
        bytes_response(StatusCode::NOT_MODIFIED, content_type, Bytes::new())
    } else {
        bytes_response(StatusCode::OK, content_type, body)
    };
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, etag);
    }
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    resp
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn version_info(git_version: &str) -> Value {
    let numbers: Vec<&str> = git_version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .collect();
    let commit: String = hex_upper(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, git_version.as_bytes()).as_ref(),
    )
    .to_lowercase()
    .chars()
    .take(40)
    .collect();
    json!({
        "major": numbers.first().copied().unwrap_or("1"),
        "minor": numbers.get(1).copied().unwrap_or("0"),
        "gitVersion": git_version,
        "gitCommit": commit,
        "gitTreeState": "clean",
        "buildDate": "2024-10-22T20:28:14Z",
        "goVersion": "go1.22.8",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

// === Discovery documents ===

struct Sub {
    name: &'static str,
    kind: &'static str,
    verbs: &'static [&'static str],
}

/// The pod subresources the simulator serves.
const POD_SUBRESOURCES: [Sub; 4] = [
    Sub {
        name: "attach",
        kind: "PodAttachOptions",
        verbs: &["create", "get"],
    },
    Sub {
        name: "exec",
        kind: "PodExecOptions",
        verbs: &["create", "get"],
    },
    Sub {
        name: "log",
        kind: "Pod",
        verbs: &["get"],
    },
    Sub {
        name: "portforward",
        kind: "PodPortForwardOptions",
        verbs: &["create", "get"],
    },
];

fn subresources(res: Resource) -> &'static [Sub] {
    if res == Resource::Pods {
        &POD_SUBRESOURCES
    } else {
        &[]
    }
}

fn resource_list(group_version: &str, resources: Vec<Value>) -> Value {
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

fn core_resources_legacy() -> Vec<Value> {
    let mut out = Vec::new();
    for res in Resource::ALL {
        let mut r = json!({
            "name": res.plural(),
            "singularName": res.singular(),
            "namespaced": res.namespaced(),
            "kind": res.kind(),
            "verbs": res.verbs(),
            "shortNames": res.short_names(),
        });
        if !res.categories().is_empty() {
            r["categories"] = json!(res.categories());
        }
        out.push(r);
        for sub in subresources(res) {
            out.push(json!({
                "name": format!("{}/{}", res.plural(), sub.name),
                "singularName": "",
                "namespaced": res.namespaced(),
                "kind": sub.kind,
                "verbs": sub.verbs,
            }));
        }
    }
    out
}

fn auth_resources_legacy() -> Vec<Value> {
    vec![json!({
        "name": "selfsubjectreviews",
        "singularName": "selfsubjectreview",
        "namespaced": false,
        "kind": "SelfSubjectReview",
        "verbs": ["create"],
    })]
}

fn auth_group() -> Value {
    let versions: Vec<Value> = AUTH_VERSIONS
        .iter()
        .map(|v| json!({"groupVersion": format!("{AUTH_GROUP}/{v}"), "version": v}))
        .collect();
    json!({"name": AUTH_GROUP, "versions": versions, "preferredVersion": versions[0]})
}

fn aggregated_list(version: &str, items: Vec<Value>) -> Value {
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

fn core_group_discovery() -> Value {
    let resources: Vec<Value> = Resource::ALL
        .into_iter()
        .map(|res| {
            let kind = |k: &str| json!({"group": "", "version": "v1", "kind": k});
            let mut r = json!({
                "resource": res.plural(),
                "responseKind": kind(res.kind()),
                "scope": if res.namespaced() { "Namespaced" } else { "Cluster" },
                "singularResource": res.singular(),
                "verbs": res.verbs(),
                "shortNames": res.short_names(),
            });
            if !res.categories().is_empty() {
                r["categories"] = json!(res.categories());
            }
            let subs: Vec<Value> = subresources(res)
                .iter()
                .map(|s| json!({"subresource": s.name, "responseKind": kind(s.kind), "verbs": s.verbs}))
                .collect();
            if !subs.is_empty() {
                r["subresources"] = json!(subs);
            }
            r
        })
        .collect();
    json!({
        "metadata": {"creationTimestamp": null},
        "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}],
    })
}

fn auth_group_discovery() -> Value {
    let versions: Vec<Value> = AUTH_VERSIONS
        .iter()
        .map(|v| {
            json!({
                "version": v,
                "resources": [{
                    "resource": "selfsubjectreviews",
                    "responseKind": {"group": AUTH_GROUP, "version": v, "kind": "SelfSubjectReview"},
                    "scope": "Cluster",
                    "singularResource": "selfsubjectreview",
                    "verbs": ["create"],
                }],
                "freshness": "Current",
            })
        })
        .collect();
    json!({"metadata": {"name": AUTH_GROUP, "creationTimestamp": null}, "versions": versions})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregated_discovery_has_response_kinds_everywhere() {
        let docs = Documents::new("v1.31.2");
        for v in AGGREGATED_VERSIONS {
            for root in ["api", "apis"] {
                let doc: Value = serde_json::from_slice(&docs.aggregated[&(root, v)]).unwrap();
                assert_eq!(doc["apiVersion"], format!("apidiscovery.k8s.io/{v}"));
                for item in doc["items"].as_array().unwrap() {
                    for ver in item["versions"].as_array().unwrap() {
                        for r in ver["resources"].as_array().unwrap() {
                            assert!(r["responseKind"]["kind"].is_string(), "{r}");
                            for s in r["subresources"].as_array().into_iter().flatten() {
                                assert!(s["responseKind"]["kind"].is_string(), "{s}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn discovery_negotiation() {
        let parse = super::super::MediaRange::parse_list;
        let kubectl_130 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(negotiate(&parse(kubectl_130)), Some(Some("v2")));
        let kubectl_127 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(negotiate(&parse(kubectl_127)), Some(Some("v2beta1")));
        assert_eq!(negotiate(&parse("application/json")), Some(None));
        assert_eq!(negotiate(&parse("*/*")), Some(None));
        let future =
            "application/json;g=apidiscovery.k8s.io;v=v3;as=APIGroupDiscoveryList,application/json";
        assert_eq!(negotiate(&parse(future)), Some(None));
        assert_eq!(
            negotiate(&parse("application/vnd.kubernetes.protobuf")),
            None
        );
    }

    #[test]
    fn openapi_v3_patch_operations_carry_field_validation() {
        let docs = Documents::new("v1.31.2");
        let (body, hash) = &docs.openapi_v3["api/v1"];
        assert_eq!(hash.len(), 128);
        let doc: Value = serde_json::from_slice(body).unwrap();
        for kind in ["Pod", "ConfigMap", "Namespace"] {
            let found = doc["paths"].as_object().unwrap().values().any(|p| {
                p["patch"]["x-kubernetes-group-version-kind"]["kind"] == kind
                    && p["patch"]["parameters"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|q| q["name"] == "fieldValidation" && q["in"] == "query")
            });
            assert!(found, "{kind}");
        }
        let root: Value = serde_json::from_slice(&docs.openapi_v3_root).unwrap();
        assert_eq!(
            root["paths"]["api/v1"]["serverRelativeURL"],
            format!("/openapi/v3/api/v1?hash={hash}")
        );
        let v2: Value = serde_json::from_slice(&docs.openapi_v2).unwrap();
        assert_eq!(v2["swagger"], "2.0");
        assert!(
            v2["paths"]["/apis/authentication.k8s.io/v1/selfsubjectreviews"]["post"].is_object()
        );
    }

    #[test]
    fn version_document() {
        let v = version_info("v1.29.7");
        assert_eq!(
            (v["major"].as_str(), v["minor"].as_str()),
            (Some("1"), Some("29"))
        );
        assert_eq!(v["gitCommit"].as_str().unwrap().len(), 40);
    }
}
