//! Abridged OpenAPI documents: every path and operation the simulator serves, with the
//! vendor extensions kubectl reads, and short schemas (enough for `kubectl explain` of the
//! top-level fields).
//!
//! What kubectl needs from them:
//! - `kubectl apply` (client-side) first asks whether PATCH of the kind accepts the
//!   `fieldValidation` query parameter; if so, validation is left to the server. kubectl ≥ 1.29
//!   asks the v3 document of the group version; 1.27–1.28 ask the v2 document, which client-go
//!   only accepts as protobuf (gnostic `openapi.v2.Document`), hence [`v2_protobuf`].
//! - The v3 PATCH request bodies deliberately omit `application/strategic-merge-patch+json`,
//!   and the v2 protobuf carries no definitions, so kubectl computes strategic merge patches
//!   from its compiled-in types (exact for Pod/ConfigMap/Namespace) instead of from these
//!   abridged schemas, which would make it print warnings.

use serde_json::{json, Map, Value};

use crate::store::Resource;

const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";

struct Builder {
    flavor: Flavor,
    paths: Map<String, Value>,
}

impl Builder {
    fn reference(&self, name: &str) -> Value {
        match self.flavor {
            Flavor::V2 => json!({"$ref": format!("#/definitions/{name}")}),
            Flavor::V3 => json!({"$ref": format!("#/components/schemas/{name}")}),
        }
    }

    fn param(&self, name: &str, location: &str, ty: &str, description: &str) -> Value {
        let mut p = json!({"name": name, "in": location, "description": description});
        if location == "path" {
            p["required"] = json!(true);
        }
        match self.flavor {
            Flavor::V2 => p["type"] = json!(ty),
            Flavor::V3 => p["schema"] = json!({"type": ty, "uniqueItems": true}),
        }
        p
    }

    fn query(&self, names: &[&str]) -> Vec<Value> {
        names
            .iter()
            .map(|n| {
                let ty = match *n {
                    "limit" | "timeoutSeconds" | "gracePeriodSeconds" => "integer",
                    "watch" | "allowWatchBookmarks" | "force" | "sendInitialEvents" => "boolean",
                    _ => "string",
                };
                self.param(n, "query", ty, &format!("The standard `{n}` parameter."))
            })
            .collect()
    }

    /// One operation; `body` is (schema name, accepted media types).
    #[allow(clippy::too_many_arguments)]
    fn operation(
        &self,
        op_id: String,
        action: &str,
        gvk: &Value,
        params: Vec<Value>,
        body: Option<(&str, &[&str])>,
        response: &str,
        extra_codes: &[&str],
    ) -> Value {
        let mut op = json!({
            "description": format!("{action} {}", gvk["kind"].as_str().unwrap_or_default()),
            "operationId": op_id,
            "tags": ["core_v1"],
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
        });
        let mut params = params;
        let mut responses = Map::new();
        for code in std::iter::once("200").chain(extra_codes.iter().copied()) {
            let r = match self.flavor {
                Flavor::V2 => json!({"description": "OK", "schema": self.reference(response)}),
                Flavor::V3 => {
                    json!({"description": "OK", "content": {"application/json": {"schema": self.reference(response)}}})
                }
            };
            responses.insert(code.into(), r);
        }
        responses.insert("401".into(), json!({"description": "Unauthorized"}));
        op["responses"] = Value::Object(responses);
        if let Some((schema, types)) = body {
            match self.flavor {
                Flavor::V2 => {
                    params.push(json!({"name": "body", "in": "body", "required": true, "schema": self.reference(schema)}));
                    op["consumes"] = json!(types);
                }
                Flavor::V3 => {
                    let content: Map<String, Value> = types
                        .iter()
                        .map(|t| ((*t).to_owned(), json!({"schema": self.reference(schema)})))
                        .collect();
                    op["requestBody"] = json!({"content": content, "required": true});
                }
            }
        }
        if self.flavor == Flavor::V2 {
            op["produces"] = json!(["application/json"]);
            op["schemes"] = json!(["https"]);
        }
        op["parameters"] = json!(params);
        op
    }

    fn resource(&mut self, res: Resource) {
        let kind = res.kind();
        let gvk = json!({"group": "", "version": "v1", "kind": kind});
        let obj = format!("io.k8s.api.core.v1.{kind}");
        let list = format!("io.k8s.api.core.v1.{kind}List");
        let scope = if res.namespaced() { "Namespaced" } else { "" };
        let ns_param = self.param(
            "namespace",
            "path",
            "string",
            "object name and auth scope, such as for teams and projects",
        );
        let name_param = self.param("name", "path", "string", &format!("name of the {kind}"));
        let (collection, item) = if res.namespaced() {
            (
                format!("/api/v1/namespaces/{{namespace}}/{}", res.plural()),
                format!("/api/v1/namespaces/{{namespace}}/{}/{{name}}", res.plural()),
            )
        } else {
            (
                format!("/api/v1/{}", res.plural()),
                format!("/api/v1/{}/{{name}}", res.plural()),
            )
        };
        let list_params = [
            "allowWatchBookmarks",
            "continue",
            "fieldSelector",
            "labelSelector",
            "limit",
            "resourceVersion",
            "resourceVersionMatch",
            "sendInitialEvents",
            "timeoutSeconds",
            "watch",
        ];
        let write_params = ["dryRun", "fieldManager", "fieldValidation"];
        let json_body: &[&str] = &["application/json"];
        let mut coll = Map::new();
        coll.insert(
            "get".into(),
            self.operation(
                format!("listCoreV1{scope}{kind}"),
                "list",
                &gvk,
                self.query(&list_params),
                None,
                &list,
                &[],
            ),
        );
        coll.insert(
            "post".into(),
            self.operation(
                format!("createCoreV1{scope}{kind}"),
                "post",
                &gvk,
                self.query(&write_params),
                Some((&obj, json_body)),
                &obj,
                &["201", "202"],
            ),
        );
        if res != Resource::Namespaces {
            coll.insert(
                "delete".into(),
                self.operation(
                    format!("deleteCoreV1Collection{scope}{kind}"),
                    "deletecollection",
                    &gvk,
                    self.query(&["dryRun", "labelSelector", "fieldSelector"]),
                    None,
                    &format!("{META}.Status"),
                    &[],
                ),
            );
        }
        let mut common = vec![self.param(
            "pretty",
            "query",
            "string",
            "If 'true', then the output is pretty printed.",
        )];
        if res.namespaced() {
            common.insert(0, ns_param.clone());
        }
        coll.insert("parameters".into(), json!(common));
        self.paths.insert(collection, Value::Object(coll));

        // Deliberately no strategic-merge-patch here: see the module documentation above.
        let patch_types: &[&str] = match self.flavor {
            Flavor::V3 => &[
                "application/json-patch+json",
                "application/merge-patch+json",
            ],
            Flavor::V2 => &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ],
        };
        let mut one = Map::new();
        one.insert(
            "get".into(),
            self.operation(
                format!("readCoreV1{scope}{kind}"),
                "get",
                &gvk,
                Vec::new(),
                None,
                &obj,
                &[],
            ),
        );
        one.insert(
            "put".into(),
            self.operation(
                format!("replaceCoreV1{scope}{kind}"),
                "put",
                &gvk,
                self.query(&write_params),
                Some((&obj, json_body)),
                &obj,
                &["201"],
            ),
        );
        one.insert(
            "patch".into(),
            self.operation(
                format!("patchCoreV1{scope}{kind}"),
                "patch",
                &gvk,
                self.query(&["dryRun", "fieldManager", "fieldValidation", "force"]),
                Some((&format!("{META}.Patch"), patch_types)),
                &obj,
                &["201"],
            ),
        );
        one.insert(
            "delete".into(),
            self.operation(
                format!("deleteCoreV1{scope}{kind}"),
                "delete",
                &gvk,
                self.query(&["dryRun", "gracePeriodSeconds", "propagationPolicy"]),
                None,
                &obj,
                &["202"],
            ),
        );
        let mut common = vec![name_param];
        if res.namespaced() {
            common.push(ns_param);
        }
        common.push(self.param(
            "pretty",
            "query",
            "string",
            "If 'true', then the output is pretty printed.",
        ));
        one.insert("parameters".into(), json!(common));
        self.paths.insert(item, Value::Object(one));

        if res.namespaced() {
            let mut all = Map::new();
            all.insert(
                "get".into(),
                self.operation(
                    format!("listCoreV1{kind}ForAllNamespaces"),
                    "list",
                    &gvk,
                    self.query(&list_params),
                    None,
                    &list,
                    &[],
                ),
            );
            self.paths
                .insert(format!("/api/v1/{}", res.plural()), Value::Object(all));
        }
    }
}

fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!([{"group": group, "version": version, "kind": kind}])
}

fn string(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

fn string_map(description: &str) -> Value {
    json!({"type": "object", "additionalProperties": {"type": "string"}, "description": description})
}

fn schemas(b: &Builder) -> Map<String, Value> {
    let r = |n: &str| b.reference(n);
    let obj_props = |extra: Value| {
        let mut props = json!({
            "apiVersion": string("APIVersion defines the versioned schema of this representation of an object."),
            "kind": string("Kind is a string value representing the REST resource this object represents."),
            "metadata": r(&format!("{META}.ObjectMeta")),
        });
        if let (Some(p), Value::Object(e)) = (props.as_object_mut(), extra) {
            p.extend(e);
        }
        props
    };
    let list = |item: &str, kind: &str| {
        json!({
            "description": format!("{kind} is a list of {item}s."),
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": string("APIVersion defines the versioned schema of this representation of an object."),
                "items": {"type": "array", "items": r(&format!("io.k8s.api.core.v1.{item}"))},
                "kind": string("Kind is a string value representing the REST resource this object represents."),
                "metadata": r(&format!("{META}.ListMeta")),
            },
            "x-kubernetes-group-version-kind": gvk("", "v1", kind),
        })
    };
    let mut s = Map::new();
    s.insert(format!("{META}.ObjectMeta"), json!({
        "description": "ObjectMeta is metadata that all persisted resources must have.",
        "type": "object",
        "properties": {
            "annotations": string_map("Annotations is an unstructured key value map."),
            "creationTimestamp": {"type": "string", "format": "date-time", "description": "When this object was created."},
            "deletionTimestamp": {"type": "string", "format": "date-time", "description": "When this object will be deleted."},
            "finalizers": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set", "x-kubernetes-patch-strategy": "merge", "description": "Finalizers that must be empty before the object is deleted."},
            "generateName": string("Prefix used to generate a unique name if name is not provided."),
            "labels": string_map("Map of string keys and values that can be used to organize and categorize objects."),
            "name": string("Name must be unique within a namespace."),
            "namespace": string("Namespace defines the space within which each name must be unique."),
            "ownerReferences": {"type": "array", "items": {"type": "object"}, "x-kubernetes-patch-merge-key": "uid", "x-kubernetes-patch-strategy": "merge", "description": "Objects depended by this object."},
            "resourceVersion": string("An opaque value that represents the internal version of this object."),
            "uid": string("UID is the unique in time and space value for this object."),
        },
    }));
    s.insert(format!("{META}.ListMeta"), json!({
        "description": "ListMeta describes metadata that synthetic resources must have.",
        "type": "object",
        "properties": {
            "continue": string("Set when the list is incomplete; pass it back to get the next page."),
            "remainingItemCount": {"type": "integer", "format": "int64"},
            "resourceVersion": string("The version of the list."),
        },
    }));
    s.insert(format!("{META}.Patch"), json!({"description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.", "type": "object"}));
    s.insert(format!("{META}.Status"), json!({
        "description": "Status is a return value for calls that don't return other objects.",
        "type": "object",
        "properties": {
            "apiVersion": string("APIVersion"), "code": {"type": "integer", "format": "int32"},
            "details": {"type": "object"}, "kind": string("Kind"), "message": string("A human-readable description of the status of this operation."),
            "metadata": r(&format!("{META}.ListMeta")), "reason": string("A machine-readable description of why this operation is in the Failure status."),
            "status": string("Status of the operation: Success or Failure."),
        },
        "x-kubernetes-group-version-kind": gvk("", "v1", "Status"),
    }));
    s.insert("io.k8s.api.core.v1.ConfigMap".into(), json!({
        "description": "ConfigMap holds configuration data for pods to consume.",
        "type": "object",
        "properties": obj_props(json!({
            "binaryData": {"type": "object", "additionalProperties": {"type": "string", "format": "byte"}, "description": "Binary data, base64-encoded."},
            "data": string_map("Data contains the configuration data."),
            "immutable": {"type": "boolean", "description": "If true, the data cannot be updated."},
        })),
        "x-kubernetes-group-version-kind": gvk("", "v1", "ConfigMap"),
    }));
    s.insert("io.k8s.api.core.v1.Namespace".into(), json!({
        "description": "Namespace provides a scope for Names.",
        "type": "object",
        "properties": obj_props(json!({
            "spec": {"type": "object", "description": "Spec defines the behavior of the Namespace.", "properties": {"finalizers": {"type": "array", "items": {"type": "string"}}}},
            "status": {"type": "object", "description": "Status describes the current status of a Namespace.", "properties": {"phase": string("Phase is the current lifecycle phase of the namespace.")}},
        })),
        "x-kubernetes-group-version-kind": gvk("", "v1", "Namespace"),
    }));
    s.insert("io.k8s.api.core.v1.Container".into(), json!({
        "description": "A single application container that you want to run within a pod.",
        "type": "object",
        "required": ["name"],
        "properties": {
            "args": {"type": "array", "items": {"type": "string"}},
            "command": {"type": "array", "items": {"type": "string"}},
            "env": {"type": "array", "items": {"type": "object"}, "x-kubernetes-patch-merge-key": "name", "x-kubernetes-patch-strategy": "merge"},
            "image": string("Container image name."),
            "imagePullPolicy": string("Image pull policy."),
            "name": string("Name of the container specified as a DNS_LABEL."),
            "ports": {"type": "array", "items": {"type": "object"}, "x-kubernetes-patch-merge-key": "containerPort", "x-kubernetes-patch-strategy": "merge"},
            "resources": {"type": "object"},
            "stdin": {"type": "boolean"},
            "tty": {"type": "boolean"},
            "volumeMounts": {"type": "array", "items": {"type": "object"}, "x-kubernetes-patch-merge-key": "mountPath", "x-kubernetes-patch-strategy": "merge"},
            "workingDir": string("Container's working directory."),
        },
    }));
    s.insert("io.k8s.api.core.v1.Pod".into(), json!({
        "description": "Pod is a collection of containers that can run on a host.",
        "type": "object",
        "properties": obj_props(json!({
            "spec": {
                "type": "object",
                "description": "Specification of the desired behavior of the pod.",
                "required": ["containers"],
                "properties": {
                    "containers": {"type": "array", "items": r("io.k8s.api.core.v1.Container"), "x-kubernetes-patch-merge-key": "name", "x-kubernetes-patch-strategy": "merge"},
                    "initContainers": {"type": "array", "items": r("io.k8s.api.core.v1.Container"), "x-kubernetes-patch-merge-key": "name", "x-kubernetes-patch-strategy": "merge"},
                    "nodeName": string("The node this pod is scheduled to."),
                    "restartPolicy": string("Restart policy for all containers within the pod."),
                    "serviceAccountName": string("The name of the ServiceAccount to use to run this pod."),
                    "volumes": {"type": "array", "items": {"type": "object"}, "x-kubernetes-patch-merge-key": "name", "x-kubernetes-patch-strategy": "merge,retainKeys"},
                },
            },
            "status": {
                "type": "object",
                "description": "Most recently observed status of the pod.",
                "properties": {
                    "containerStatuses": {"type": "array", "items": {"type": "object"}},
                    "phase": string("The phase of a Pod: Pending, Running, Succeeded, Failed or Unknown."),
                    "podIP": string("IP address allocated to the pod."),
                    "startTime": {"type": "string", "format": "date-time"},
                },
            },
        })),
        "x-kubernetes-group-version-kind": gvk("", "v1", "Pod"),
    }));
    for (item, kind) in [
        ("ConfigMap", "ConfigMapList"),
        ("Namespace", "NamespaceList"),
        ("Pod", "PodList"),
    ] {
        s.insert(format!("io.k8s.api.core.v1.{kind}"), list(item, kind));
    }
    s
}

fn document(
    flavor: Flavor,
    git_version: &str,
    paths: Map<String, Value>,
    schemas: Map<String, Value>,
) -> Value {
    let info = json!({"title": "Kubernetes", "version": git_version});
    match flavor {
        Flavor::V2 => {
            json!({"swagger": "2.0", "info": info, "paths": paths, "definitions": schemas})
        }
        Flavor::V3 => json!({
            "openapi": "3.0.0",
            "info": info,
            "paths": paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {"BearerToken": {"type": "apiKey", "description": "Bearer Token authentication", "name": "authorization", "in": "header"}},
            },
        }),
    }
}

pub(super) fn core_v1(flavor: Flavor, git_version: &str) -> Value {
    let mut b = Builder {
        flavor,
        paths: Map::new(),
    };
    for res in Resource::ALL {
        b.resource(res);
    }
    let log = b.operation(
        "readCoreV1NamespacedPodLog".into(),
        "get",
        &json!({"group": "", "version": "v1", "kind": "Pod"}),
        b.query(&[
            "container",
            "follow",
            "limitBytes",
            "previous",
            "sinceSeconds",
            "tailLines",
            "timestamps",
        ]),
        None,
        "io.k8s.api.core.v1.Pod",
        &[],
    );
    b.paths.insert(
        "/api/v1/namespaces/{namespace}/pods/{name}/log".into(),
        json!({"get": log}),
    );
    let schemas = schemas(&b);
    let mut doc = document(flavor, git_version, std::mem::take(&mut b.paths), schemas);
    if flavor == Flavor::V2 {
        // v2 is one document for the whole server.
        let mut auth = auth(Flavor::V2, git_version, "v1");
        if let (Some(paths), Some(more)) =
            (doc["paths"].as_object_mut(), auth["paths"].as_object_mut())
        {
            paths.append(more);
        }
        if let (Some(defs), Some(more)) = (
            doc["definitions"].as_object_mut(),
            auth["definitions"].as_object_mut(),
        ) {
            defs.append(more);
        }
    }
    doc
}

pub(super) fn auth(flavor: Flavor, git_version: &str, version: &str) -> Value {
    let group = "authentication.k8s.io";
    let b = Builder {
        flavor,
        paths: Map::new(),
    };
    let name = format!("io.k8s.api.authentication.{version}.SelfSubjectReview");
    let gvk_one = json!({"group": group, "version": version, "kind": "SelfSubjectReview"});
    let cap = |s: &str| {
        s.get(..1).map(str::to_uppercase).unwrap_or_default() + s.get(1..).unwrap_or_default()
    };
    let mut post = b.operation(
        format!("createAuthentication{}SelfSubjectReview", cap(version)),
        "post",
        &gvk_one,
        b.query(&["dryRun", "fieldManager", "fieldValidation"]),
        Some((&name, &["application/json"])),
        &name,
        &["201", "202"],
    );
    post["tags"] = json!([format!("authentication_{version}")]);
    let mut paths = Map::new();
    paths.insert(
        format!("/apis/{group}/{version}/selfsubjectreviews"),
        json!({"post": post}),
    );
    let mut schemas = Map::new();
    schemas.insert(name, json!({
        "description": "SelfSubjectReview contains the user information that the kube-apiserver has about the user making this request.",
        "type": "object",
        "properties": {
            "apiVersion": string("APIVersion"),
            "kind": string("Kind"),
            "metadata": b.reference(&format!("{META}.ObjectMeta")),
            "status": {"type": "object", "properties": {"userInfo": {"type": "object", "properties": {
                "extra": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                "groups": {"type": "array", "items": {"type": "string"}},
                "uid": string("A unique value that identifies this user across time."),
                "username": string("The name that uniquely identifies this user among all active users."),
            }}}},
        },
        "x-kubernetes-group-version-kind": gvk(group, version, "SelfSubjectReview"),
    }));
    if let Some(meta) = schemas_meta(&b) {
        schemas.insert(format!("{META}.ObjectMeta"), meta);
    }
    document(flavor, git_version, paths, schemas)
}

fn schemas_meta(b: &Builder) -> Option<Value> {
    schemas(b).remove(&format!("{META}.ObjectMeta"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavor {
    V2,
    V3,
}

/// Encodes the paths of a v2 document as gnostic's `openapi.v2.Document` protobuf (field
/// numbers from gnostic's `OpenAPIv2.proto`): what client-go's `OpenAPISchema()` asks for.
/// Definitions are left out on purpose (see the module documentation).
pub(super) fn v2_protobuf(doc: &Value) -> Vec<u8> {
    let str_of = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let mut info = Pb::default();
    info.string(1, &str_of(&doc["info"]["title"]));
    info.string(2, &str_of(&doc["info"]["version"]));
    let mut paths = Pb::default();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let mut path_item = Pb::default();
        for (field, method) in [
            (2, "get"),
            (3, "put"),
            (4, "post"),
            (5, "delete"),
            (8, "patch"),
        ] {
            if let Some(op) = item.get(method) {
                path_item.message(field, pb_operation(op));
            }
        }
        for p in item["parameters"].as_array().into_iter().flatten() {
            path_item.message(9, pb_parameter(p));
        }
        let mut named = Pb::default();
        named.string(1, path);
        named.message(2, path_item);
        paths.message(2, named);
    }
    let mut document = Pb::default();
    document.string(1, &str_of(&doc["swagger"]));
    document.message(2, info);
    document.message(8, paths);
    document.0
}

fn pb_operation(op: &Value) -> Pb {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut m = Pb::default();
    for tag in strings(&op["tags"]) {
        m.string(1, &tag);
    }
    m.string(3, op["description"].as_str().unwrap_or_default());
    m.string(5, op["operationId"].as_str().unwrap_or_default());
    for t in strings(&op["produces"]) {
        m.string(6, &t);
    }
    for t in strings(&op["consumes"]) {
        m.string(7, &t);
    }
    for p in op["parameters"].as_array().into_iter().flatten() {
        m.message(8, pb_parameter(p));
    }
    for s in strings(&op["schemes"]) {
        m.string(10, &s);
    }
    // Vendor extensions travel as YAML text; JSON is valid YAML.
    for (name, value) in op.as_object().into_iter().flatten() {
        if name.starts_with("x-") {
            let mut any = Pb::default();
            any.string(2, &value.to_string());
            let mut named = Pb::default();
            named.string(1, name);
            named.message(2, any);
            m.message(13, named);
        }
    }
    m
}

/// A `ParametersItem` holding a body, query or path `Parameter`.
fn pb_parameter(p: &Value) -> Pb {
    let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
    let required = p["required"].as_bool().unwrap_or(false);
    let mut parameter = Pb::default();
    if s("in") == "body" {
        let mut body = Pb::default();
        body.string(1, &s("description"));
        body.string(2, &s("name"));
        body.string(3, "body");
        body.bool(4, required);
        parameter.message(1, body);
    } else {
        // Query and path sub-schemas share the first fields; `type` is 6 for query, 5 for path.
        let (which, type_field) = if s("in") == "path" { (4, 5) } else { (3, 6) };
        let mut sub = Pb::default();
        sub.bool(1, required);
        sub.string(2, &s("in"));
        sub.string(3, &s("description"));
        sub.string(4, &s("name"));
        sub.string(type_field, &s("type"));
        let mut non_body = Pb::default();
        non_body.message(which, sub);
        parameter.message(2, non_body);
    }
    let mut item = Pb::default();
    item.message(1, parameter);
    item
}

/// A protobuf message being written: just the wire bytes (proto3; defaults are omitted).
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn bytes(&mut self, field: u32, bytes: &[u8]) {
        self.varint(u64::from(field) << 3 | 2);
        self.varint(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }

    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }

    fn message(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }

    fn bool(&mut self, field: u32, b: bool) {
        if b {
            self.varint(u64::from(field) << 3);
            self.varint(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_wire_format() {
        let mut m = Pb::default();
        m.string(1, "2.0");
        m.bool(4, true);
        m.varint(300);
        assert_eq!(m.0, [0x0a, 3, b'2', b'.', b'0', 0x20, 1, 0xac, 0x02]);
        let doc = core_v1(Flavor::V2, "v1.27.3");
        let pb = v2_protobuf(&doc);
        assert!(pb.starts_with(&[0x0a, 3, b'2', b'.', b'0', 0x12]));
        let needle = br#"{"group":"","kind":"ConfigMap","version":"v1"}"#;
        assert!(pb.windows(needle.len()).any(|w| w == needle));
        assert!(pb.windows(15).any(|w| w == b"fieldValidation"));
    }
}
