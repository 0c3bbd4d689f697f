//! `kube-relay token`: a client-go exec credential plugin (`client.authentication.k8s.io/v1`),
//! and the sign-in code `kube-relay kubeconfig` shares with it.

use std::process::ExitCode;

pub mod http;

use serde::{Deserialize, Serialize};

/// What a client needs to sign in to a relay; served publicly at `/-/login-config` and built
/// from the `login` section of the relay's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LoginParams {
    /// `entra` or `oidc`.
    pub kind: String,
    /// OIDC: the issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Entra: the tenant and authority host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_host: Option<String>,
    /// The public client `kube-relay token` signs in as (browser, device code).
    pub client_id: String,
    /// Scopes for a token this relay accepts.
    pub scopes: Vec<String>,
    /// RFC 8707 resource indicator, when the provider picks the audience by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Scopes for clusters in passthrough mode (their own audience).
    pub passthrough_scopes: Vec<String>,
}

/// How to sign in (shared by `kube-relay token` and `kube-relay kubeconfig`).
/// NOTE for the implementer: `kube-relay kubeconfig` (src/kubeconfig.rs) and the portal
/// (src/portal/api.rs) use `from_params`, `to_exec_args`, `set_mode`, the `ca_file` and
/// `cache_dir` fields, `get_token` and `Token`: keep these names.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LoginArgs {
    /// Extra CA for the identity provider (PEM).
    #[arg(long, env = "KUBE_RELAY_IDP_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Token cache directory.
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
}

impl LoginArgs {
    /// Browser sign-in with the relay's published settings; `passthrough` picks the scopes for
    /// clusters that receive the caller's own token.
    pub fn from_params(_p: &LoginParams, _passthrough: bool) -> Self {
        Self::default()
    }

    /// Selects the login mode by name (browser, devicecode, ...).
    pub fn set_mode(&mut self, _mode: &str) {}

    /// The arguments after `token` that reproduce this login in a kubeconfig (never secrets).
    pub fn to_exec_args(&self) -> Vec<String> {
        vec!["token".into()]
    }
}

/// An access token and when it expires.
pub struct Token {
    pub access_token: String,
    pub expires_at: std::time::SystemTime,
}

/// A token for `args`: from the cache, refreshed, or by signing in.
pub async fn get_token(_args: &LoginArgs, _interactive: bool) -> anyhow::Result<Token> {
    anyhow::bail!("not implemented yet")
}

/// `kube-relay token` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenArgs {}

/// Runs `kube-relay token`.
pub fn main(_args: TokenArgs) -> ExitCode {
    eprintln!("kube-relay token: not implemented yet");
    ExitCode::FAILURE
}
