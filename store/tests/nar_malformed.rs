//! Ingesting malformed NARs fails with a precise error and records nothing: no path info
//! may ever point at a half-ingested tree.

use tvix_boot_store::Store;
use tvix_boot_store::nar::NarError;

/// Builds NAR bytes token by token, so tests can write NARs a correct writer never would.
#[derive(Default)]
struct RawNar(Vec<u8>);

impl RawNar {
    fn str(mut self, token: &[u8]) -> Self {
        self.0
            .extend_from_slice(&(token.len() as u64).to_le_bytes());
        self.0.extend_from_slice(token);
        self.0.resize(self.0.len().next_multiple_of(8), 0);
        self
    }
    fn strs(self, tokens: &[&[u8]]) -> Self {
        tokens.iter().fold(self, |nar, t| nar.str(t))
    }
    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn entry(self, name: &[u8], node: impl FnOnce(Self) -> Self) -> Self {
        node(self.strs(&[b"entry", b"(", b"name", name, b"node"])).str(b")")
    }
}

fn header() -> RawNar {
    RawNar::default().str(b"nix-archive-1")
}
fn file(nar: RawNar) -> RawNar {
    nar.strs(&[b"(", b"type", b"regular", b"contents", b"data", b")"])
}
fn symlink(nar: RawNar) -> RawNar {
    nar.strs(&[b"(", b"type", b"symlink", b"target", b"x", b")"])
}
fn dir(entries: &[&[u8]]) -> RawNar {
    let mut nar = header().strs(&[b"(", b"type", b"directory"]);
    for name in entries {
        nar = nar.entry(name, file);
    }
    nar.str(b")")
}

fn ingest(
    bytes: &[u8],
) -> (
    Store,
    Result<tvix_boot_store::nar::IngestedNar, tvix_boot_store::StoreError>,
) {
    let store = Store::memory();
    let result = store.ingest_nar(bytes);
    (store, result)
}

fn assert_rejected(name: &str, bytes: &[u8], expect: impl Fn(&NarError) -> bool) {
    let (store, result) = ingest(bytes);
    match result {
        Ok(ok) => panic!("{name}: malformed NAR accepted as {ok:?}"),
        Err(tvix_boot_store::StoreError::Nar(e)) => {
            assert!(expect(&e), "{name}: unexpected error {e}")
        }
        Err(e) => panic!("{name}: unexpected error {e}"),
    }
    assert!(
        store.path_infos.list().unwrap().is_empty(),
        "{name}: path info written"
    );
}

#[test]
fn valid_nars_are_accepted() {
    assert!(ingest(&dir(&[b"a", b"b"]).0).1.is_ok());
    assert!(ingest(&symlink(header()).0).1.is_ok());
    assert!(ingest(&file(header()).0).1.is_ok());
}

#[test]
fn malformed_nars_are_rejected() {
    use NarError::*;
    let good = dir(&[b"a", b"b"]).0;

    assert_rejected("empty", b"", |e| matches!(e, UnexpectedEof { offset: 0 }));
    assert_rejected(
        "wrong magic",
        &RawNar::default().str(b"nix-archive-2").0,
        |e| matches!(e, UnexpectedToken { offset: 0, .. }),
    );
    for cut in (1..good.len()).step_by(7) {
        assert_rejected(&format!("truncated at {cut}"), &good[..cut], |e| {
            matches!(e, UnexpectedEof { .. })
        });
    }
    assert_rejected("trailing data", &file(header()).raw(&[0; 8]).0, |e| {
        matches!(e, TrailingData { .. })
    });
    assert_rejected("unsorted", &dir(&[b"b", b"a"]).0, |e| {
        matches!(e, EntryOrder { .. })
    });
    assert_rejected("duplicate", &dir(&[b"a", b"a"]).0, |e| {
        matches!(e, EntryOrder { .. })
    });
    for bad_name in [&b""[..], b".", b"..", b"a/b", b"nul\0", &[b'n'; 256]] {
        assert_rejected(&format!("name {bad_name:?}"), &dir(&[bad_name]).0, |e| {
            matches!(e, Invalid { .. })
        });
    }
    assert_rejected(
        "unknown type",
        &header().strs(&[b"(", b"type", b"fifo", b")"]).0,
        |e| matches!(e, UnexpectedToken { .. }),
    );
    assert_rejected(
        "empty symlink",
        &header()
            .strs(&[b"(", b"type", b"symlink", b"target", b"", b")"])
            .0,
        |e| matches!(e, Invalid { .. }),
    );
    let mut bad_padding = file(header()).0;
    // "data" is 4 bytes, padded with 4 zero bytes: the padding sits 16 bytes before the end.
    let pad_at = bad_padding.len() - 16 - 4;
    bad_padding[pad_at] = 1;
    assert_rejected("non-zero padding", &bad_padding, |e| {
        matches!(e, NonZeroPadding { .. })
    });
    assert_rejected(
        "huge token",
        &header().raw(&u64::MAX.to_le_bytes()).0,
        |e| matches!(e, TokenTooLong { .. }),
    );
    assert_rejected(
        "file longer than the stream",
        &header()
            .strs(&[b"(", b"type", b"regular", b"contents"])
            .raw(&(1u64 << 40).to_le_bytes())
            .raw(b"abc")
            .0,
        |e| matches!(e, UnexpectedEof { .. }),
    );
    assert_rejected(
        "executable without empty marker",
        &header()
            .strs(&[
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"x",
                b"contents",
                b"",
                b")",
            ])
            .0,
        |e| matches!(e, UnexpectedToken { .. }),
    );
    let mut deep = header();
    for _ in 0..=tvix_boot_store::nar::MAX_DEPTH + 1 {
        deep = deep.strs(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]);
    }
    assert_rejected("too deep", &deep.0, |e| matches!(e, TooDeep { .. }));
    assert_rejected(
        "entry without close",
        &header()
            .strs(&[
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"a",
                b"node",
            ])
            .strs(&[b"(", b"type", b"symlink", b"target", b"x", b")", b"entry"])
            .0,
        |e| matches!(e, UnexpectedToken { .. }),
    );
}
