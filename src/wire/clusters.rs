//! `GET /-/clusters`: who the caller is and the clusters they may use, as the relay serves it
//! and `kube-relay kubeconfig` reads it.

use serde::{Deserialize, Serialize};

use super::login::LoginParams;

/// `GET /-/clusters`: who the caller is and the clusters they may use.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterList {
    pub api_version: String,
    pub kind: String,
    pub user: ListUser,
    pub relay: RelayInfo,
    /// How to sign in (absent when the relay has no `login` section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<LoginParams>,
    pub clusters: Vec<ClusterEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListUser {
    pub username: String,
    pub issuer: String,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayInfo {
    pub public_url: String,
    /// Base64 of the PEM CA behind the relay's certificate, when it is private.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority_data: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEntry {
    pub name: String,
    /// Path style: `<public_url><path_prefix>/<name>`.
    pub server: String,
    /// SNI style: `https://<name>.<host_suffix>[:port]` (when the relay has a host suffix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni_server: Option<String>,
    /// `<name>.<host_suffix>`: set with the path-style server so SNI still names the cluster
    /// when `kubectl get --raw` drops the path (docs/architecture.md "Routing").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// `passthrough`, `impersonate` or `on_behalf_of`: passthrough clusters need a token for
    /// their own audience.
    pub upstream_auth: String,
    /// Verbs the relay admits (`None`: all).
    pub verbs: Option<Vec<String>>,
    /// Namespaces the relay admits (`None`: all).
    pub namespaces: Option<Vec<String>>,
    /// Conditional Access authentication contexts some of the caller's rules require
    /// (step-up): `kube-relay kubeconfig` writes a `<name>@<context>` context for each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth_contexts: Vec<String>,
    /// The relay's last health probe reached the cluster.
    pub healthy: bool,
}
