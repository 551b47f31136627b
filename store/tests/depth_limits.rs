//! Deep trees: the deepest allowed tree imports and exports; one level more is a clear error,
//! never a stack overflow (tests run on 2 MiB threads, in debug builds).

use std::path::Path;

use tvix_boot_store::Store;
use tvix_boot_store::import::{ImportError, import_path};
use tvix_boot_store::nar::MAX_DEPTH;

fn nested(root: &Path, levels: usize) {
    let mut dir = root.to_owned();
    for _ in 0..levels {
        dir = dir.join("d");
    }
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("leaf"), b"leaf").unwrap();
}

#[test]
fn deepest_allowed_tree_round_trips() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("deep");
    // The root directory is level 0, so MAX_DEPTH - 1 more directories hold the leaf file
    // at depth MAX_DEPTH.
    nested(&root, MAX_DEPTH - 1);
    let store = Store::memory();
    let info = import_path(&store, &root, &mut |_| {}).unwrap();
    let mut nar = Vec::new();
    store.write_nar(&info.node, &mut nar).unwrap();
    assert_eq!(nar.len() as u64, info.nar_size);
    assert_eq!(store.ingest_nar(nar.as_slice()).unwrap().node, info.node);
}

#[test]
fn too_deep_tree_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("deeper");
    nested(&root, MAX_DEPTH + 1);
    let store = Store::memory();
    let err = import_path(&store, &root, &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImportError::TooDeep { .. }), "{err}");
    assert!(store.path_infos.list().unwrap().is_empty());
}
