#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| txbus_fuzz::targets::stored(data));
