//! The documents the relay serves and the CLI reads, in one place so the two cannot drift:
//! how to sign in ([`login`]), the caller's cluster list ([`clusters`]) and the kubeconfig built
//! from it ([`kubeconfig`]). Plain data and pure functions: no I/O, nothing from the server or
//! the CLI.

pub mod clusters;
pub mod kubeconfig;
pub mod login;
