//! The client-go exec credential wire format (docs/protocols.md §1.2): `KUBERNETES_EXEC_INFO` in,
//! one `ExecCredential` on stdout.

use std::time::SystemTime;

use serde::Deserialize;

pub(crate) const V1: &str = "client.authentication.k8s.io/v1";
pub(crate) const V1BETA1: &str = "client.authentication.k8s.io/v1beta1";

/// What kubectl told the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecInfo {
    /// Answer with the same version (client-go rejects another one).
    pub api_version: String,
    /// `spec.interactive`; `None` when the plugin was not started by client-go.
    pub interactive: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    api_version: Option<String>,
    #[serde(default)]
    spec: RawSpec,
}

#[derive(Deserialize, Default)]
struct RawSpec {
    interactive: Option<bool>,
}

impl ExecInfo {
    /// Parses the variable's value; absent or empty means "not run by client-go": v1, and the
    /// caller decides interactivity from stdin.
    pub(super) fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(Self {
                api_version: V1.to_owned(),
                interactive: None,
            });
        };
        let raw: Raw = serde_json::from_str(v)
            .map_err(|e| anyhow::anyhow!("KUBERNETES_EXEC_INFO is not valid JSON: {e}"))?;
        let api_version = match raw.api_version.as_deref() {
            None | Some("") => V1.to_owned(),
            Some(v @ (V1 | V1BETA1)) => v.to_owned(),
            Some(other) => anyhow::bail!(
                "KUBERNETES_EXEC_INFO asks for {other}; kube-relay token speaks {V1} and {V1BETA1}"
            ),
        };
        Ok(Self {
            api_version,
            interactive: raw.spec.interactive,
        })
    }
}

/// The ExecCredential JSON (one line) for `token`.
pub(crate) fn credential(api_version: &str, token: &str, expires_at: SystemTime) -> String {
    serde_json::json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": {
            "token": token,
            "expirationTimestamp": humantime::format_rfc3339_seconds(expires_at).to_string(),
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_interactivity() {
        let i = ExecInfo::parse(None).unwrap();
        assert_eq!((i.api_version.as_str(), i.interactive), (V1, None));
        let i = ExecInfo::parse(Some(
            r#"{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","spec":{"interactive":true}}"#,
        ))
        .unwrap();
        assert_eq!(
            (i.api_version.as_str(), i.interactive),
            (V1BETA1, Some(true))
        );
        let i = ExecInfo::parse(Some(
            r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","spec":{"interactive":false,"cluster":{"server":"https://x"}}}"#,
        ))
        .unwrap();
        assert_eq!(i.interactive, Some(false));
        assert!(
            ExecInfo::parse(Some(r#"{"apiVersion":"client.authentication.k8s.io/v2"}"#)).is_err()
        );
    }

    #[test]
    fn credential_shape() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_741_195_820);
        let v: serde_json::Value = serde_json::from_str(&credential(V1, "t", at)).unwrap();
        assert_eq!(v["kind"], "ExecCredential");
        assert_eq!(v["status"]["expirationTimestamp"], "2025-03-05T17:30:20Z");
    }
}
