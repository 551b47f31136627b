//! Any byte string as a NAR: ingest it into a memory store. The parser accepts only
//! canonical NARs (sorted entries, exact padding, no trailing data), so whatever it accepts
//! must render back to exactly the same bytes, with the hash and size it reported.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tvix_boot_store::Store;

fuzz_target!(|nar: &[u8]| {
    let store = Store::memory();
    let Ok(ingested) = store.ingest_nar(nar) else {
        return;
    };
    assert_eq!(
        ingested.nar_size,
        nar.len() as u64,
        "accepted trailing or missing bytes"
    );
    let mut rendered = Vec::new();
    store
        .write_nar(&ingested.node, &mut rendered)
        .expect("an ingested NAR renders");
    assert!(rendered == nar, "an accepted NAR renders back differently");
});
