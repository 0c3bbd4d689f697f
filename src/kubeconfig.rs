//! `kube-relay kubeconfig` and the kubeconfig documents the portal hands out.

use std::process::ExitCode;

/// `kube-relay kubeconfig` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeconfigArgs {}

/// Runs `kube-relay kubeconfig`.
pub fn main(_args: KubeconfigArgs) -> ExitCode {
    eprintln!("kube-relay kubeconfig: not implemented yet");
    ExitCode::FAILURE
}
