//! The unattended modes: Azure CLI, client secret, workload identity and managed identity via
//! azure_identity (over the relay's hyper + rustls transport, src/credentials.rs), and the
//! GitHub Actions OIDC token as is.
//!
//! Workload identity finds its assertion in this order: a federated token file (Kubernetes,
//! `AZURE_FEDERATED_TOKEN_FILE`); GitHub Actions (`ACTIONS_ID_TOKEN_REQUEST_URL` + `_TOKEN`);
//! an Azure DevOps service connection (`SYSTEM_OIDCREQUESTURI` + `SYSTEM_ACCESSTOKEN`). The
//! assertion is fetched once by us and handed to azure_identity's ClientAssertionCredential, so
//! all three go through the same token request.

use std::sync::Arc;

use anyhow::Context as _;
use azure_core::credentials::TokenCredential;
use http::{header, Method, Request, StatusCode};
use rustls_pki_types::CertificateDer;
use serde::Deserialize;

use super::cache::{unix_now, Stored};
use super::{Authority, LoginArgs, LoginMode, Plan, TOKEN_EXCHANGE_AUDIENCE};
use crate::net::azure::HyperTransport;
use crate::net::azure::{azure_client_options, managed_identity_over};
use crate::net::idp::IdpHttp;

/// What to do next for the Entra errors people hit most (matched on the AADSTS code or the
/// OAuth error in `text`).
pub(crate) fn hint(text: &str) -> Option<&'static str> {
    const HINTS: &[(&str, &str)] = &[
        ("AADSTS65001", "an admin must grant consent for this app to the relay's API (Entra admin center > Enterprise applications > the app > Permissions > Grant admin consent), or the app must list the relay's API permission"),
        ("AADSTS50076", "multi-factor authentication is required: sign in again in a terminal (--login browser or devicecode)"),
        ("AADSTS50079", "multi-factor authentication registration is required: sign in again in a terminal (--login browser or devicecode)"),
        ("interaction_required", "sign in again in a terminal (--login browser or devicecode)"),
        ("AADSTS700016", "the application (--client-id) was not found in this tenant: check --client-id and --tenant-id"),
        ("AADSTS90002", "the tenant was not found: check --tenant-id (and --authority-host for sovereign clouds)"),
        ("AADSTS7000215", "the client secret is wrong: check --client-secret-file / AZURE_CLIENT_SECRET (secrets expire: create a new one in the app registration)"),
        ("AADSTS7000222", "the client secret has expired: create a new one in the app registration"),
        ("AADSTS700211", "Entra has no federated credential matching this token: on the app registration, add a federated credential with this token's issuer, subject and audience api://AzureADTokenExchange"),
        ("AADSTS700213", "Entra has no federated credential matching this token's subject: check the federated credential's subject (repo, branch, environment or service account)"),
        ("AADSTS70021", "Entra has no federated credential matching this token: check the federated credential's issuer, subject and audience"),
        ("AADSTS500011", "the relay's API (the resource in --scope) was not found in this tenant: check --scope"),
        ("AADSTS70011", "the scope is not valid: check --scope (app-only logins need <api>/.default)"),
        ("AADSTS50105", "you are not assigned to this application: ask an administrator for access"),
        ("AADSTS53003", "Conditional Access blocked the sign-in: use --login browser on a compliant device"),
        ("Please run 'az login'", "the Azure CLI is not signed in: run `az login` (with --tenant if needed) and retry"),
        ("az login", "the Azure CLI is not signed in: run `az login` and retry"),
        ("az not found", "the Azure CLI is not installed (or not on PATH): install it, or use another --login"),
        ("wasn't found on PATH", "the Azure CLI is not installed (or not on PATH): install it, or use another --login"),
        ("invalid_client", "the client credential was refused: check --client-id and the secret or federated credential"),
    ];
    HINTS
        .iter()
        .find(|(needle, _)| text.contains(needle))
        .map(|(_, h)| *h)
}

fn with_hint(what: &str, e: &azure_core::Error) -> anyhow::Error {
    let text = e.to_string();
    match hint(&text) {
        Some(h) => anyhow::anyhow!("{what}: {text}\n{h}"),
        None => anyhow::anyhow!("{what}: {text}"),
    }
}

pub(crate) async fn acquire(
    plan: &Plan,
    args: &LoginArgs,
    http: &IdpHttp,
    extra_ca: &[CertificateDer<'static>],
) -> anyhow::Result<Stored> {
    let host = match &plan.authority {
        Authority::Entra { host, .. } => host.clone(),
        _ => args
            .authority_host
            .clone()
            .unwrap_or_else(|| super::DEFAULT_AUTHORITY_HOST.to_owned()),
    };
    let tenant = match &plan.authority {
        Authority::Entra { tenant, .. } => Some(tenant.clone()),
        _ => None,
    };
    let options = || -> anyhow::Result<azure_core::http::ClientOptions> {
        Ok(azure_client_options(
            &host,
            HyperTransport::with_extra_roots(extra_ca)?,
        ))
    };
    let (what, cred): (&str, Arc<dyn TokenCredential>) = match plan.mode {
        LoginMode::Azurecli => (
            "Azure CLI",
            azure_identity::AzureCliCredential::new(Some(
                azure_identity::AzureCliCredentialOptions {
                    tenant_id: tenant,
                    ..Default::default()
                },
            ))
            .map_err(|e| with_hint("Azure CLI", &e))?,
        ),
        LoginMode::Secret => {
            let secret = client_secret(args)?;
            (
                "client secret",
                azure_identity::ClientSecretCredential::new(
                    tenant.as_deref().unwrap_or_default(),
                    plan.client_id.clone(),
                    secret.into(),
                    Some(azure_identity::ClientSecretCredentialOptions {
                        client_options: options()?,
                    }),
                )
                .map_err(|e| with_hint("client secret", &e))?,
            )
        }
        LoginMode::Workloadidentity => {
            let (source, assertion) = federated_assertion(args, http).await?;
            let what = match source {
                Source::File => "workload identity (federated token file)",
                Source::GitHub => "workload identity (GitHub Actions)",
                Source::AzureDevOps => "workload identity (Azure DevOps)",
            };
            (
                what,
                azure_identity::ClientAssertionCredential::new(
                    tenant.unwrap_or_default(),
                    plan.client_id.clone(),
                    FixedAssertion(assertion),
                    Some(azure_identity::ClientAssertionCredentialOptions {
                        client_options: options()?,
                    }),
                )
                .map_err(|e| with_hint(what, &e))?,
            )
        }
        LoginMode::Msi => (
            "managed identity",
            managed_identity_over(
                args.identity_client_id.as_deref(),
                HyperTransport::with_extra_roots(extra_ca)?,
            )?,
        ),
        LoginMode::Github => {
            let audience = plan.scopes.first().context("--audience")?;
            let jwt = github_oidc(http, audience).await?;
            let expires_at = super::jwt_expiry(&jwt)
                .context("the GitHub Actions OIDC token has no exp claim")?;
            return Ok(Stored {
                access_token: jwt,
                expires_at,
                refresh_token: None,
            });
        }
        LoginMode::Browser | LoginMode::Devicecode => {
            anyhow::bail!("internal: human login in the unattended path")
        }
    };
    let scopes: Vec<&str> = plan.scopes.iter().map(String::as_str).collect();
    let t = cred
        .get_token(&scopes, None)
        .await
        .map_err(|e| with_hint(what, &e))?;
    let expires_at = u64::try_from(t.expires_on.unix_timestamp()).unwrap_or_else(|_| unix_now());
    Ok(Stored {
        access_token: t.token.secret().to_owned(),
        expires_at,
        refresh_token: None,
    })
}

fn client_secret(args: &LoginArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.client_secret_file {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading --client-secret-file {}", path.display()))?;
        let s = s.trim().to_owned();
        anyhow::ensure!(
            !s.is_empty(),
            "--client-secret-file {} is empty",
            path.display()
        );
        return Ok(s);
    }
    args.client_secret
        .clone()
        .filter(|s| !s.is_empty())
        .context(
        "--login secret needs a client secret: --client-secret-file FILE or AZURE_CLIENT_SECRET",
    )
}

/// An assertion fetched before the credential is built; never shown in Debug output.
struct FixedAssertion(String);

impl std::fmt::Debug for FixedAssertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FixedAssertion(..)")
    }
}

#[async_trait::async_trait]
impl azure_identity::ClientAssertion for FixedAssertion {
    async fn secret(
        &self,
        _: Option<azure_core::http::ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        Ok(self.0.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    File,
    GitHub,
    AzureDevOps,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The federated assertion for Entra, from the first source present.
async fn federated_assertion(args: &LoginArgs, http: &IdpHttp) -> anyhow::Result<(Source, String)> {
    if let Some(path) = &args.federated_token_file {
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("reading the federated token file {}", path.display()))?;
        let t = t.trim().to_owned();
        anyhow::ensure!(
            !t.is_empty(),
            "the federated token file {} is empty",
            path.display()
        );
        return Ok((Source::File, t));
    }
    if env_var("ACTIONS_ID_TOKEN_REQUEST_URL").is_some() {
        return Ok((
            Source::GitHub,
            github_oidc(http, TOKEN_EXCHANGE_AUDIENCE).await?,
        ));
    }
    if let Some(uri) = env_var("SYSTEM_OIDCREQUESTURI") {
        let access = env_var("SYSTEM_ACCESSTOKEN").context(
            "Azure DevOps: SYSTEM_ACCESSTOKEN is not set: map it into the step (`env: SYSTEM_ACCESSTOKEN: $(System.AccessToken)`)",
        )?;
        let conn = args.azure_pipelines_service_connection_id.clone().context(
            "Azure DevOps: no service connection: set --azure-pipelines-service-connection-id or AZURESUBSCRIPTION_SERVICE_CONNECTION_ID (the AzureCLI@2 task sets it)",
        )?;
        return Ok((
            Source::AzureDevOps,
            azure_devops_oidc(http, &uri, &access, &conn).await?,
        ));
    }
    anyhow::bail!(
        "no federated token: set AZURE_FEDERATED_TOKEN_FILE (or --federated-token-file), or run inside GitHub Actions with `permissions: id-token: write`, or in Azure Pipelines with a workload identity service connection"
    )
}

/// GitHub Actions' OIDC token for `audience`: GET `$ACTIONS_ID_TOKEN_REQUEST_URL&audience=…`
/// with the job's request token; the answer is `{"value": jwt}`.
async fn github_oidc(http: &IdpHttp, audience: &str) -> anyhow::Result<String> {
    const NO_ID_TOKEN: &str = "not running in GitHub Actions with an ID token: the workflow (or job) needs `permissions: id-token: write`";
    let base = env_var("ACTIONS_ID_TOKEN_REQUEST_URL").context(NO_ID_TOKEN)?;
    let bearer = env_var("ACTIONS_ID_TOKEN_REQUEST_TOKEN").context(NO_ID_TOKEN)?;
    let mut url = url::Url::parse(&base).context("ACTIONS_ID_TOKEN_REQUEST_URL is not a URL")?;
    url.query_pairs_mut().append_pair("audience", audience);
    let req = Request::builder()
        .method(Method::GET)
        .uri(url.as_str())
        .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
        .header(header::ACCEPT, "application/json")
        .body(Vec::new())?;
    #[derive(Deserialize)]
    struct Answer {
        value: String,
    }
    let a: Answer = send_json(http, req, "GitHub Actions OIDC token request").await?;
    Ok(a.value)
}

/// Azure DevOps' OIDC token for a service connection: POST
/// `$SYSTEM_OIDCREQUESTURI?api-version=7.1&serviceConnectionId=…` with the job's access token;
/// the answer is `{"oidcToken": jwt}`.
async fn azure_devops_oidc(
    http: &IdpHttp,
    uri: &str,
    access_token: &str,
    connection: &str,
) -> anyhow::Result<String> {
    let mut url = url::Url::parse(uri).context("SYSTEM_OIDCREQUESTURI is not a URL")?;
    url.query_pairs_mut()
        .append_pair("api-version", "7.1")
        .append_pair("serviceConnectionId", connection);
    let req = Request::builder()
        .method(Method::POST)
        .uri(url.as_str())
        .header(header::AUTHORIZATION, format!("Bearer {access_token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .body(Vec::new())?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Answer {
        oidc_token: String,
    }
    let a: Answer = send_json(http, req, "Azure DevOps OIDC token request").await?;
    Ok(a.oidc_token)
}

/// Sends `req` and parses a 200 JSON answer; errors name the status, never the body (it may
/// hold a token).
async fn send_json<T: serde::de::DeserializeOwned>(
    http: &IdpHttp,
    req: Request<Vec<u8>>,
    what: &str,
) -> anyhow::Result<T> {
    let resp = http.send(req).await.with_context(|| what.to_owned())?;
    match resp.status() {
        StatusCode::OK => {}
        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => anyhow::bail!(
            "{what}: HTTP {s}: the job's request token was refused (GitHub: `permissions: id-token: write`; Azure DevOps: the pipeline must be allowed to use the service connection)"
        ),
        s => anyhow::bail!("{what}: HTTP {s}"),
    }
    serde_json::from_slice(resp.body()).with_context(|| format!("{what}: unexpected answer"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hints_name_the_next_step() {
        assert!(super::hint(
            "invalid_grant: AADSTS65001: The user or administrator has not consented"
        )
        .unwrap()
        .contains("admin must grant consent"));
        assert!(
            super::hint("ERROR: Please run 'az login' to setup account.")
                .unwrap()
                .contains("run `az login`")
        );
        assert!(
            super::hint("AADSTS700211: No matching federated identity record")
                .unwrap()
                .contains("federated credential")
        );
        assert_eq!(super::hint("all fine"), None);
    }
}
