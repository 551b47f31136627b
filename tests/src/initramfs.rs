//! In-memory newc cpio archives: the test host's initramfs and the guests'
//! initrds are both built with this.
//!
//! The `cpio` crate writes the newc headers; this wrapper adds what an
//! initramfs needs on top: parent directories created once and in order,
//! symlinks, device nodes, and unique inode numbers (the kernel hard-links
//! entries that share one).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use cpio::newc::{Builder, ModeFileType};

use crate::error::{Error, Result};

/// Directories every initramfs gets, so busybox `--install -s` and the usual
/// mount points work.
const BASE_DIRS: &[&str] = &[
    "/bin",
    "/sbin",
    "/usr",
    "/usr/bin",
    "/usr/sbin",
    "/dev",
    "/proc",
    "/sys",
    "/tmp",
    "/run",
    "/etc",
    "/root",
];

/// An initramfs under construction. Entries are written as they are added;
/// [`Initramfs::finish`] appends the trailer.
pub struct Initramfs {
    out: Vec<u8>,
    dirs: BTreeSet<String>,
    next_ino: u32,
}

impl Default for Initramfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Initramfs {
    /// An archive holding the base directories and `/dev/console`: the kernel
    /// opens /dev/console for init's stdio *before* init can mount devtmpfs,
    /// so without the node init's output is lost.
    pub fn new() -> Self {
        let mut this = Initramfs {
            out: Vec::new(),
            dirs: BTreeSet::new(),
            next_ino: 1,
        };
        for dir in BASE_DIRS {
            // Infallible: BASE_DIRS are valid absolute paths.
            let _ = this.dir(dir, 0o755);
        }
        this.char_device("/dev/console", 0o600, 5, 1)
            .expect("/dev/console is a valid path");
        this
    }

    /// Adds a directory (and any missing parents).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let path = check_path(path)?;
        self.parents(&path)?;
        if self.dirs.insert(path.clone()) {
            self.entry(&path, ModeFileType::Directory, mode, 2, (0, 0), &[]);
        }
        Ok(self)
    }

    /// Adds a regular file with the given permission bits (e.g. 0o755).
    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<&mut Self> {
        let path = check_path(path)?;
        if u32::try_from(contents.len()).is_err() {
            return Err(Error::TooLarge { path: path.into() });
        }
        self.parents(&path)?;
        self.entry(&path, ModeFileType::Regular, mode, 1, (0, 0), contents);
        Ok(self)
    }

    /// Adds a regular file read from the host.
    pub fn host_file(&mut self, path: &str, mode: u32, host: &Path) -> Result<&mut Self> {
        let contents = std::fs::read(host).map_err(Error::io(host))?;
        self.file(path, mode, &contents)
    }

    /// Adds a symbolic link `path -> target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let path = check_path(path)?;
        self.parents(&path)?;
        self.entry(
            &path,
            ModeFileType::Symlink,
            0o777,
            1,
            (0, 0),
            target.as_bytes(),
        );
        Ok(self)
    }

    /// Adds a character device node.
    pub fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self> {
        let path = check_path(path)?;
        self.parents(&path)?;
        self.entry(&path, ModeFileType::Char, mode, 1, (major, minor), &[]);
        Ok(self)
    }

    /// Adds busybox at /bin/busybox and a `/bin/sh` link to it; /init scripts
    /// then run `/bin/busybox --install -s` to get the other applets.
    pub fn busybox(&mut self, busybox: &Path) -> Result<&mut Self> {
        self.host_file("/bin/busybox", 0o755, busybox)?;
        self.symlink("/bin/sh", "busybox")
    }

    /// A complete busybox initrd for a guest: `/init` installs the applets,
    /// mounts proc, sysfs and devtmpfs (the kernel's DEVTMPFS_MOUNT does not
    /// apply to an initramfs root), then runs `init_body`. Add more files to
    /// the returned builder, then [`Initramfs::finish`] it.
    pub fn busybox_init(busybox: &Path, init_body: &str) -> Result<Initramfs> {
        let mut fs = Initramfs::new();
        fs.busybox(busybox)?;
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s\n\
             export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sysfs /sys\n\
             mount -t devtmpfs devtmpfs /dev\n\
             {init_body}\n"
        );
        fs.file("/init", 0o755, init.as_bytes())?;
        Ok(fs)
    }

    /// The finished archive.
    pub fn finish(self) -> Vec<u8> {
        let out = self.out;
        // Writing into a Vec cannot fail.
        cpio::newc::trailer(out).expect("writing to a Vec")
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for component in &components[..components.len().saturating_sub(1)] {
            prefix.push('/');
            prefix.push_str(component);
            if !self.dirs.contains(&prefix) {
                let dir = prefix.clone();
                self.dir(&dir, 0o755)?;
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &str,
        kind: ModeFileType,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) {
        let ino = self.next_ino;
        self.next_ino += 1;
        // cpio names are relative ("bin/sh"), as the kernel and GNU cpio expect.
        let builder = Builder::new(path.trim_start_matches('/'))
            .ino(ino)
            .mode(mode & 0o7777)
            .set_mode_file_type(kind)
            .nlink(nlink)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1);
        // Lengths were checked by the callers; writing into a Vec cannot fail.
        let len = u32::try_from(data.len()).expect("checked by caller");
        let mut writer = builder.write(&mut self.out, len);
        writer.write_all(data).expect("writing to a Vec");
        writer.finish().expect("writing to a Vec");
    }
}

/// Normalises a guest path: absolute, no `..`, `.` or empty components.
fn check_path(path: &str) -> Result<String> {
    let bad = || Error::BadGuestPath {
        path: path.to_owned(),
    };
    if !path.starts_with('/') || path.len() < 2 {
        return Err(bad());
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(archive: &[u8]) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let mut rest = archive;
        loop {
            let reader = cpio::NewcReader::new(rest).expect("valid entry");
            if reader.entry().is_trailer() {
                break;
            }
            out.push((reader.entry().name().to_owned(), reader.entry().mode()));
            rest = reader.finish().expect("entry end");
        }
        out
    }

    #[test]
    fn parents_are_created_once_and_first() {
        let mut fs = Initramfs::new();
        fs.file("/a/b/c.txt", 0o644, b"hi").unwrap();
        fs.file("/a/b/d.txt", 0o755, b"").unwrap();
        let entries = names(&fs.finish());
        let pos = |n: &str| entries.iter().position(|(e, _)| e == n).unwrap();
        assert!(pos("a") < pos("a/b") && pos("a/b") < pos("a/b/c.txt"));
        assert_eq!(entries.iter().filter(|(e, _)| e == "a/b").count(), 1);
        let (_, mode) = &entries[pos("a/b/d.txt")];
        assert_eq!(*mode, 0o100755);
        let (_, console) = &entries[pos("dev/console")];
        assert_eq!(*console, 0o020600);
    }

    #[test]
    fn bad_paths_are_rejected() {
        let mut fs = Initramfs::new();
        for p in ["relative", "/a/../b", "/a//b", "/", "/./x"] {
            assert!(fs.file(p, 0o644, b"").is_err(), "{p}");
        }
    }
}
