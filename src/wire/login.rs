//! How to sign in to a relay, in the two forms server and CLI share: the relay's public
//! parameters ([`LoginParams`], served at `/-/login-config` and inside `/-/clusters`) and the
//! `kube-relay token` flags that reproduce a sign-in in a kubeconfig exec entry ([`LoginArgs`];
//! the portal's kubeconfig download writes the same flags the CLI does).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The public Entra authority.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// Human sign-ins give up after this by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

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

/// The `claims` request parameter that asks Entra for a token carrying the Conditional Access
/// authentication context `ctx` in `acrs`: `{"access_token":{"acrs":{"essential":true,"value":"<ctx>"}}}`.
/// The relay's step-up challenge carries it and `kube-relay token --auth-context` sends it.
pub fn step_up_claims(ctx: &str) -> String {
    serde_json::json!({"access_token": {"acrs": {"essential": true, "value": ctx}}}).to_string()
}

/// [`step_up_claims`] base64-encoded (standard alphabet, padded), as in Entra's
/// `WWW-Authenticate: Bearer error="insufficient_claims", claims="..."` challenges.
pub fn step_up_claims_b64(ctx: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(step_up_claims(ctx))
}

// === flags ===

/// How to get a token.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoginMode {
    /// Sign in with the browser (authorization code + PKCE, redirect to 127.0.0.1); for people.
    #[default]
    Browser,
    /// Sign in on another device with a code (RFC 8628); for people on SSH or headless hosts.
    Devicecode,
    /// Ask the Azure CLI for a token for the signed-in `az` account (`az login` first).
    Azurecli,
    /// A service principal with a client secret (--client-secret[-file] or AZURE_CLIENT_SECRET).
    Secret,
    /// Federated workload identity: a token file (AZURE_FEDERATED_TOKEN_FILE), else GitHub
    /// Actions OIDC, else an Azure DevOps service connection, exchanged at Entra.
    Workloadidentity,
    /// The Azure managed identity of this host (IDENTITY_ENDPOINT, else IMDS).
    Msi,
    /// GitHub Actions' own OIDC token for --audience, for relays that trust GitHub directly.
    Github,
}

impl LoginMode {
    /// Browser and device code need a person; the others run unattended.
    pub fn needs_human(self) -> bool {
        matches!(self, Self::Browser | Self::Devicecode)
    }

    /// The `--login` value of this mode.
    pub fn name(self) -> &'static str {
        match self {
            Self::Browser => "browser",
            Self::Devicecode => "devicecode",
            Self::Azurecli => "azurecli",
            Self::Secret => "secret",
            Self::Workloadidentity => "workloadidentity",
            Self::Msi => "msi",
            Self::Github => "github",
        }
    }
}

/// Every flag that says how to sign in. Shared by `kube-relay token` and `kube-relay kubeconfig`.
/// Debug never prints the client secret.
#[derive(clap::Args, Clone, PartialEq, Eq)]
pub struct LoginArgs {
    /// How to get a token (see the modes below).
    #[arg(long, value_enum, env = "KUBE_RELAY_LOGIN", default_value_t = LoginMode::Browser)]
    pub login: LoginMode,
    /// Generic OIDC: the issuer URL; endpoints come from its discovery document.
    #[arg(long, conflicts_with_all = ["tenant_id", "authority_host"])]
    pub issuer: Option<String>,
    /// Entra: the tenant (GUID or domain). For secret and workloadidentity also AZURE_TENANT_ID
    /// or AZURESUBSCRIPTION_TENANT_ID.
    #[arg(long)]
    pub tenant_id: Option<String>,
    /// Entra: the authority host [default: https://login.microsoftonline.com].
    #[arg(long)]
    pub authority_host: Option<String>,
    /// The application (client) id to sign in as. For secret and workloadidentity also
    /// AZURE_CLIENT_ID or AZURESUBSCRIPTION_CLIENT_ID.
    #[arg(long)]
    pub client_id: Option<String>,
    /// A scope to request (repeatable), e.g. `api://kube-relay/.default`.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Resource indicator (RFC 8707). With --issuer it is sent on the authorization and token
    /// requests; with Entra it only sets the default scope `<resource>/.default`.
    #[arg(long)]
    pub resource: Option<String>,
    /// Client secret (secret mode). Prefer --client-secret-file or AZURE_CLIENT_SECRET: command
    /// lines are visible to other users.
    #[arg(long, env = "AZURE_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// File holding the client secret (secret mode).
    #[arg(long)]
    pub client_secret_file: Option<PathBuf>,
    /// Federated token file (workloadidentity mode), e.g. a projected service account token.
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE")]
    pub federated_token_file: Option<PathBuf>,
    /// Azure DevOps service connection id (workloadidentity mode in Azure Pipelines).
    #[arg(long, env = "AZURESUBSCRIPTION_SERVICE_CONNECTION_ID")]
    pub azure_pipelines_service_connection_id: Option<String>,
    /// Client id of a user-assigned managed identity (msi mode); default: system-assigned.
    #[arg(long)]
    pub identity_client_id: Option<String>,
    /// Audience of the GitHub Actions OIDC token (github mode), e.g. `api://kube-relay`.
    #[arg(long)]
    pub audience: Option<String>,
    /// Token cache directory [default: $KUBECACHEDIR, else ~/.kube/cache/kube-relay].
    #[arg(long, env = "KUBECACHEDIR")]
    pub cache_dir: Option<PathBuf>,
    /// An extra CA (PEM) to trust for the identity provider, beside the public ones.
    #[arg(long, env = "KUBE_RELAY_IDP_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// How long a browser or device code sign-in may take.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub timeout: Duration,
    /// Print the sign-in URL instead of opening a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// Step-up: ask for a token carrying this Conditional Access authentication context (e.g.
    /// c1), for clusters whose rules require it. The sign-in (browser or device code) sends
    /// Entra's `claims` request; the token is cached apart from the plain one.
    #[arg(long, value_name = "ID")]
    pub auth_context: Option<String>,
}

impl std::fmt::Debug for LoginArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginArgs")
            .field("login", &self.login)
            .field("issuer", &self.issuer)
            .field("tenant_id", &self.tenant_id)
            .field("authority_host", &self.authority_host)
            .field("client_id", &self.client_id)
            .field("scopes", &self.scopes)
            .field("resource", &self.resource)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("federated_token_file", &self.federated_token_file)
            .field(
                "azure_pipelines_service_connection_id",
                &self.azure_pipelines_service_connection_id,
            )
            .field("identity_client_id", &self.identity_client_id)
            .field("audience", &self.audience)
            .field("cache_dir", &self.cache_dir)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("no_browser", &self.no_browser)
            .field("auth_context", &self.auth_context)
            .finish()
    }
}

impl Default for LoginArgs {
    fn default() -> Self {
        Self {
            login: LoginMode::Browser,
            issuer: None,
            tenant_id: None,
            authority_host: None,
            client_id: None,
            scopes: Vec::new(),
            resource: None,
            client_secret: None,
            client_secret_file: None,
            federated_token_file: None,
            azure_pipelines_service_connection_id: None,
            identity_client_id: None,
            audience: None,
            cache_dir: None,
            ca_file: None,
            timeout: DEFAULT_TIMEOUT,
            no_browser: false,
            auth_context: None,
        }
    }
}

impl LoginArgs {
    /// A browser login for a relay's `/-/login-config`; `passthrough` asks for the scopes of
    /// clusters in passthrough mode (their own audience) instead of the relay's.
    pub fn from_params(p: &LoginParams, passthrough: bool) -> Self {
        let entra = p.kind == "entra";
        Self {
            login: LoginMode::Browser,
            issuer: if entra { None } else { p.issuer.clone() },
            tenant_id: if entra { p.tenant_id.clone() } else { None },
            authority_host: if entra {
                p.authority_host
                    .clone()
                    .filter(|h| h.trim_end_matches('/') != DEFAULT_AUTHORITY_HOST)
            } else {
                None
            },
            client_id: Some(p.client_id.clone()),
            scopes: if passthrough {
                p.passthrough_scopes.clone()
            } else {
                p.scopes.clone()
            },
            // The resource names the relay's audience; passthrough clusters have their own.
            resource: if passthrough {
                None
            } else {
                p.resource.clone()
            },
            ..Self::default()
        }
    }

    /// The arguments after `token` that reproduce this login in a kubeconfig exec entry. Never
    /// a secret: `--client-secret` is left out (secret mode reads AZURE_CLIENT_SECRET or a file).
    pub fn to_exec_args(&self) -> Vec<String> {
        let mut a = vec!["--login".to_owned(), self.login.name().to_owned()];
        let mut push = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(format!("--{flag}"));
                a.push(v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        push("issuer", self.issuer.clone());
        push("tenant-id", self.tenant_id.clone());
        push("authority-host", self.authority_host.clone());
        push("client-id", self.client_id.clone());
        for s in &self.scopes {
            push("scope", Some(s.clone()));
        }
        push("resource", self.resource.clone());
        push("client-secret-file", path(&self.client_secret_file));
        push("federated-token-file", path(&self.federated_token_file));
        push(
            "azure-pipelines-service-connection-id",
            self.azure_pipelines_service_connection_id.clone(),
        );
        push("identity-client-id", self.identity_client_id.clone());
        push("audience", self.audience.clone());
        push("cache-dir", path(&self.cache_dir));
        push("ca-file", path(&self.ca_file));
        if self.timeout != DEFAULT_TIMEOUT {
            push(
                "timeout",
                Some(humantime::format_duration(self.timeout).to_string()),
            );
        }
        push("auth-context", self.auth_context.clone());
        if self.no_browser {
            a.push("--no-browser".to_owned());
        }
        a
    }
}
