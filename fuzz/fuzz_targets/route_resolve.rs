//! Fuzz target `route_resolve`: see `harness.rs` for the input layout and the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kube_relay_fuzz::route_resolve_bytes(data));
