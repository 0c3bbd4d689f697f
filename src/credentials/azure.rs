//! The relay's own Azure identity (managed identity, workload identity, client secret) through
//! azure_identity, over the relay's outbound stack.

use super::*;

// === azure_identity ===

/// The relay's own Azure identity, for mode impersonate.
pub(super) struct AzureSource {
    pub(super) cred: Arc<dyn TokenCredential>,
    pub(super) scope: String,
    pub(super) cache: TokenCache<()>,
}

impl AzureSource {
    pub(super) fn new(cfg: &AzureCredentialConfig) -> anyhow::Result<Self> {
        let ep = &cfg.endpoint;
        let cred: Arc<dyn TokenCredential> = match &cfg.kind {
            AzureCredentialKind::ManagedIdentity => {
                managed_identity(cfg.client_id.as_deref(), ep.ca.as_deref())?
            }
            AzureCredentialKind::WorkloadIdentity {
                federated_token_file,
            } => {
                let options = azure_identity::WorkloadIdentityCredentialOptions {
                    credential_options: azure_identity::ClientAssertionCredentialOptions {
                        client_options: client_options(ep)?,
                    },
                    client_id: cfg.client_id.clone(),
                    tenant_id: ep.tenant_id.clone(),
                    token_file_path: Some(federated_token_file.clone()),
                };
                azure_identity::WorkloadIdentityCredential::new(Some(options))
                    .map_err(|e| anyhow::anyhow!("workload identity credential: {e}"))?
            }
            AzureCredentialKind::ClientSecret { secret } => {
                let tenant = ep
                    .tenant_id
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("client_secret needs tenant_id"))?;
                let client_id = cfg
                    .client_id
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("client_secret needs client_id"))?;
                let options = azure_identity::ClientSecretCredentialOptions {
                    client_options: client_options(ep)?,
                };
                azure_identity::ClientSecretCredential::new(
                    tenant,
                    client_id,
                    secret.expose().to_owned().into(),
                    Some(options),
                )
                .map_err(|e| anyhow::anyhow!("client secret credential: {e}"))?
            }
        };
        Ok(Self {
            cred,
            scope: ep.scope.clone(),
            cache: TokenCache::new(),
        })
    }

    pub(super) async fn authorization(self: &Arc<Self>) -> Result<HeaderValue, CredentialError> {
        let this = self.clone();
        self.cache
            .get(&(), move || async move {
                let t = this
                    .cred
                    .get_token(&[this.scope.as_str()], None)
                    .await
                    .map_err(|e| azure_error("azure credential", &e))?;
                let secs = (t.expires_on - azure_core::time::OffsetDateTime::now_utc())
                    .whole_seconds()
                    .max(0);
                Ok(Fetched {
                    value: bearer(t.token.secret())?,
                    expires_in: Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
                })
            })
            .await
    }
}

/// azure_identity errors name the endpoint and Entra's description, never the secret.
pub(super) fn azure_error(what: &str, e: &azure_core::Error) -> CredentialError {
    let text = e.to_string();
    if text.contains("AADSTS65001") {
        return CredentialError::ConsentRequired(format!("{what}: {text}"));
    }
    CredentialError::Unavailable(format!("{what}: {text}"))
}

pub(super) fn client_options(
    ep: &EntraEndpoint,
) -> anyhow::Result<azure_core::http::ClientOptions> {
    Ok(crate::net::azure::azure_client_options(
        ep.authority_host.as_str(),
        HyperTransport::new(ep.ca.as_deref())?,
    ))
}

/// The relay's managed identity. azure_identity picks the source from the environment
/// (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`, else IMDS at 169.254.169.254).
pub(super) fn managed_identity(
    client_id: Option<&str>,
    ca: Option<&[CertificateDer<'static>]>,
) -> anyhow::Result<Arc<dyn TokenCredential>> {
    crate::net::azure::managed_identity_over(client_id, HyperTransport::new(ca)?)
}
