//! `/-/clusters`, `/-/kubeconfig` and `/-/login-config`: what a caller may use and how to
//! reach it. The first two need a bearer token (as kubectl sends) or a portal session; the
//! last is public, so a CLI can find out how to sign in before it has a token.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::Principal;
use crate::body::RelayBody;
use crate::config::{IssuerKind, UpstreamAuth};
use crate::error::ProxyError;
use crate::state::ConnCtx;
use crate::state::State;
use crate::wire::clusters::{ClusterEntry, ClusterList, ListUser, RelayInfo};
use crate::wire::kubeconfig::{self, Options, Plugin, Style};
use crate::wire::login::{LoginArgs, LoginParams};

pub async fn handle(
    state: &State,
    conn: &ConnCtx,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<RelayBody>, ProxyError> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed(format!(
            "{path} supports GET only"
        )));
    }
    match path {
        "/-/login-config" => match login_params(state) {
            Some(p) => json(&p),
            None => Err(ProxyError::NotFound(
                "this relay has no `login` section: get a token from your identity provider and use kubectl --token, or ask the relay's operators".into(),
            )),
        },
        "/-/clusters" => {
            let p = caller(state, conn, req.headers()).await?;
            let membership = state.groups.membership(&p).await;
            json(&cluster_list(state, &p, &membership))
        }
        "/-/kubeconfig" => {
            let p = caller(state, conn, req.headers()).await?;
            let query = req.uri().query().unwrap_or_default();
            let style = match query_value(query, "style").as_deref() {
                None | Some("path") => Style::Path,
                Some("sni") => Style::Sni,
                Some(other) => {
                    return Err(ProxyError::BadRequest(format!(
                        "style={other}: expected path or sni"
                    )))
                }
            };
            let membership = state.groups.membership(&p).await;
            let list = cluster_list(state, &p, &membership);
            let opts = Options {
                style,
                plugin: Plugin::KubeRelay,
                exec_command: "kube-relay".into(),
                name_prefix: String::new(),
                relay_args: list
                    .login
                    .as_ref()
                    .map(|l| kubeconfig::token_args(&LoginArgs::from_params(l, false))),
                passthrough_args: list
                    .login
                    .as_ref()
                    .map(|l| kubeconfig::token_args(&LoginArgs::from_params(l, true))),
            };
            let doc = kubeconfig::build(&list, &opts).map_err(|e| {
                ProxyError::BadRequest(format!("cannot build a kubeconfig: {e:#}"))
            })?;
            let text = serde_yaml_ng::to_string(&doc)
                .map_err(|e| ProxyError::Internal(format!("kubeconfig YAML: {e}")))?;
            let filename = format!("{}.kubeconfig", state.cfg.public_host);
            let mut resp = body(text.into(), "application/yaml");
            resp.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&format!("attachment; filename=\"{filename}\""))
                    .unwrap_or(HeaderValue::from_static("attachment")),
            );
            Ok(resp)
        }
        _ => Err(ProxyError::NotFound(format!(
            "kube-relay has no page at {path}"
        ))),
    }
}

/// The caller: a bearer token if one is sent (kubectl, CLI), else the portal session.
async fn caller(
    state: &State,
    conn: &ConnCtx,
    h: &http::HeaderMap,
) -> Result<Arc<Principal>, ProxyError> {
    if !h.contains_key(header::AUTHORIZATION) {
        if let Some(p) = super::web::session_principal(state, h).await {
            return Ok(p);
        }
    }
    state.authenticate(conn.peer.ip(), h).await
}

/// The public sign-in settings, from the `login` section.
pub fn login_params(state: &State) -> Option<LoginParams> {
    let l = state.cfg.login.as_ref()?;
    let (kind, issuer, tenant_id, authority_host) = match &l.issuer.kind {
        IssuerKind::Oidc { issuer_str, .. } => ("oidc", Some(issuer_str.clone()), None, None),
        IssuerKind::Entra {
            tenant_id,
            authority_host,
            ..
        } => {
            let host = authority_host.as_str().trim_end_matches('/').to_owned();
            // The public cloud is the CLI's default: leave it out so the args stay short.
            let host = (host != crate::config::DEFAULT_AUTHORITY_HOST).then_some(host);
            ("entra", None, Some(tenant_id.clone()), host)
        }
    };
    Some(LoginParams {
        kind: kind.into(),
        issuer,
        tenant_id,
        authority_host,
        client_id: l.client_id.clone(),
        scopes: l.scopes.clone(),
        resource: l.resource.clone(),
        passthrough_scopes: l.passthrough_scopes.clone(),
    })
}

/// The clusters `p` may use (some access rule admits them), with both URL forms.
pub fn cluster_list(
    state: &State,
    p: &Principal,
    membership: &crate::authz::Membership,
) -> ClusterList {
    let cfg = &state.cfg;
    let public = cfg.public_url.as_str().trim_end_matches('/').to_owned();
    let port = cfg
        .public_url
        .port()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let clusters = cfg
        .clusters
        .iter()
        .filter_map(|c| {
            let perms = crate::authz::permissions(p, c, membership)?;
            let name = c.name.as_str();
            let sni_host = cfg
                .routing
                .host_suffix
                .as_ref()
                .map(|s| format!("{name}.{s}"));
            Some(ClusterEntry {
                name: name.to_owned(),
                server: format!("{public}{}/{name}", cfg.routing.path_prefix),
                sni_server: sni_host.as_ref().map(|h| format!("https://{h}{port}")),
                tls_server_name: sni_host,
                upstream_auth: match c.upstream_auth {
                    UpstreamAuth::Passthrough => "passthrough",
                    UpstreamAuth::Impersonate(_) => "impersonate",
                    UpstreamAuth::OnBehalfOf(_) => "on_behalf_of",
                }
                .into(),
                verbs: perms.verbs,
                namespaces: perms.namespaces,
                auth_contexts: perms.auth_contexts,
                healthy: state.upstreams.get(name).is_some_and(|u| u.health.is_up()),
            })
        })
        .collect();
    ClusterList {
        api_version: "kube-relay.io/v1".into(),
        kind: "ClusterList".into(),
        user: ListUser {
            username: p.username.clone(),
            issuer: p.issuer.to_string(),
            groups: p.groups.to_vec(),
        },
        relay: RelayInfo {
            public_url: public,
            certificate_authority_data: cfg.public_ca_pem.as_deref().map(kubeconfig::ca_data),
        },
        login: login_params(state),
        clusters,
    }
}

fn query_value(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn json<T: serde::Serialize>(v: &T) -> Result<Response<RelayBody>, ProxyError> {
    let bytes = serde_json::to_vec(v).map_err(|e| ProxyError::Internal(format!("JSON: {e}")))?;
    Ok(body(bytes.into(), "application/json"))
}

fn body(b: Bytes, content_type: &'static str) -> Response<RelayBody> {
    let mut r = Response::new(crate::body::full(b));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Per-user answers: never cached by browsers or proxies.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}
