//! Entra group overage resolved through Microsoft Graph (docs/architecture.md "Identity and
//! upstream credentials", docs/security.md E7).
//!
//! A user in more than ~200 groups gets a token without `groups` (`_claim_names` or
//! `hasgroups`). With `group_overage: {resolve: graph}` the relay asks Graph, with its own
//! identity, which of the groups *its rules name* the caller belongs to:
//! `POST <graph_host>/v1.0/{users|servicePrincipals}/{oid}/checkMemberGroups` with at most 20
//! ids per call. The URL inside the token is never fetched; the object id comes from the
//! verified `oid`, a GUID.
//!
//! - Cached per (issuer, oid) for `cache_ttl`, bounded in size; after three quarters of the TTL
//!   a hit also starts a refresh in the background, so a steady user never waits on Graph.
//! - One fetch per user at a time (single flight); the fetch runs as its own task, so a
//!   request that gives up (its `timeout`) does not cancel it for the others.
//! - Graph's 429 `Retry-After` is honoured: no call until it has passed.
//! - On timeout or error the membership is [`Membership::Unresolved`]: group rules do not
//!   match, the 403 says why, and user, app and role rules keep working.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, StatusCode};
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

use crate::auth::Principal;
use crate::authz::Membership;
use crate::config::{Config, GroupOverageConfig};
use crate::credentials::AzureToken;
use crate::metrics::{IssuerResultLabels, Metrics};
use crate::net::idp::IdpHttp;

/// Graph's limit of group ids per `checkMemberGroups` call.
const IDS_PER_CALL: usize = 20;
/// Users whose membership is remembered, per issuer.
const MAX_CACHED_USERS: usize = 50_000;
/// A `Retry-After` longer than this is capped (a broken header must not disable resolution
/// for a day).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Used when Graph throttles without saying for how long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// After a failed lookup, a user's requests get the same answer for this long instead of each
/// starting another call (and waiting on it) while Graph is down.
const FAILURE_MEMORY: Duration = Duration::from_secs(5);

type FetchResult = Result<Arc<[String]>, Arc<str>>;
/// The outcome of the one fetch in flight for a user; `None` until it is known.
type Flight = tokio::sync::watch::Receiver<Option<FetchResult>>;

/// The group resolvers of every issuer with `resolve: graph`.
pub struct GroupResolver {
    by_issuer: HashMap<String, Arc<IssuerGraph>>,
}

impl std::fmt::Debug for GroupResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupResolver")
            .field("issuers", &self.by_issuer.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl GroupResolver {
    pub fn new(cfg: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        let mut by_issuer = HashMap::new();
        for issuer in &cfg.issuers {
            let Some(g) = &issuer.group_overage else {
                continue;
            };
            by_issuer.insert(
                issuer.name.clone(),
                Arc::new(IssuerGraph::new(
                    &issuer.name,
                    g,
                    rule_groups(cfg, &issuer.name),
                    metrics.clone(),
                )?),
            );
        }
        Ok(Self { by_issuer })
    }

    /// Keeps the memberships a previous generation resolved (a reload must not send every
    /// overage user back to Graph), where they answer the same question (the same group ids).
    ///
    /// When the rules now name other groups, the old answers no longer answer the requests'
    /// question, but they still say which of the old groups admitted live streams: they are kept
    /// for re-checking those ([`membership_cached`](Self::membership_cached)) only. A Graph
    /// throttle in force carries over too.
    pub fn adopt(&self, old: &GroupResolver) {
        for (name, new) in &self.by_issuer {
            if let Some(old) = old.by_issuer.get(name) {
                let into = if old.group_ids == new.group_ids {
                    &new.cache
                } else {
                    &new.previous
                };
                for (oid, entry) in old.cache.iter() {
                    into.insert(oid, entry);
                }
                *new.throttled_until.lock() = *old.throttled_until.lock();
            }
        }
    }

    /// What the relay knows of `p`'s groups: [`Membership::Token`] unless the token says its
    /// list is incomplete; then Graph's answer (cached) or why there is none.
    pub async fn membership(&self, p: &Principal) -> Membership {
        if !p.groups_overage {
            return Membership::Token;
        }
        let Some(graph) = self.by_issuer.get(&*p.issuer) else {
            return Membership::Unresolved(
                "this issuer has no group_overage resolution (resolve: deny)".into(),
            );
        };
        let Some(oid) = p.oid.as_deref() else {
            return Membership::Unresolved("the token has no object id".into());
        };
        graph.membership(oid, p.app_only).await
    }
}

impl GroupResolver {
    /// `kube-relay doctor`: asks Graph once for `issuer` (see `IssuerGraph::probe`); `None`
    /// when the issuer does not resolve overage through Graph.
    pub async fn probe(&self, issuer: &str) -> Option<Result<String, String>> {
        Some(self.by_issuer.get(issuer)?.probe().await)
    }

    /// Like [`membership`](Self::membership) from the cache only, whatever the entry's age:
    /// for re-checking live streams after a reload, which must not wait on Graph.
    pub fn membership_cached(&self, p: &Principal) -> Membership {
        if !p.groups_overage {
            return Membership::Token;
        }
        let cached = self
            .by_issuer
            .get(&*p.issuer)
            .zip(p.oid.as_deref())
            .and_then(|(g, oid)| g.cache.get(oid).or_else(|| g.previous.get(oid)));
        match cached {
            Some(e) => Membership::Resolved(e.groups),
            None => Membership::Unresolved("not resolved".into()),
        }
    }
}

/// The group ids the access rules name that can apply to `issuer`'s callers: only these are
/// asked about (never the caller's whole membership). Graph knows groups by object id, so
/// names that are not GUIDs are left out.
fn rule_groups(cfg: &Config, issuer: &str) -> Arc<[String]> {
    let ids: BTreeSet<String> = cfg
        .clusters
        .iter()
        .flat_map(|c| c.access.iter())
        .filter(|r| r.issuer.as_deref().is_none_or(|i| i == issuer))
        .flat_map(|r| r.groups.iter())
        .filter(|g| crate::config::is_guid(g))
        .map(|g| g.to_ascii_lowercase())
        .collect();
    ids.into_iter().collect()
}

#[derive(Clone)]
struct Entry {
    groups: Arc<[String]>,
    fetched: Instant,
}

struct IssuerGraph {
    issuer: String,
    graph_host: String,
    ttl: Duration,
    timeout: Duration,
    group_ids: Arc<[String]>,
    token: AzureToken,
    http: IdpHttp,
    cache: quick_cache::sync::Cache<String, Entry>,
    /// A previous generation's answers to another set of groups: for live streams only.
    previous: quick_cache::sync::Cache<String, Entry>,
    /// Recent failures per user, with their reason ([`FAILURE_MEMORY`]).
    failed: quick_cache::sync::Cache<String, (Instant, Arc<str>)>,
    inflight: Mutex<HashMap<String, Flight>>,
    /// Graph said 429: no call before this instant.
    throttled_until: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl IssuerGraph {
    fn new(
        issuer: &str,
        cfg: &GroupOverageConfig,
        group_ids: Arc<[String]>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            issuer: issuer.to_owned(),
            graph_host: cfg.graph_host.as_str().trim_end_matches('/').to_owned(),
            ttl: cfg.cache_ttl,
            timeout: cfg.timeout,
            group_ids,
            token: AzureToken::new(&cfg.credential)?,
            http: IdpHttp::new(&cfg.ca)?,
            cache: quick_cache::sync::Cache::new(MAX_CACHED_USERS),
            previous: quick_cache::sync::Cache::new(MAX_CACHED_USERS),
            failed: quick_cache::sync::Cache::new(MAX_CACHED_USERS),
            inflight: Mutex::new(HashMap::new()),
            throttled_until: Mutex::new(None),
            metrics,
        })
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .group_overage
            .get_or_create(&IssuerResultLabels {
                issuer: self.issuer.clone(),
                result,
            })
            .inc();
    }

    async fn membership(self: &Arc<Self>, oid: &str, app_only: bool) -> Membership {
        if self.group_ids.is_empty() {
            // No rule names a group: there is nothing to ask.
            self.count("cached");
            return Membership::Resolved(Arc::from([]));
        }
        let recent_failure = self
            .failed
            .get(oid)
            .filter(|(at, _)| at.elapsed() < FAILURE_MEMORY);
        if let Some(e) = self.cache.get(oid) {
            let age = e.fetched.elapsed();
            if age < self.ttl {
                if age >= self.ttl / 4 * 3 && recent_failure.is_none() {
                    // Refresh off the request path; this request uses what is cached.
                    drop(self.flight(oid, app_only));
                }
                self.count("cached");
                return Membership::Resolved(e.groups);
            }
        }
        if let Some((_, why)) = recent_failure {
            self.count("unresolved");
            return Membership::Unresolved(why);
        }
        let mut flight = self.flight(oid, app_only);
        let outcome = tokio::time::timeout(self.timeout, async {
            match flight.wait_for(Option::is_some).await {
                Ok(v) => v
                    .clone()
                    .unwrap_or_else(|| Err("group resolution failed".into())),
                Err(_) => Err("group resolution failed".into()),
            }
        })
        .await;
        match outcome {
            Ok(Ok(groups)) => {
                self.count("resolved");
                Membership::Resolved(groups)
            }
            Ok(Err(why)) => {
                self.count("unresolved");
                Membership::Unresolved(why)
            }
            Err(_) => {
                self.count("unresolved");
                Membership::Unresolved(
                    format!("Microsoft Graph did not answer within {:?}", self.timeout).into(),
                )
            }
        }
    }

    /// The one fetch in flight for `oid`, started if there is none. It runs as a task of its
    /// own: callers may stop waiting without cancelling it.
    fn flight(self: &Arc<Self>, oid: &str, app_only: bool) -> Flight {
        let mut inflight = self.inflight.lock();
        if let Some(f) = inflight.get(oid) {
            return f.clone();
        }
        let this = self.clone();
        let key = oid.to_owned();
        let (tx, rx) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let result = match tokio::time::timeout(this.timeout, this.fetch(&key, app_only)).await
            {
                Ok(r) => r,
                Err(_) => {
                    Err(format!("Microsoft Graph did not answer within {:?}", this.timeout).into())
                }
            };
            match &result {
                Ok(groups) => {
                    this.cache.insert(
                        key.clone(),
                        Entry {
                            groups: groups.clone(),
                            fetched: Instant::now(),
                        },
                    );
                    this.failed.remove(&key);
                }
                Err(why) => this
                    .failed
                    .insert(key.clone(), (Instant::now(), why.clone())),
            }
            this.inflight.lock().remove(&key);
            tx.send_replace(Some(result));
        });
        inflight.insert(oid.to_owned(), rx.clone());
        rx
    }

    /// Asks Graph which of the rules' groups `oid` is a (transitive) member of.
    async fn fetch(&self, oid: &str, app_only: bool) -> FetchResult {
        if let Some(until) = *self.throttled_until.lock() {
            let now = Instant::now();
            if until > now {
                return Err(format!(
                    "Microsoft Graph is throttling the relay for another {} s (429 Retry-After)",
                    (until - now).as_secs().max(1)
                )
                .into());
            }
        }
        let auth = self.authorization().await?;
        // Delegated tokens name users; app-only tokens name service principals.
        let kind = if app_only {
            "servicePrincipals"
        } else {
            "users"
        };
        let mut member = Vec::new();
        for chunk in self.group_ids.chunks(IDS_PER_CALL) {
            member.extend(
                self.check_member_groups(&auth, kind, oid, chunk)
                    .await
                    .map_err(|e| Arc::<str>::from(e.message))?,
            );
        }
        Ok(member.into())
    }

    async fn authorization(&self) -> Result<http::HeaderValue, Arc<str>> {
        self.token.authorization().await.map_err(|e| {
            self.count_call("credential_error");
            Arc::<str>::from(format!("the relay's credential for Microsoft Graph: {e}"))
        })
    }

    /// One `checkMemberGroups` call (at most [`IDS_PER_CALL`] ids): the ids of `chunk` the
    /// object is a member of. A 429 also sets the Retry-After pause.
    async fn check_member_groups(
        &self,
        auth: &http::HeaderValue,
        kind: &str,
        oid: &str,
        chunk: &[String],
    ) -> Result<Vec<String>, CallError> {
        let url = format!("{}/v1.0/{kind}/{oid}/checkMemberGroups", self.graph_host);
        let failed = |status: Option<StatusCode>, message: String| CallError { status, message };
        let body = serde_json::to_vec(&serde_json::json!({ "groupIds": chunk }))
            .map_err(|e| failed(None, e.to_string()))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(header::AUTHORIZATION, auth.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(body)
            .map_err(|e| failed(None, format!("building the Graph request: {e}")))?;
        let resp = self.http.send(req).await.map_err(|e| {
            self.count_call("transport_error");
            failed(None, format!("Microsoft Graph: {e}"))
        })?;
        match resp.status() {
            StatusCode::OK => {
                self.count_call("ok");
                let answer: CheckMemberGroups =
                    serde_json::from_slice(resp.body()).map_err(|e| {
                        failed(
                            Some(StatusCode::OK),
                            format!("Microsoft Graph sent an unexpected answer: {e}"),
                        )
                    })?;
                // Only ids that were asked about count, whatever the answer lists.
                Ok(answer
                    .value
                    .into_iter()
                    .map(|g| g.to_ascii_lowercase())
                    .filter(|g| chunk.contains(g))
                    .collect())
            }
            StatusCode::TOO_MANY_REQUESTS => {
                self.count_call("throttled");
                let wait = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs)
                    .min(MAX_RETRY_AFTER);
                *self.throttled_until.lock() = Some(Instant::now() + wait);
                Err(failed(
                    Some(StatusCode::TOO_MANY_REQUESTS),
                    format!(
                        "Microsoft Graph is throttling the relay (429, Retry-After {} s)",
                        wait.as_secs()
                    ),
                ))
            }
            status => {
                self.count_call("error");
                let detail = serde_json::from_slice::<GraphErrorBody>(resp.body())
                    .map(|b| format!("{}: {}", b.error.code, b.error.message))
                    .unwrap_or_default();
                Err(failed(
                    Some(status),
                    format!("Microsoft Graph answered HTTP {} {detail}", status.as_u16())
                        .trim_end()
                        .to_owned(),
                ))
            }
        }
    }

    /// `kube-relay doctor`: one `checkMemberGroups` call for an object that does not exist.
    /// Graph's 404 `Request_ResourceNotFound` (or a 200) proves the relay's token is accepted
    /// and allowed to read memberships; 401/403 name what is missing.
    async fn probe(&self) -> Result<String, String> {
        let auth = self.authorization().await.map_err(|e| e.to_string())?;
        let ids: Vec<String> = self.group_ids.iter().take(IDS_PER_CALL).cloned().collect();
        if ids.is_empty() {
            return Ok("no access rule names a group by object id: Graph is never asked".into());
        }
        match self
            .check_member_groups(&auth, "users", NIL_OBJECT_ID, &ids)
            .await
        {
            Ok(_) => Ok(format!(
                "{}: token accepted, checkMemberGroups answered",
                self.graph_host
            )),
            Err(CallError {
                status: Some(StatusCode::NOT_FOUND),
                ..
            }) => Ok(format!(
                "{}: token accepted, checkMemberGroups answered (404 for a probe object, as expected); {} group id(s) to ask about",
                self.graph_host,
                self.group_ids.len()
            )),
            Err(e) => Err(e.message),
        }
    }

    fn count_call(&self, result: &'static str) {
        self.metrics
            .graph_requests
            .get_or_create(&IssuerResultLabels {
                issuer: self.issuer.clone(),
                result,
            })
            .inc();
    }
}

/// A Graph call that did not answer with memberships.
struct CallError {
    status: Option<StatusCode>,
    message: String,
}

/// The object id `kube-relay doctor` asks about: no directory object has it.
const NIL_OBJECT_ID: &str = "00000000-0000-0000-0000-000000000000";

#[derive(Deserialize)]
struct CheckMemberGroups {
    value: Vec<String>,
}

#[derive(Deserialize)]
struct GraphErrorBody {
    error: GraphError,
}

#[derive(Deserialize)]
struct GraphError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}
