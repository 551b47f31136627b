//! Any text as a .narinfo: what parses must render to text that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tvix_boot_store::narinfo::NarInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(narinfo) = NarInfo::parse(text) else {
        return;
    };
    let again = NarInfo::parse(&narinfo.render()).expect("a rendered narinfo parses");
    assert_eq!(again, narinfo, "render and parse disagree");
});
