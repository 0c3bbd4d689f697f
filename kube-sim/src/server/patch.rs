//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and strategic merge patch
//! for the fields of Pod/ConfigMap/Namespace that kubectl touches (lists merged by their patch
//! merge key, `$patch`, `$retainKeys`, `$setElementOrder/…` and `$deleteFromPrimitiveList/…`
//! directives). Server-side apply is not supported (415).

use serde_json::{Map, Value};

/// The patch types kube-apiserver accepts, by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PatchType {
    Json,
    Merge,
    Strategic,
}

impl PatchType {
    pub(super) fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            _ => None,
        }
    }
}

/// Why a patch could not be applied: a malformed document (400) or one that does not apply to
/// the object (422), as kube-apiserver distinguishes them.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PatchError {
    Malformed(String),
    NotApplicable(String),
}

pub(super) fn apply(kind: PatchType, target: &Value, body: &[u8]) -> Result<Value, PatchError> {
    let patch: Value =
        serde_json::from_slice(body).map_err(|e| PatchError::Malformed(e.to_string()))?;
    match kind {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(PatchError::Malformed(
                    "merge patch must be a JSON object".into(),
                ));
            }
            let mut out = target.clone();
            merge(&mut out, &patch);
            Ok(out)
        }
        PatchType::Strategic => {
            let Value::Object(patch) = patch else {
                return Err(PatchError::Malformed(
                    "strategic merge patch must be a JSON object".into(),
                ));
            };
            let mut out = target.clone();
            strategic(&mut out, &patch);
            Ok(out)
        }
        PatchType::Json => json_patch(target, &patch),
    }
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(map) = target else { return };
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The patch merge key of a list field, as declared by the Kubernetes types (`patchMergeKey`).
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => "name",
        "ports" => "containerPort",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "ownerReferences" => "uid",
        "conditions" | "readinessGates" => "type",
        _ => return None,
    })
}

/// Lists of scalars that merge as sets instead of being replaced.
fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

fn strategic(target: &mut Value, patch: &Map<String, Value>) {
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(map) = target else { return };
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        map.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in patch {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(gone)) = (map.get_mut(field), v) {
                list.retain(|item| !gone.contains(item));
            }
            continue;
        }
        match v {
            Value::Null => {
                map.remove(k);
            }
            Value::Object(sub) if sub.get("$patch").and_then(Value::as_str) == Some("delete") => {
                map.remove(k);
            }
            Value::Object(sub) => strategic(map.entry(k.clone()).or_insert(Value::Null), sub),
            Value::Array(items) => {
                let merged = match (map.get_mut(k), merge_key(k)) {
                    (Some(Value::Array(current)), Some(key)) => {
                        merge_keyed_list(current, items, key);
                        true
                    }
                    (Some(Value::Array(current)), None) if is_set_list(k) => {
                        for item in items {
                            if !current.contains(item) {
                                current.push(item.clone());
                            }
                        }
                        true
                    }
                    _ => false,
                };
                if !merged {
                    let clean: Vec<Value> = items
                        .iter()
                        .filter(|i| i.get("$patch").is_none())
                        .cloned()
                        .collect();
                    map.insert(k.clone(), Value::Array(clean));
                }
            }
            other => {
                map.insert(k.clone(), other.clone());
            }
        }
    }
}

fn merge_keyed_list(current: &mut Vec<Value>, items: &[Value], key: &str) {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *current = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
        return;
    }
    for item in items {
        let Value::Object(item) = item else { continue };
        let Some(id) = item.get(key) else {
            continue;
        };
        let pos = current.iter().position(|c| c.get(key) == Some(id));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(pos) = pos {
                current.remove(pos);
            }
            continue;
        }
        match pos {
            Some(pos) => strategic(&mut current[pos], item),
            None => {
                let mut fresh = Value::Null;
                strategic(&mut fresh, item);
                current.push(fresh);
            }
        }
    }
}

/// RFC 6902.
fn json_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::Malformed("json patch must be a JSON array".into()))?;
    let mut doc = target.clone();
    for op in ops {
        let field = |name: &str| {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Malformed(format!("operation missing '{name}' string")))
        };
        let path = field("path")?;
        match field("op")? {
            "add" => add(&mut doc, path, value_of(op)?)?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                remove(&mut doc, path)?;
                add(&mut doc, path, value_of(op)?)?;
            }
            "move" => {
                let v = remove(&mut doc, field("from")?)?;
                add(&mut doc, path, v)?;
            }
            "copy" => {
                let v = doc
                    .pointer(field("from")?)
                    .cloned()
                    .ok_or_else(|| missing(field("from").unwrap_or_default()))?;
                add(&mut doc, path, v)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value_of(op)?) {
                    return Err(PatchError::NotApplicable(format!(
                        "testing value {path} failed"
                    )));
                }
            }
            other => return Err(PatchError::Malformed(format!("Unexpected kind: {other}"))),
        }
    }
    Ok(doc)
}

fn value_of(op: &Value) -> Result<Value, PatchError> {
    op.get("value")
        .cloned()
        .ok_or_else(|| PatchError::Malformed("operation missing 'value'".into()))
}

fn missing(path: &str) -> PatchError {
    PatchError::NotApplicable(format!("doc is missing path: \"{path}\": missing value"))
}

/// Splits a JSON pointer into (parent pointer, last token, unescaped).
fn split_pointer(path: &str) -> Result<(&str, String), PatchError> {
    let idx = path
        .rfind('/')
        .ok_or_else(|| PatchError::Malformed(format!("invalid JSON pointer {path:?}")))?;
    Ok((
        &path[..idx],
        path[idx + 1..].replace("~1", "/").replace("~0", "~"),
    ))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, token) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(token, value);
            Ok(())
        }
        Some(Value::Array(list)) => {
            let idx = if token == "-" {
                list.len()
            } else {
                token
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= list.len())
                    .ok_or_else(|| missing(path))?
            };
            list.insert(idx, value);
            Ok(())
        }
        _ => Err(missing(path)),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let (parent, token) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&token).ok_or_else(|| missing(path)),
        Some(Value::Array(list)) => match token.parse::<usize>() {
            Ok(i) if i < list.len() => Ok(list.remove(i)),
            _ => Err(missing(path)),
        },
        _ => Err(missing(path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(kind: PatchType, target: Value, patch: Value) -> Result<Value, PatchError> {
        apply(kind, &target, &serde_json::to_vec(&patch).unwrap())
    }

    #[test]
    fn merge_patch() {
        let out = run(
            PatchType::Merge,
            json!({"data": {"a": "1", "b": "2"}, "metadata": {"name": "c"}}),
            json!({"data": {"a": null, "c": "3"}, "metadata": {"labels": {"x": "y"}}}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"data": {"b": "2", "c": "3"}, "metadata": {"name": "c", "labels": {"x": "y"}}})
        );
        assert!(matches!(
            run(PatchType::Merge, json!({}), json!([1])),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            apply(PatchType::Merge, &json!({}), b"{"),
            Err(PatchError::Malformed(_))
        ));
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        let pod = json!({"spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}], "finalizers": ["x"]}});
        let out = run(
            PatchType::Strategic,
            pod.clone(),
            json!({"spec": {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                            "containers": [{"name": "b", "image": "b:2"}, {"name": "c", "image": "c:1"}, {"name": "a", "$patch": "delete"}]}}),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name": "b", "image": "b:2"}, {"name": "c", "image": "c:1"}])
        );
        let out = run(
            PatchType::Strategic,
            pod,
            json!({"metadata": {"annotations": {"k": "v"}}, "spec": {"finalizers": ["y"]}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["finalizers"], json!(["x", "y"]));
        assert_eq!(out["metadata"]["annotations"]["k"], "v");
    }

    #[test]
    fn strategic_directives() {
        let out = run(
            PatchType::Strategic,
            json!({"data": {"a": "1"}, "list": [1, 2], "spec": {"finalizers": ["a", "b"]}}),
            json!({"data": {"$patch": "replace", "z": "9"}, "list": [3], "spec": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"data": {"z": "9"}, "list": [3], "spec": {"finalizers": ["b"]}})
        );
    }

    #[test]
    fn json_patch_ops() {
        let out = run(
            PatchType::Json,
            json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2]}),
            json!([
                {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                {"op": "replace", "path": "/metadata/labels/a", "value": "x"},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "remove", "path": "/list/0"},
                {"op": "copy", "from": "/list", "path": "/copy"},
                {"op": "move", "from": "/copy", "path": "/moved"},
                {"op": "test", "path": "/moved/0", "value": 2},
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"labels": {"a": "x", "b/c": "2"}}, "list": [2, 3], "moved": [2, 3]})
        );
        assert!(matches!(
            run(
                PatchType::Json,
                json!({}),
                json!([{"op": "remove", "path": "/nope"}])
            ),
            Err(PatchError::NotApplicable(_))
        ));
        assert!(matches!(
            run(
                PatchType::Json,
                json!({}),
                json!([{"op": "test", "path": "/a", "value": 1}])
            ),
            Err(PatchError::NotApplicable(_))
        ));
        assert!(matches!(
            run(
                PatchType::Json,
                json!({}),
                json!([{"op": "bogus", "path": "/a"}])
            ),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            run(PatchType::Json, json!({}), json!([{"path": "/a"}])),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            run(
                PatchType::Json,
                json!({"l": []}),
                json!([{"op": "add", "path": "/l/5", "value": 1}])
            ),
            Err(PatchError::NotApplicable(_))
        ));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml"),
            None
        );
    }
}
