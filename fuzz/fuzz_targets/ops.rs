//! `cargo fuzz run ops`: every input is one op call (arguments drawn from the bytes) on the
//! validation layer and the CPU backend, or a sequence of block-manager calls; see
//! `pagedattn::testing::fuzz` for the properties checked. A panic is a finding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = pagedattn::testing::fuzz::run(data);
});
