//! Kubelet mode: what a kubelet serves the API server on its port (10250 on a real node), so a
//! real kube-apiserver can proxy `exec`, `attach`, `port-forward` and `logs` to a simulated pod.
//!
//! | path | answer |
//! |---|---|
//! | `/exec/{ns}/{pod}[/{uid}]/{container}` | exec over SPDY (or WebSocket), as [`crate::stream::handle`] |
//! | `/attach/{ns}/{pod}[/{uid}]/{container}` | attach, likewise |
//! | `/portForward/{ns}/{pod}[/{uid}]` | port-forward over SPDY, every port an echo server |
//! | `/containerLogs/{ns}/{pod}/{container}` | the container's log, `follow`, `tailLines`, `timestamps`, `limitBytes` |
//! | `/healthz` | `ok` |
//!
//! The API server names the stream options the kubelet's way (`input`, `output`, `error`, `tty`,
//! each `1` when set and absent otherwise), not the way clients name them on `pods/exec`
//! (`stdin`, `stdout`, `stderr`); they are translated here so the session code is shared.
//!
//! Deliberate gaps: any pod name is accepted (the pod lives in the real API server, which has
//! already checked that it exists, is bound to this node and names the container), and the API
//! server's client certificate is not checked (a real kubelet would authorize it with a
//! SubjectAccessReview).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{bytes_response, rest, ApiError, Query, State};
use crate::stream::{StreamKind, StreamTarget};
use crate::Body;

pub(super) async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let stream = |kind, ns: &str, pod: &str, query: Option<String>| StreamTarget {
        kind,
        namespace: ns.to_owned(),
        pod: pod.to_owned(),
        query,
        files: state.files.clone(),
    };
    match segments.as_slice() {
        ["healthz"] => bytes_response(StatusCode::OK, "text/plain", "ok".into()),
        [verb @ ("exec" | "attach"), ns, pod, _container]
        | [verb @ ("exec" | "attach"), ns, pod, _, _container] => {
            let kind = if *verb == "exec" {
                StreamKind::Exec
            } else {
                StreamKind::Attach
            };
            let query = Some(client_form(req.uri().query().unwrap_or("")));
            let target = stream(kind, ns, pod, query);
            crate::stream::handle(req, target).await
        }
        ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
            let query = req.uri().query().map(str::to_owned);
            let target = stream(StreamKind::PortForward, ns, pod, query);
            crate::stream::handle(req, target).await
        }
        ["containerLogs", _ns, pod, _container] if req.method() == Method::GET => {
            let q = Query::parse(req.uri().query());
            rest::container_log(state, pod, &q, |_| true)
        }
        _ => ApiError::path_not_found().into_response(),
    }
}

/// Rewrites the kubelet's stream options (`input`, `output`, `error`; absent means off) into
/// the `pods/exec` form the session code reads (`stdin`, `stdout`, `stderr`; absent `stdout`
/// and `stderr` mean on), keeping every other pair (`command`, `tty`) byte for byte.
fn client_form(raw: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut seen = [false; 3];
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let renamed = match key {
            "input" => Some((0, "stdin")),
            "output" => Some((1, "stdout")),
            "error" => Some((2, "stderr")),
            _ => None,
        };
        match renamed {
            Some((i, name)) => {
                seen[i] = true;
                // The kubelet treats exactly "1" as set.
                out.push(format!("{name}={}", if value == "1" { "1" } else { "0" }));
            }
            None => out.push(pair.to_owned()),
        }
    }
    for (i, name) in ["stdin", "stdout", "stderr"].iter().enumerate() {
        if !seen[i] {
            out.push(format!("{name}=0"));
        }
    }
    out.join("&")
}

#[cfg(test)]
mod tests {
    use super::client_form;

    #[test]
    fn kubelet_stream_options_become_client_options() {
        assert_eq!(
            client_form("command=echo&command=hi%20there&input=1&output=1&tty=1"),
            "command=echo&command=hi%20there&stdin=1&stdout=1&tty=1&stderr=0"
        );
        // Absent means off on the kubelet, unlike on pods/exec.
        assert_eq!(
            client_form("command=true"),
            "command=true&stdin=0&stdout=0&stderr=0"
        );
        assert_eq!(
            client_form("error=0&output=true"),
            "stderr=0&stdout=0&stdin=0"
        );
    }
}
