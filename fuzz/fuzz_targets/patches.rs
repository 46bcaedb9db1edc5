#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fairlead::fuzzing::patches(data));
