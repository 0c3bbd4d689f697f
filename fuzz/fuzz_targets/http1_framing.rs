//! Fuzz target `http1_framing`: see `harness.rs` for the input layout and the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kube_relay_fuzz::http1_framing_bytes(data));
