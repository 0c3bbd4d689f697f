//! In-memory namespaces, pods and configmaps with kube-apiserver bookkeeping: one global,
//! monotonic `resourceVersion`, `uid`, `creationTimestamp`, and a bounded event history so a
//! watch can resume from a resourceVersion (or get `410 Expired` when it is too old).
//!
//! Objects are kept as JSON (`serde_json::Value`) exactly as the wire shows them, so whatever a
//! client sends round-trips; only the fields the simulator needs are defaulted or interpreted.
//!
//! Invariants:
//! - Every change takes the lock, bumps the resourceVersion, records the event in the history
//!   and broadcasts it, all before the lock is released; [`Store::watch`] takes its backlog and
//!   subscribes under that same lock, so a watcher never misses or duplicates an event.
//! - The lock is never held across an `.await`.
//! - Nothing here panics on client input: bad input becomes a [`StoreError`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// How many past events a watch can resume from; older resourceVersions get `410 Expired`.
const HISTORY: usize = 1000;
/// Live events buffered per watcher before it is considered too slow and its watch is ended
/// (the client then re-lists, as it would after an apiserver watch-cache overflow).
const WATCH_BUFFER: usize = 1024;

// === Resources ===

/// The resource types the simulator serves (all in the core `v1` group).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Namespaces,
    Pods,
    ConfigMaps,
    /// Core v1 events: stored as given (nothing in the simulator emits any), so `kubectl get
    /// events` and `kubectl events` answer as on a quiet cluster.
    Events,
}

impl Resource {
    pub const ALL: [Resource; 4] = [
        Resource::ConfigMaps,
        Resource::Events,
        Resource::Namespaces,
        Resource::Pods,
    ];

    pub fn from_plural(plural: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.plural() == plural)
    }

    pub fn plural(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
            Resource::ConfigMaps => "configmaps",
            Resource::Events => "events",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespace",
            Resource::Pods => "pod",
            Resource::ConfigMaps => "configmap",
            Resource::Events => "event",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Namespaces => "Namespace",
            Resource::Pods => "Pod",
            Resource::ConfigMaps => "ConfigMap",
            Resource::Events => "Event",
        }
    }

    pub fn list_kind(self) -> String {
        format!("{}List", self.kind())
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Resource::Namespaces)
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Resource::Namespaces => &["ns"],
            Resource::Pods => &["po"],
            Resource::ConfigMaps => &["cm"],
            Resource::Events => &["ev"],
        }
    }

    pub fn categories(self) -> &'static [&'static str] {
        match self {
            Resource::Pods => &["all"],
            _ => &[],
        }
    }

    /// Verbs as kube-apiserver lists them in discovery (sorted).
    pub fn verbs(self) -> &'static [&'static str] {
        match self {
            // Namespaces have no deletecollection in the real API either.
            Resource::Namespaces => &[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ],
            _ => &[
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ],
        }
    }

    /// Field selectors kube-apiserver accepts for this resource besides `metadata.name` and
    /// `metadata.namespace`.
    fn extra_field_labels(self) -> &'static [&'static str] {
        match self {
            Resource::Namespaces => &["status.phase"],
            Resource::Pods => &[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            Resource::ConfigMaps => &[],
            Resource::Events => &[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ],
        }
    }
}

// === Events and errors ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as a watch delivers it. `object` carries `kind`/`apiVersion`.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub kind: EventType,
    pub resource: Resource,
    pub object: Arc<Value>,
    pub resource_version: u64,
}

impl WatchEvent {
    pub fn namespace(&self) -> Option<&str> {
        self.object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
    }
}

/// Why a store operation failed; the server maps each to a `metav1.Status`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{} \"{name}\" not found", .resource.plural())]
    NotFound { resource: Resource, name: String },
    #[error("{} \"{name}\" already exists", .resource.plural())]
    AlreadyExists { resource: Resource, name: String },
    #[error("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", .resource.plural())]
    Conflict { resource: Resource, name: String },
    #[error("{} \"{name}\" is invalid: {message}", .resource.kind())]
    Invalid {
        resource: Resource,
        name: String,
        message: String,
    },
    #[error("{} \"{name}\" is forbidden: {message}", .resource.plural())]
    Forbidden {
        resource: Resource,
        name: String,
        message: String,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("too old resource version: {requested} ({oldest})")]
    Expired { requested: u64, oldest: u64 },
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchFrom {
    /// No resourceVersion (or "0"): synthetic ADDED events for every current object first.
    Current,
    /// Events strictly after this resourceVersion.
    After(u64),
}

// === Store ===

/// The in-memory object store. Share it as `Arc<Store>`.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<WatchEvent>,
    node_name: String,
}

#[derive(Debug)]
struct Inner {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<WatchEvent>,
    next_pod_ip: u32,
}

/// (resource, namespace or "" for cluster-scoped, name): ordered like etcd keys, so lists come
/// back sorted by namespace then name, as kube-apiserver returns them.
type Key = (Resource, String, String);

impl Store {
    /// An empty store (no namespaces). Most callers want [`Store::seeded`].
    pub fn new(cluster: &str) -> Self {
        Self {
            inner: Mutex::new(Inner {
                resource_version: 100,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                next_pod_ip: 10,
            }),
            events: broadcast::channel(WATCH_BUFFER).0,
            node_name: format!("{cluster}-node-0"),
        }
    }

    /// The standard seed: namespaces `default` and `kube-system`, three Running pods in
    /// `default` (`web-0`, `web-1`, `db-0`) and CoreDNS in `kube-system`.
    pub fn seeded(cluster: &str) -> Self {
        let store = Self::new(cluster);
        let seed = |res, ns: Option<&str>, obj: Value| {
            // The seed is static and valid; a failure here is a bug in this file.
            if let Err(e) = store.create(res, ns, obj, false) {
                tracing::error!(error = %e, "kube-sim seed object rejected");
            }
        };
        for ns in ["default", "kube-system"] {
            seed(
                Resource::Namespaces,
                None,
                json!({"metadata": {"name": ns}}),
            );
        }
        let pod = |name: &str, labels: Value, container: &str, image: &str| {
            json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"name": container, "image": image}]},
            })
        };
        let web = json!({"app": "web"});
        seed(
            Resource::Pods,
            Some("default"),
            pod("web-0", web.clone(), "web", "nginx:1.27"),
        );
        seed(
            Resource::Pods,
            Some("default"),
            pod("web-1", web, "web", "nginx:1.27"),
        );
        seed(
            Resource::Pods,
            Some("default"),
            pod("db-0", json!({"app": "db"}), "db", "postgres:16"),
        );
        seed(
            Resource::Pods,
            Some("kube-system"),
            pod(
                "coredns-5d78c9869d-x7k2p",
                json!({"k8s-app": "kube-dns"}),
                "coredns",
                "registry.k8s.io/coredns/coredns:v1.11.1",
            ),
        );
        store
    }

    /// The newest resourceVersion (what a list returns as `metadata.resourceVersion`).
    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    /// All objects of `resource` (in `namespace`, or all namespaces when `None`), sorted by
    /// namespace and name, and the resourceVersion they were read at.
    pub fn list(&self, resource: Resource, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((r, ns, _), _)| *r == resource && namespace.is_none_or(|want| want == ns))
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.resource_version)
    }

    pub fn get(&self, resource: Resource, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&key(resource, namespace, name))
            .cloned()
    }

    /// Creates an object (POST). Fills `uid`, `resourceVersion`, `creationTimestamp`,
    /// `namespace`, honours `generateName`, and defaults the fields kube-apiserver (and, for
    /// pods, the scheduler and kubelet) would set. With `dry_run` nothing is stored.
    pub fn create(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        let meta = metadata_mut(&mut obj)?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let name = format!("{prefix}{}", random_suffix());
                    meta.insert("name".into(), json!(name));
                    name
                }
                _ => {
                    return Err(StoreError::Invalid {
                        resource,
                        name: String::new(),
                        message: "metadata.name: Required value: name or generateName is required"
                            .into(),
                    })
                }
            },
        };
        validate_name(resource, &name)?;
        if let Some(ns) = namespace {
            if !inner
                .objects
                .contains_key(&key(Resource::Namespaces, None, ns))
            {
                return Err(StoreError::NotFound {
                    resource: Resource::Namespaces,
                    name: ns.to_owned(),
                });
            }
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        let k = key(resource, namespace, &name);
        if inner.objects.contains_key(&k) {
            return Err(StoreError::AlreadyExists { resource, name });
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert(
            "creationTimestamp".into(),
            json!(format_rfc3339(now_unix())),
        );
        meta.remove("resourceVersion");
        meta.remove("deletionTimestamp");
        meta.remove("managedFields");
        set_type_meta(&mut obj, resource);
        self.default_fields(&mut inner, resource, &name, &mut obj);
        Ok(commit(
            &mut inner,
            &self.events,
            k,
            resource,
            obj,
            EventType::Added,
            dry_run,
        ))
    }

    /// Replaces an object (PUT). A `metadata.resourceVersion` in `obj` is a precondition
    /// (409 Conflict when stale); identity fields and, for pods and namespaces, `status` are
    /// kept from the stored object, since the main resource cannot change them.
    pub fn replace(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        name: &str,
        obj: Value,
        dry_run: bool,
    ) -> Result<Value, StoreError> {
        self.update_with(resource, namespace, name, dry_run, |_| Ok(obj))
    }

    /// Read-modify-write under the lock (PATCH and PUT). `f` gets the current object and returns
    /// the new one; its `metadata.resourceVersion`, when present, must still be current.
    pub fn update_with(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        name: &str,
        dry_run: bool,
        f: impl FnOnce(&Value) -> Result<Value, StoreError>,
    ) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        let k = key(resource, namespace, name);
        let current = inner.objects.get(&k).ok_or_else(|| StoreError::NotFound {
            resource,
            name: name.to_owned(),
        })?;
        let mut obj = f(current)?;
        let current_rv = current.pointer("/metadata/resourceVersion").cloned();
        let meta = metadata_mut(&mut obj)?;
        match meta.get("name").and_then(Value::as_str) {
            None | Some("") => {
                meta.insert("name".into(), json!(name));
            }
            Some(n) if n != name => {
                return Err(StoreError::BadRequest(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )))
            }
            Some(_) => {}
        }
        if let Some(rv) = meta.get("resourceVersion") {
            if !rv.as_str().is_some_and(str::is_empty) && Some(rv) != current_rv.as_ref() {
                return Err(StoreError::Conflict {
                    resource,
                    name: name.to_owned(),
                });
            }
        }
        for field in ["uid", "creationTimestamp", "namespace", "generateName"] {
            match current.pointer(&format!("/metadata/{field}")) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        set_type_meta(&mut obj, resource);
        if resource == Resource::Pods {
            self.check_pod_update(name, current, &mut obj)?;
        }
        if matches!(resource, Resource::Pods | Resource::Namespaces) {
            if let (Some(map), Some(status)) = (obj.as_object_mut(), current.get("status")) {
                map.insert("status".into(), status.clone());
            }
        }
        if let Some(map) = obj.as_object_mut() {
            // A namespace's spec.finalizers is set by the system, never by an update.
            if resource == Resource::Namespaces && !map.contains_key("spec") {
                map.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
            }
        }
        Ok(commit(
            &mut inner,
            &self.events,
            k,
            resource,
            obj,
            EventType::Modified,
            dry_run,
        ))
    }

    /// Deletes an object and returns it as last seen (with the deletion's resourceVersion).
    /// Deleting a namespace deletes everything in it; `default`, `kube-system` and
    /// `kube-public` cannot be deleted, as in kube-apiserver.
    pub fn delete(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        name: &str,
        dry_run: bool,
    ) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        let k = key(resource, namespace, name);
        let Some(current) = inner.objects.get(&k).cloned() else {
            return Err(StoreError::NotFound {
                resource,
                name: name.to_owned(),
            });
        };
        if resource == Resource::Namespaces {
            if ["default", "kube-system", "kube-public"].contains(&name) {
                return Err(StoreError::Forbidden {
                    resource,
                    name: name.to_owned(),
                    message: "this namespace may not be deleted".into(),
                });
            }
            if !dry_run {
                let contained: Vec<Key> = inner
                    .objects
                    .keys()
                    .filter(|(r, ns, _)| *r != Resource::Namespaces && ns == name)
                    .cloned()
                    .collect();
                for ck in contained {
                    if let Some(obj) = inner.objects.get(&ck).cloned() {
                        remove(&mut inner, &self.events, ck, obj);
                    }
                }
            }
        }
        if dry_run {
            return Ok(current);
        }
        let mut last = current;
        match resource {
            Resource::Namespaces => {
                if let Some(status) = last.get_mut("status").and_then(Value::as_object_mut) {
                    status.insert("phase".into(), json!("Terminating"));
                }
            }
            // kube-apiserver deletes pods gracefully: the answer (and the final event) carry
            // the deletion timestamp. There is no kubelet here, so the pod goes at once.
            Resource::Pods => {
                let grace = last
                    .pointer("/spec/terminationGracePeriodSeconds")
                    .cloned()
                    .unwrap_or(json!(30));
                if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert(
                        "deletionTimestamp".into(),
                        json!(format_rfc3339(now_unix())),
                    );
                    meta.insert("deletionGracePeriodSeconds".into(), grace);
                }
            }
            Resource::ConfigMaps | Resource::Events => {}
        }
        Ok(remove(&mut inner, &self.events, k, last))
    }

    /// Starts a watch on `resource`: the backlog to send first (synthetic ADDED events, or the
    /// history after `from`), and a receiver for live events. The caller filters by namespace
    /// and selectors.
    pub fn watch(
        &self,
        resource: Resource,
        from: WatchFrom,
    ) -> Result<(Vec<WatchEvent>, broadcast::Receiver<WatchEvent>), StoreError> {
        let inner = self.lock();
        let backlog = match from {
            WatchFrom::Current => inner
                .objects
                .iter()
                .filter(|((r, _, _), _)| *r == resource)
                .map(|(_, obj)| WatchEvent {
                    kind: EventType::Added,
                    resource,
                    resource_version: resource_version_of(obj),
                    object: Arc::new(obj.clone()),
                })
                .collect(),
            WatchFrom::After(rv) => {
                // The history holds every event after `oldest`; anything older is gone.
                let oldest = inner
                    .history
                    .front()
                    .map_or(inner.resource_version, |e| e.resource_version - 1);
                if rv < oldest {
                    return Err(StoreError::Expired {
                        requested: rv,
                        oldest,
                    });
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.resource == resource && e.resource_version > rv)
                    .cloned()
                    .collect()
            }
        };
        Ok((backlog, self.events.subscribe()))
    }

    /// Fills what kube-apiserver defaults, and for pods what the scheduler and kubelet would
    /// report once the pod runs: the simulator has no nodes, so every pod is Running at once.
    fn default_fields(&self, inner: &mut Inner, resource: Resource, name: &str, obj: &mut Value) {
        let Some(map) = obj.as_object_mut() else {
            return;
        };
        match resource {
            Resource::Namespaces => {
                if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
                    let labels = meta.entry("labels").or_insert_with(|| json!({}));
                    if let Some(labels) = labels.as_object_mut() {
                        labels.insert("kubernetes.io/metadata.name".into(), json!(name));
                    }
                }
                map.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
                map.insert("status".into(), json!({"phase": "Active"}));
            }
            Resource::ConfigMaps | Resource::Events => {}
            Resource::Pods => {
                inner.next_pod_ip = inner.next_pod_ip.wrapping_add(1);
                let ip = format!(
                    "10.244.{}.{}",
                    (inner.next_pod_ip >> 8) & 0xff,
                    inner.next_pod_ip & 0xff
                );
                let now = format_rfc3339(now_unix());
                let spec = map.entry("spec").or_insert_with(|| json!({}));
                let Some(spec) = spec.as_object_mut() else {
                    return;
                };
                self.default_pod_spec(spec);
                let statuses: Vec<Value> = spec
                    .get("containers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
                        let cname = c.get("name").and_then(Value::as_str).unwrap_or_default();
                        json!({
                            "name": cname,
                            "state": {"running": {"startedAt": now}},
                            "lastState": {},
                            "ready": true,
                            "restartCount": 0,
                            "image": image,
                            "imageID": format!("{image}@sha256:{}", hex64(image)),
                            "containerID": format!("containerd://{}", hex64(&format!("{name}/{cname}"))),
                            "started": true,
                        })
                    })
                    .collect();
                let condition = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
                map.insert(
                    "status".into(),
                    json!({
                        "phase": "Running",
                        "conditions": [
                            condition("PodReadyToStartContainers"),
                            condition("Initialized"),
                            condition("Ready"),
                            condition("ContainersReady"),
                            condition("PodScheduled"),
                        ],
                        "hostIP": "10.224.0.4",
                        "hostIPs": [{"ip": "10.224.0.4"}],
                        "podIP": ip,
                        "podIPs": [{"ip": ip}],
                        "startTime": now,
                        "containerStatuses": statuses,
                        "qosClass": "BestEffort",
                    }),
                );
            }
        }
    }

    /// The pod spec defaults kube-apiserver (and the scheduler, for `nodeName`) fill in.
    fn default_pod_spec(&self, spec: &mut Map<String, Value>) {
        for (field, value) in [
            ("restartPolicy", json!("Always")),
            ("terminationGracePeriodSeconds", json!(30)),
            ("dnsPolicy", json!("ClusterFirst")),
            ("serviceAccountName", json!("default")),
            ("serviceAccount", json!("default")),
            ("nodeName", json!(self.node_name)),
            ("securityContext", json!({})),
            ("schedulerName", json!("default-scheduler")),
            ("enableServiceLinks", json!(true)),
            ("preemptionPolicy", json!("PreemptLowerPriority")),
            ("priority", json!(0)),
        ] {
            spec.entry(field).or_insert(value);
        }
        for key in ["containers", "initContainers"] {
            let Some(containers) = spec.get_mut(key).and_then(Value::as_array_mut) else {
                continue;
            };
            for c in containers.iter_mut().filter_map(Value::as_object_mut) {
                let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
                let pull = if image.contains(':') && !image.ends_with(":latest") {
                    "IfNotPresent"
                } else {
                    "Always"
                };
                c.entry("imagePullPolicy").or_insert(json!(pull));
                c.entry("resources").or_insert(json!({}));
                c.entry("terminationMessagePath")
                    .or_insert(json!("/dev/termination-log"));
                c.entry("terminationMessagePolicy").or_insert(json!("File"));
            }
        }
    }

    /// kube-apiserver lets a pod update change little of the spec: container images are the
    /// one change clients make in practice (plus activeDeadlineSeconds and added tolerations).
    fn check_pod_update(
        &self,
        name: &str,
        current: &Value,
        new: &mut Value,
    ) -> Result<(), StoreError> {
        if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
            self.default_pod_spec(spec);
        }
        let masked = |obj: &Value| {
            let mut spec = obj.get("spec").cloned().unwrap_or(Value::Null);
            for key in ["containers", "initContainers"] {
                for c in spec
                    .get_mut(key)
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(c) = c.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
            if let Some(spec) = spec.as_object_mut() {
                spec.remove("activeDeadlineSeconds");
                spec.remove("tolerations");
            }
            spec
        };
        if masked(current) == masked(new) {
            return Ok(());
        }
        Err(StoreError::Invalid {
            resource: Resource::Pods,
            name: name.to_owned(),
            message: "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".into(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent data (every mutation is a
        // single insert/remove), so keep serving rather than poison every later request.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn key(resource: Resource, namespace: Option<&str>, name: &str) -> Key {
    (
        resource,
        namespace.unwrap_or_default().to_owned(),
        name.to_owned(),
    )
}

/// Stamps a new resourceVersion on `obj`, stores it and publishes the event.
fn commit(
    inner: &mut Inner,
    events: &broadcast::Sender<WatchEvent>,
    k: Key,
    resource: Resource,
    mut obj: Value,
    kind: EventType,
    dry_run: bool,
) -> Value {
    let rv = inner.resource_version + 1;
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if dry_run {
            // A dry run answers as if stored, but kube-apiserver leaves the resourceVersion of a
            // create empty and of an update unchanged; dropping it is close enough for clients.
            meta.remove("resourceVersion");
        } else {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
    }
    if dry_run {
        return obj;
    }
    inner.resource_version = rv;
    inner.objects.insert(k, obj.clone());
    publish(inner, events, kind, resource, obj.clone(), rv);
    obj
}

fn remove(
    inner: &mut Inner,
    events: &broadcast::Sender<WatchEvent>,
    k: Key,
    mut obj: Value,
) -> Value {
    let resource = k.0;
    inner.objects.remove(&k);
    let rv = inner.resource_version + 1;
    inner.resource_version = rv;
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
    }
    publish(inner, events, EventType::Deleted, resource, obj.clone(), rv);
    obj
}

fn publish(
    inner: &mut Inner,
    events: &broadcast::Sender<WatchEvent>,
    kind: EventType,
    resource: Resource,
    obj: Value,
    rv: u64,
) {
    let event = WatchEvent {
        kind,
        resource,
        object: Arc::new(obj),
        resource_version: rv,
    };
    if inner.history.len() == HISTORY {
        inner.history.pop_front();
    }
    inner.history.push_back(event.clone());
    // No receivers is fine: nobody is watching.
    let _ = events.send(event);
}

fn metadata_mut(obj: &mut Value) -> Result<&mut Map<String, Value>, StoreError> {
    let map = obj.as_object_mut().ok_or_else(|| {
        StoreError::BadRequest("the body of the request must be a JSON object".into())
    })?;
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    meta.as_object_mut()
        .ok_or_else(|| StoreError::BadRequest("metadata must be an object".into()))
}

/// kube-apiserver always answers with `kind`/`apiVersion` set on single objects.
fn set_type_meta(obj: &mut Value, resource: Resource) {
    if let Some(map) = obj.as_object_mut() {
        map.insert("kind".into(), json!(resource.kind()));
        map.insert("apiVersion".into(), json!("v1"));
    }
}

/// Names are DNS-1123 subdomains (namespaces: labels), checked like kube-apiserver.
fn validate_name(resource: Resource, name: &str) -> Result<(), StoreError> {
    let max = if resource == Resource::Namespaces {
        63
    } else {
        253
    };
    let ok_chars = name.bytes().all(|b| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || b == b'-'
            || (b == b'.' && resource != Resource::Namespaces)
    });
    let ok_ends = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if ok_chars && ok_ends && name.len() <= max {
        return Ok(());
    }
    let what = if resource == Resource::Namespaces {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
    } else {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
    };
    Err(StoreError::Invalid {
        resource,
        name: name.to_owned(),
        message: format!("metadata.name: Invalid value: \"{name}\": {what}"),
    })
}

pub(crate) fn resource_version_of(obj: &Value) -> u64 {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Five characters from kube's `generateName` alphabet (no vowels, no confusable digits).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

/// A deterministic 64-hex-digit string derived from `seed` (fake image digests, container IDs).
fn hex64(seed: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, seed.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

// === Selectors ===

/// A parsed label selector (`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_top_level(s) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let req = if let Some(k) = term.strip_prefix('!') {
                Requirement::NotExists(k.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, set)) = term.split_once(" notin ") {
                Requirement::NotIn(k.trim().to_owned(), parse_set(set)?)
            } else if let Some((k, set)) = term.split_once(" in ") {
                Requirement::In(k.trim().to_owned(), parse_set(set)?)
            } else if term
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
            {
                Requirement::Exists(term.to_owned())
            } else {
                return Err(format!("unable to parse requirement: {term:?}"));
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Eq(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b=c`).
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("found '{s}', expected: '('"))?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
}

/// A parsed field selector: `field=value`, `field==value`, `field!=value`, comma-joined.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str, resource: Resource) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            if !["metadata.name", "metadata.namespace"].contains(&field)
                && !resource.extra_field_labels().contains(&field)
            {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, want)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            let got = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            (got == *want) == *equal
        })
    }
}

// === Time ===

pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `2024-05-01T12:00:00Z`, the form Kubernetes uses for `metav1.Time`.
pub(crate) fn format_rfc3339(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parses the `metav1.Time` form (seconds precision, `Z`); `None` for anything else.
pub(crate) fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    Some(days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?)
}

// Howard Hinnant's civil-date algorithms (public domain): days since 1970-01-01 <-> y/m/d.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_has_running_pods_and_namespaces() {
        let store = Store::seeded("alpha");
        let (ns, _) = store.list(Resource::Namespaces, None);
        let names: Vec<_> = ns.iter().map(|n| n["metadata"]["name"].clone()).collect();
        assert_eq!(names, [json!("default"), json!("kube-system")]);
        let (pods, rv) = store.list(Resource::Pods, Some("default"));
        let names: Vec<_> = pods.iter().map(|p| p["metadata"]["name"].clone()).collect();
        assert_eq!(names, [json!("db-0"), json!("web-0"), json!("web-1")]);
        assert_eq!(pods[1]["status"]["phase"], "Running");
        assert_eq!(pods[1]["status"]["containerStatuses"][0]["ready"], true);
        assert_eq!(pods[1]["metadata"]["namespace"], "default");
        assert_eq!(pods[1]["kind"], "Pod");
        assert_eq!(rv, store.resource_version());
        assert_eq!(store.list(Resource::Pods, None).0.len(), 4);
    }

    #[test]
    fn create_conflicts_and_versions() {
        let store = Store::seeded("alpha");
        let cm = json!({"metadata": {"name": "c"}, "data": {"k": "v"}});
        let created = store
            .create(Resource::ConfigMaps, Some("default"), cm.clone(), false)
            .unwrap();
        let rv1 = resource_version_of(&created);
        assert_eq!(rv1, store.resource_version());
        assert!(matches!(
            store.create(Resource::ConfigMaps, Some("default"), cm.clone(), false),
            Err(StoreError::AlreadyExists { .. })
        ));
        assert!(matches!(
            store.create(Resource::ConfigMaps, Some("nope"), cm, false),
            Err(StoreError::NotFound {
                resource: Resource::Namespaces,
                ..
            })
        ));
        // A stale resourceVersion is a conflict; the current one is accepted.
        let mut stale = created.clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        assert!(matches!(
            store.replace(Resource::ConfigMaps, Some("default"), "c", stale, false),
            Err(StoreError::Conflict { .. })
        ));
        let updated = store
            .replace(
                Resource::ConfigMaps,
                Some("default"),
                "c",
                created.clone(),
                false,
            )
            .unwrap();
        assert!(resource_version_of(&updated) > rv1);
        assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
        let deleted = store
            .delete(Resource::ConfigMaps, Some("default"), "c", false)
            .unwrap();
        assert_eq!(deleted["data"]["k"], "v");
        assert!(store
            .get(Resource::ConfigMaps, Some("default"), "c")
            .is_none());
    }

    #[test]
    fn pod_updates_may_change_images_only() {
        let store = Store::seeded("alpha");
        let pod = store.get(Resource::Pods, Some("default"), "web-0").unwrap();
        let mut image = pod.clone();
        image["spec"]["containers"][0]["image"] = json!("nginx:1.28");
        let updated = store
            .replace(Resource::Pods, Some("default"), "web-0", image, false)
            .unwrap();
        assert_eq!(updated["spec"]["containers"][0]["image"], "nginx:1.28");
        assert_eq!(updated["status"], pod["status"]);
        let mut env = updated.clone();
        env["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "1"}]);
        let err = store
            .replace(Resource::Pods, Some("default"), "web-0", env, false)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("pod updates may not change fields"),
            "{err}"
        );
        // A client that leaves out server defaults is not changing them.
        let mut sparse = updated.clone();
        sparse["spec"].as_object_mut().unwrap().remove("dnsPolicy");
        sparse["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("terminationMessagePath");
        assert!(store
            .replace(Resource::Pods, Some("default"), "web-0", sparse, false)
            .is_ok());
    }

    #[test]
    fn invalid_names_and_generate_name() {
        let store = Store::seeded("alpha");
        let err = store
            .create(
                Resource::ConfigMaps,
                Some("default"),
                json!({"metadata": {"name": "Bad_Name"}}),
                false,
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ConfigMap \"Bad_Name\" is invalid"),
            "{err}"
        );
        let made = store
            .create(
                Resource::ConfigMaps,
                Some("default"),
                json!({"metadata": {"generateName": "x-"}}),
                false,
            )
            .unwrap();
        let name = made["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("x-") && name.len() == 7, "{name}");
        assert!(store
            .create(Resource::ConfigMaps, Some("default"), json!([]), false)
            .is_err());
    }

    #[test]
    fn namespace_delete_cascades_and_protects_system_namespaces() {
        let store = Store::seeded("alpha");
        assert!(matches!(
            store.delete(Resource::Namespaces, None, "default", false),
            Err(StoreError::Forbidden { .. })
        ));
        store
            .create(
                Resource::Namespaces,
                None,
                json!({"metadata": {"name": "t"}}),
                false,
            )
            .unwrap();
        store
            .create(
                Resource::ConfigMaps,
                Some("t"),
                json!({"metadata": {"name": "c"}}),
                false,
            )
            .unwrap();
        let gone = store
            .delete(Resource::Namespaces, None, "t", false)
            .unwrap();
        assert_eq!(gone["status"]["phase"], "Terminating");
        assert!(store.list(Resource::ConfigMaps, Some("t")).0.is_empty());
    }

    #[test]
    fn watch_resumes_and_expires() {
        let store = Store::seeded("alpha");
        let start = store.resource_version();
        let (backlog, _rx) = store.watch(Resource::Pods, WatchFrom::Current).unwrap();
        assert_eq!(backlog.len(), 4);
        assert!(backlog.iter().all(|e| e.kind == EventType::Added));
        store
            .create(
                Resource::ConfigMaps,
                Some("default"),
                json!({"metadata": {"name": "c"}}),
                false,
            )
            .unwrap();
        let (backlog, _rx) = store
            .watch(Resource::ConfigMaps, WatchFrom::After(start))
            .unwrap();
        assert_eq!(backlog.len(), 1);
        assert_eq!(backlog[0].namespace(), Some("default"));
        for i in 0..HISTORY + 5 {
            store
                .create(
                    Resource::ConfigMaps,
                    Some("default"),
                    json!({"metadata": {"name": format!("c{i}")}}),
                    false,
                )
                .unwrap();
        }
        assert!(matches!(
            store.watch(Resource::ConfigMaps, WatchFrom::After(start)),
            Err(StoreError::Expired { .. })
        ));
        let now = store.resource_version();
        assert!(store
            .watch(Resource::ConfigMaps, WatchFrom::After(now))
            .unwrap()
            .0
            .is_empty());
    }

    #[tokio::test]
    async fn live_events_reach_subscribers() {
        let store = Store::seeded("alpha");
        let (_, mut rx) = store
            .watch(Resource::Pods, WatchFrom::After(store.resource_version()))
            .unwrap();
        store
            .delete(Resource::Pods, Some("default"), "web-1", false)
            .unwrap();
        let ev = rx.recv().await.unwrap();
        assert_eq!(ev.kind, EventType::Deleted);
        assert_eq!(ev.object["metadata"]["name"], "web-1");
        assert_eq!(ev.resource_version, store.resource_version());
    }

    #[test]
    fn selectors() {
        let pod = json!({"metadata": {"name": "web-0", "namespace": "default", "labels": {"app": "web", "tier": "fe"}}, "status": {"phase": "Running"}});
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&pod);
        assert!(ok("app=web"));
        assert!(ok("app==web,tier"));
        assert!(!ok("app!=web"));
        assert!(ok("app in (db, web)"));
        assert!(!ok("app notin (web)"));
        assert!(ok("!missing"));
        assert!(ok(""));
        assert!(LabelSelector::parse("app in web").is_err());
        let f = |s: &str| {
            FieldSelector::parse(s, Resource::Pods)
                .unwrap()
                .matches(&pod)
        };
        assert!(f("metadata.name=web-0"));
        assert!(!f("metadata.name=web-1"));
        assert!(f("status.phase!=Pending,metadata.namespace==default"));
        assert!(FieldSelector::parse("spec.bogus=1", Resource::Pods).is_err());
        assert!(FieldSelector::parse("status.phase=x", Resource::ConfigMaps).is_err());
    }

    #[test]
    fn time_round_trips() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        for t in [0, 951_782_400, 1_709_251_199, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2024-02-29T23:59:59.5Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}
