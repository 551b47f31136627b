//! The inode table follows the kernel's references: LOOKUP and READDIRPLUS hand inodes
//! out, FORGET takes them back, and what the kernel no longer holds is dropped.

use std::ffi::CString;

use super::*;
use tvix_boot_store::Store;

/// A store path `tree` with `a` (file), `b` (file, other content), `same-as-a` (a's
/// content), `sub/` (directory with `c`) and `link` (symlink to `a`).
fn fs_with_tree() -> (StoreFs, CString) {
    let store = Store::memory();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a"), b"content a").unwrap();
    std::fs::write(root.join("b"), b"content b").unwrap();
    std::fs::write(root.join("same-as-a"), b"content a").unwrap();
    std::fs::write(root.join("sub/c"), b"content c").unwrap();
    std::os::unix::fs::symlink("a", root.join("link")).unwrap();
    let info = tvix_boot_store::import::import_path(&store, &root, &mut |_| {}).unwrap();
    let fs = StoreFs::new(crate::fs::test_fs_store(store), StoreFsOptions::default());
    (fs, CString::new(info.store_path.to_basename()).unwrap())
}

fn name(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn ctx() -> Context {
    Context::default()
}

#[test]
fn forget_drops_an_inode_once_every_lookup_is_returned() {
    let (fs, path) = fs_with_tree();
    let tree = fs.lookup(&ctx(), ROOT_INODE, &path).unwrap();
    let a = fs.lookup(&ctx(), tree.inode, &name("a")).unwrap();
    let a_again = fs.lookup(&ctx(), tree.inode, &name("a")).unwrap();
    assert_eq!(a.inode, a_again.inode);
    assert_eq!(fs.inode_count(), 2);

    fs.forget(&ctx(), a.inode, 1);
    assert!(
        fs.getattr(&ctx(), a.inode, None).is_ok(),
        "one lookup is left"
    );
    fs.forget(&ctx(), a.inode, 1);
    let gone = fs.getattr(&ctx(), a.inode, None).unwrap_err();
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(fs.inode_count(), 1);

    // Looked up again: a new node id, the same inode number for the guest.
    let a_new = fs.lookup(&ctx(), tree.inode, &name("a")).unwrap();
    assert_ne!(a_new.inode, a.inode, "node ids are not reused");
    assert_eq!(a_new.attr.st_ino, a.attr.st_ino);
}

#[test]
fn equal_content_shares_an_inode_and_its_count() {
    let (fs, path) = fs_with_tree();
    let tree = fs.lookup(&ctx(), ROOT_INODE, &path).unwrap();
    let a = fs.lookup(&ctx(), tree.inode, &name("a")).unwrap();
    let same = fs.lookup(&ctx(), tree.inode, &name("same-as-a")).unwrap();
    let b = fs.lookup(&ctx(), tree.inode, &name("b")).unwrap();
    assert_eq!(a.inode, same.inode);
    assert_ne!(a.inode, b.inode);
    assert_ne!(a.attr.st_ino, b.attr.st_ino);
    fs.batch_forget(&ctx(), vec![(a.inode, 1)]);
    assert!(fs.getattr(&ctx(), a.inode, None).is_ok());
    fs.batch_forget(&ctx(), vec![(same.inode, 1), (b.inode, 1)]);
    assert_eq!(fs.inode_count(), 1, "only the tree is left");
}

#[test]
fn a_forgotten_directory_takes_its_listing_and_root_name_with_it() {
    let (fs, path) = fs_with_tree();
    let tree = fs.lookup(&ctx(), ROOT_INODE, &path).unwrap();
    let sub = fs.lookup(&ctx(), tree.inode, &name("sub")).unwrap();
    let c = fs.lookup(&ctx(), sub.inode, &name("c")).unwrap();
    fs.forget(&ctx(), c.inode, 1);
    fs.forget(&ctx(), sub.inode, 1);
    fs.forget(&ctx(), tree.inode, 1);
    assert_eq!(fs.inode_count(), 0);
    assert!(fs.inodes.read().unwrap().root_entries.is_empty());
    assert!(fs.inodes.read().unwrap().by_content.is_empty());

    // Everything can be found again from the root.
    let tree = fs.lookup(&ctx(), ROOT_INODE, &path).unwrap();
    let sub = fs.lookup(&ctx(), tree.inode, &name("sub")).unwrap();
    fs.lookup(&ctx(), sub.inode, &name("c")).unwrap();
    assert_eq!(fs.inode_count(), 3);
}

#[test]
fn readdirplus_counts_only_the_entries_that_reached_the_reply() {
    let (fs, path) = fs_with_tree();
    let tree = fs.lookup(&ctx(), ROOT_INODE, &path).unwrap();
    let (handle, _) = fs.opendir(&ctx(), tree.inode, 0).unwrap();
    let handle = handle.unwrap();

    // Room for two entries: the third is refused (0 bytes added) and must not count.
    let mut given = Vec::new();
    fs.readdirplus(&ctx(), tree.inode, handle, 4096, 0, &mut |d, e| {
        if given.len() == 2 {
            return Ok(0);
        }
        given.push((d.name.to_vec(), e.inode, d.ino, e.attr.st_ino));
        Ok(1)
    })
    .unwrap();
    assert_eq!(given.len(), 2);
    for (_, inode, d_ino, st_ino) in &given {
        assert_eq!(d_ino, st_ino, "readdir's inode number is stat's");
        assert!(fs.getattr(&ctx(), *inode, None).is_ok());
    }
    assert_eq!(fs.inode_count(), 3, "tree and the two entries given");
    for (_, inode, _, _) in &given {
        fs.forget(&ctx(), *inode, 1);
    }
    assert_eq!(fs.inode_count(), 1);
}

#[test]
fn plain_readdir_numbers_match_stat_without_holding_inodes() {
    let (fs, path) = fs_with_tree();
    let tree = fs.lookup(&ctx(), ROOT_INODE, &path).unwrap();
    let (handle, _) = fs.opendir(&ctx(), tree.inode, 0).unwrap();
    let mut listed = Vec::new();
    fs.readdir(&ctx(), tree.inode, handle.unwrap(), 4096, 0, &mut |d| {
        listed.push((String::from_utf8(d.name.to_vec()).unwrap(), d.ino));
        Ok(1)
    })
    .unwrap();
    assert_eq!(fs.inode_count(), 1, "readdir hands out no inodes");
    for (entry_name, ino) in listed {
        let entry = fs.lookup(&ctx(), tree.inode, &name(&entry_name)).unwrap();
        assert_eq!(entry.attr.st_ino, ino, "{entry_name}");
    }
}

#[test]
fn forgetting_unknown_or_root_inodes_or_too_much_is_harmless() {
    let (fs, path) = fs_with_tree();
    fs.forget(&ctx(), ROOT_INODE, 1000);
    fs.forget(&ctx(), 12345, 1);
    fs.batch_forget(&ctx(), vec![(0, 1), (u64::MAX, u64::MAX)]);
    let tree = fs.lookup(&ctx(), ROOT_INODE, &path).unwrap();
    fs.forget(&ctx(), tree.inode, u64::MAX);
    assert_eq!(fs.inode_count(), 0);
    assert!(fs.getattr(&ctx(), ROOT_INODE, None).is_ok());
}
