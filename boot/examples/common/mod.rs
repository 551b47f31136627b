//! What the examples share: a store holding a static busybox to run in the guest.

use std::path::Path;
use std::sync::Arc;

use tvix_boot::Store;
use tvix_boot::store::import::import_path;

/// An in-memory store with the host's static busybox (Debian's busybox-static) imported
/// as `<store path>/bin/busybox`; returns the store and that program's path.
pub fn store_with_busybox() -> Result<(Arc<Store>, String), Box<dyn std::error::Error>> {
    let tree = tempfile::tempdir()?;
    std::fs::create_dir(tree.path().join("bin"))?;
    std::fs::copy("/bin/busybox", tree.path().join("bin/busybox"))?;
    let store = Store::memory();
    let info = import_path(&store, tree.path(), &mut |_| {})?;
    let busybox = format!("{}/bin/busybox", info.store_path.to_absolute_path());
    Ok((Arc::new(store), busybox))
}

/// This process's threads (by name) and open descriptors (by what they are).
#[allow(dead_code)] // not every example counts
pub fn threads_and_fds() -> (Vec<String>, Vec<String>) {
    let list = |dir: &str, describe: &dyn Fn(&Path) -> String| {
        let mut entries: Vec<String> = std::fs::read_dir(Path::new(dir))
            .map(|it| {
                it.filter_map(Result::ok)
                    .map(|e| describe(&e.path()))
                    .collect()
            })
            .unwrap_or_default();
        entries.sort();
        entries
    };
    let threads = list("/proc/self/task", &|task| {
        std::fs::read_to_string(task.join("comm"))
            .map_or_else(|_| "?".into(), |n| n.trim().to_owned())
    });
    let fds = list("/proc/self/fd", &|fd| {
        std::fs::read_link(fd).map_or_else(|_| "?".into(), |t| t.display().to_string())
    });
    (threads, fds)
}

/// [`threads_and_fds`] once it equals `before`, or after a second if it never does. A
/// joined thread's /proc entry can outlive the join for a moment: pthread_join returns
/// when the kernel clears the thread's id, a little before it releases the task.
#[allow(dead_code)] // not every example counts
pub fn threads_and_fds_after(before: &(Vec<String>, Vec<String>)) -> (Vec<String>, Vec<String>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let now = threads_and_fds();
        if now == *before || std::time::Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
