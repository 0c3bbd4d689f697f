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

/// `kube-relay token` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenArgs {}

/// Runs `kube-relay token`.
pub fn main(_args: TokenArgs) -> ExitCode {
    eprintln!("kube-relay token: not implemented yet");
    ExitCode::FAILURE
}
