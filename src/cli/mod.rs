//! What runs on a user's machine, not in the relay: the exec credential plugin and its sign-in
//! flows (`kube-relay token`, [`login`]), kubeconfig generation and merging ([`kubeconfig`]),
//! the operator's pre-flight checks ([`doctor`], which calls the relay's own outbound stack so
//! it checks what the relay will do) and trial certificates ([`certs`]). Nothing on the request
//! path imports this module.

pub mod certs;
pub mod doctor;
pub mod kubeconfig;
pub mod login;
