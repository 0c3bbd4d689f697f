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
mod portal;
mod real_apiserver;
mod real_behaviour;
mod real_fidelity;
mod real_modes;
mod relay;
mod relay_pages;
mod token;
