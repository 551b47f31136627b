//! Any bytes as a store path basename and as an absolute path: what parses must print back
//! as the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tvix_boot_store::StorePath;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = StorePath::from_basename_bytes(data) {
        assert_eq!(path.to_basename().as_bytes(), data);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((path, rest)) = StorePath::from_absolute_path(text) {
            assert_eq!(format!("{}{rest}", path.to_absolute_path()), text);
        }
    }
});
