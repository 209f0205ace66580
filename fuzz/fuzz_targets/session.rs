#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loka_stratum_fuzz::session(data));
