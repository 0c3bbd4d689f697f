//! The end-to-end suite, as one test binary (linked once): a module per story, one support
//! library (`tests/support`). Two stories keep binaries of their own because they need the
//! process to themselves: `tests/attacks.rs` measures the process's CPU time, and
//! `tests/credentials_mi.rs` sets the process environment that Azure's managed identity reads.
// A test binary has no outside users, so `pub` in its support code means "shared here".
#![allow(unreachable_pub)]
// Test code may use std locks: poisoning there only fails the test that panicked.
#![allow(clippy::disallowed_types)]

#[path = "../support/mod.rs"]
mod support;

mod architecture;
mod audit_sink;
mod bench_harness;
mod browser;
mod clients;
mod credentials;
mod deploy;
mod dev_login;
mod dev_process;
mod doctor;
mod faults;
mod fuzz_corpus;
mod hub_spoke;
mod identity;
mod kubectl;
mod lifecycle;
mod obo_e2e;
mod oidc_provider;
mod overage;
mod portal;
mod real_apiserver;
mod real_behaviour;
mod real_fidelity;
mod real_modes;
mod recording;
mod relay;
mod relay_pages;
mod slow_readers;
mod terminal;
mod token;

/// The support library's relay YAML builder writes what a user would (one binary runs it).
#[test]
fn builds_the_yaml_a_user_would_write() {
    let y = support::yaml::RelayYaml::new("https://localhost")
        .top("routing: {host_suffix: relay.test}")
        .issuer(support::yaml::contoso(
            "https://127.0.0.1:1",
            "ca.crt",
            "api://kube-relay",
            "required_scopes: [s]",
        ))
        .cluster(
            "name: a\nserver: https://a.test\nca_file: ca.crt\nupstream_auth: {mode: passthrough}",
        )
        .build();
    assert_eq!(
        y,
        format!(
            "listen: 127.0.0.1:0\npublic_url: https://localhost\n\
             tls: {{cert_file: relay.crt, key_file: relay.key}}\nrouting: {{host_suffix: relay.test}}\n\
             identity:\n  issuers:\n    - name: contoso\n      kind: entra\n      tenant_id: {tid}\n      \
             authority_host: https://127.0.0.1:1\n      ca_file: ca.crt\n      audiences: [api://kube-relay]\n      \
             required_scopes: [s]\n\
             clusters:\n  - name: a\n    server: https://a.test\n    ca_file: ca.crt\n    upstream_auth: {{mode: passthrough}}\n",
            tid = support::tenant::TID
        )
    );
}
