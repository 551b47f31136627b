//! The guest's initrd, assembled in memory: a newc cpio archive holding the
//! embedded guest init at /init, the mount points it uses, /dev/console, and
//! whatever the run mode adds (e.g. busybox for `--shell`).
//!
//! Nothing is compressed: the kernel copies an uncompressed archive straight
//! into its page cache, while decompressing would cost guest CPU on every
//! boot to save a memcpy in the VMM.
//!
//! ```ignore
//! // Not a doc test: this module is private to the crate, out of a doc test's reach.
//! // What a run mode needs (busybox only for the default `tvix.shell`):
//! let initrd: Vec<u8> = build_initrd_for(&mode, Path::new(HOST_BUSYBOX), None)?;
//! // Or by hand:
//! let mut extra = InitrdFile::busybox(Path::new(HOST_BUSYBOX))?;
//! extra.push(InitrdFile::file("/etc/motd", 0o444, b"hi\n".to_vec()));
//! let initrd: Vec<u8> = build_initrd(&extra)?;   // hand the bytes to the VMM
//! ```

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use cpio::newc::{Builder, ModeFileType};
use tvix_boot_guest_init::protocol::{
    DEFAULT_SHELL, Mode, PROGRAM_ENV_FILE, PROGRAM_WORKDIR_FILE, encode_env,
};

/// The guest init (boot/guest-init), built statically by build.rs.
pub const INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tvix-boot-guest-init"));

/// Where tvix-boot looks for a static busybox to give `--shell` (Debian's
/// busybox-static installs it here).
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Directories every initrd has: the init's mount points. /fs is where
/// `init=` builds the new root.
const BASE_DIRS: &[&str] = &["/dev", "/proc", "/sys", "/nix", "/nix/store", "/fs"];
/// /dev/console (char 5:1): the kernel opens it for init's stdio *before*
/// init can mount devtmpfs, so the node must be in the archive.
const CONSOLE: (&str, u32, u32) = ("/dev/console", 5, 1);
/// Ownership and time of every entry: root, and the epoch + 1 s Nix uses.
const MTIME: u32 = 1;

/// Why the initrd could not be assembled. `path` is always the path in the guest.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum InitrdError {
    /// A host file to copy in could not be read.
    #[error("cannot read {host} for the initrd's {path}: {source}")]
    ReadHost {
        host: PathBuf,
        path: String,
        source: io::Error,
    },
    /// Not an absolute, normal path.
    #[error("initrd path {path:?} is invalid: {reason}")]
    BadPath { path: String, reason: &'static str },
    /// Two entries for one path.
    #[error("initrd path {path:?} is given twice")]
    Duplicate { path: String },
    /// A path below something that is not a directory.
    #[error("initrd path {path:?} needs {parent:?} to be a directory, but it is a file or symlink")]
    ParentNotDirectory { path: String, parent: String },
    /// An empty symlink target, or one with a NUL byte.
    #[error("initrd symlink {path:?} has an invalid target {target:?}")]
    BadSymlinkTarget { path: String, target: String },
    /// Larger than a newc archive can hold.
    #[error("initrd file {path:?} is {size} bytes; newc archives hold at most 4 GiB - 1 per file")]
    TooLarge { path: String, size: usize },
    /// The host's busybox would not run in a guest without libraries.
    #[error(
        "{host} is not a statically linked x86_64 executable, and the initrd has no \
         libraries to run it (on Debian: apt-get install busybox-static)"
    )]
    NotStatic { host: PathBuf },
    /// Writing into the in-memory archive failed.
    #[error("cannot write initrd entry {path:?}: {source}")]
    Write { path: String, source: io::Error },
}

/// One entry to add to the initrd. Paths are absolute in the guest; missing
/// parent directories are created (mode 0755).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitrdFile {
    File {
        path: String,
        /// Permission bits, e.g. 0o755.
        mode: u32,
        contents: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Dir {
        path: String,
        mode: u32,
    },
}

impl InitrdFile {
    pub fn file(path: impl Into<String>, mode: u32, contents: Vec<u8>) -> Self {
        InitrdFile::File {
            path: path.into(),
            mode,
            contents,
        }
    }

    /// A file read from the host now.
    pub fn host_file(path: impl Into<String>, mode: u32, host: &Path) -> Result<Self, InitrdError> {
        let path = path.into();
        let contents = std::fs::read(host).map_err(|source| InitrdError::ReadHost {
            host: host.to_owned(),
            path: path.clone(),
            source,
        })?;
        Ok(InitrdFile::file(path, mode, contents))
    }

    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        InitrdFile::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }

    pub fn dir(path: impl Into<String>, mode: u32) -> Self {
        InitrdFile::Dir {
            path: path.into(),
            mode,
        }
    }

    /// A static busybox from the host at /bin/busybox and /bin/sh -> busybox:
    /// the shell `tvix.shell` runs by default. It must be statically linked;
    /// the initrd has no libraries.
    pub fn busybox(host: &Path) -> Result<Vec<Self>, InitrdError> {
        let busybox = InitrdFile::host_file("/bin/busybox", 0o755, host)?;
        if let InitrdFile::File { contents, .. } = &busybox
            && !is_static_x86_64_elf(contents)
        {
            return Err(InitrdError::NotStatic {
                host: host.to_owned(),
            });
        }
        Ok(vec![busybox, InitrdFile::symlink("/bin/sh", "busybox")])
    }

    fn path(&self) -> &str {
        match self {
            InitrdFile::File { path, .. }
            | InitrdFile::Symlink { path, .. }
            | InitrdFile::Dir { path, .. } => path,
        }
    }
}

/// Builds the initrd: the base directories, /dev/console, /init, then
/// `extra` in order. Returns the archive's bytes.
pub fn build_initrd(extra: &[InitrdFile]) -> Result<Vec<u8>, InitrdError> {
    let mut archive = Archive::default();
    for dir in BASE_DIRS {
        archive.add(&InitrdFile::dir(*dir, 0o755))?;
    }
    let (console, major, minor) = CONSOLE;
    archive.add_char_device(console, 0o600, major, minor)?;
    archive.add(&InitrdFile::file("/init", 0o755, INIT.to_vec()))?;
    for entry in extra {
        archive.add(entry)?;
    }
    archive.finish()
}

/// The initrd `mode` needs: the base archive, plus busybox (read from
/// `host_busybox`, normally [`HOST_BUSYBOX`]) when the mode is a shell that
/// is the initrd's own `/bin/sh`. Every other mode runs programs from the
/// store and needs nothing more.
///
/// `program` (for `--run` and `--shell`) becomes the files the init reads the program's
/// environment and working directory from.
pub fn build_initrd_for(
    mode: &Mode,
    host_busybox: &Path,
    program: Option<&ProgramSetup>,
) -> Result<Vec<u8>, InitrdError> {
    let mut extra = match mode {
        Mode::Shell { path } if path == DEFAULT_SHELL => InitrdFile::busybox(host_busybox)?,
        _ => Vec::new(),
    };
    if let Some(program) = program {
        extra.push(InitrdFile::file(
            PROGRAM_ENV_FILE,
            0o444,
            encode_env(&program.env),
        ));
        if let Some(dir) = &program.workdir {
            extra.push(InitrdFile::file(
                PROGRAM_WORKDIR_FILE,
                0o444,
                dir.as_bytes().to_vec(),
            ));
        }
    }
    build_initrd(&extra)
}

/// The environment and working directory of the guest's program.
pub struct ProgramSetup {
    /// Exactly the program's environment.
    pub env: Vec<(String, String)>,
    /// `None`: `/`.
    pub workdir: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Other,
}

#[derive(Default)]
struct Archive {
    out: Vec<u8>,
    /// Every path written so far (archive names, without the leading '/').
    written: HashMap<String, Kind>,
    last_ino: u32,
}

impl Archive {
    fn add(&mut self, entry: &InitrdFile) -> Result<(), InitrdError> {
        let name = archive_name(entry.path())?;
        self.parents(&name)?;
        match entry {
            InitrdFile::Dir { mode, .. } => {
                match self.written.get(&name) {
                    // Naming a directory again (e.g. /bin before /bin/busybox) is harmless.
                    Some(Kind::Dir) => Ok(()),
                    Some(Kind::Other) => Err(InitrdError::Duplicate {
                        path: entry.path().to_owned(),
                    }),
                    None => self.entry(
                        &name,
                        ModeFileType::Directory,
                        *mode,
                        (0, 0),
                        &[],
                        Kind::Dir,
                    ),
                }
            }
            InitrdFile::File { mode, contents, .. } => {
                self.unique(&name)?;
                self.entry(
                    &name,
                    ModeFileType::Regular,
                    *mode,
                    (0, 0),
                    contents,
                    Kind::Other,
                )
            }
            InitrdFile::Symlink { target, .. } => {
                self.unique(&name)?;
                if target.is_empty() || target.contains('\0') {
                    return Err(InitrdError::BadSymlinkTarget {
                        path: entry.path().to_owned(),
                        target: target.clone(),
                    });
                }
                self.entry(
                    &name,
                    ModeFileType::Symlink,
                    0o777,
                    (0, 0),
                    target.as_bytes(),
                    Kind::Other,
                )
            }
        }
    }

    fn add_char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitrdError> {
        let name = archive_name(path)?;
        self.parents(&name)?;
        self.unique(&name)?;
        self.entry(
            &name,
            ModeFileType::Char,
            mode,
            (major, minor),
            &[],
            Kind::Other,
        )
    }

    fn unique(&self, name: &str) -> Result<(), InitrdError> {
        if self.written.contains_key(name) {
            return Err(InitrdError::Duplicate {
                path: format!("/{name}"),
            });
        }
        Ok(())
    }

    /// Writes the missing parent directories of `name`, outermost first (the
    /// kernel unpacks in archive order and does not create parents).
    fn parents(&mut self, name: &str) -> Result<(), InitrdError> {
        let mut end = 0;
        while let Some(slash) = name[end..].find('/') {
            let parent = &name[..end + slash];
            match self.written.get(parent) {
                Some(Kind::Dir) => {}
                Some(Kind::Other) => {
                    return Err(InitrdError::ParentNotDirectory {
                        path: format!("/{name}"),
                        parent: format!("/{parent}"),
                    });
                }
                None => {
                    let parent = parent.to_owned();
                    self.entry(
                        &parent,
                        ModeFileType::Directory,
                        0o755,
                        (0, 0),
                        &[],
                        Kind::Dir,
                    )?;
                }
            }
            end += slash + 1;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        file_type: ModeFileType,
        mode: u32,
        (rdev_major, rdev_minor): (u32, u32),
        contents: &[u8],
        kind: Kind,
    ) -> Result<(), InitrdError> {
        let size = u32::try_from(contents.len()).map_err(|_| InitrdError::TooLarge {
            path: format!("/{name}"),
            size: contents.len(),
        })?;
        let write_err = |source| InitrdError::Write {
            path: format!("/{name}"),
            source,
        };
        // Unique inode numbers: the kernel treats entries sharing one (with
        // nlink > 1) as hard links.
        self.last_ino += 1;
        let mut writer = Builder::new(name)
            .ino(self.last_ino)
            .mode(mode & 0o7777)
            .set_mode_file_type(file_type)
            .uid(0)
            .gid(0)
            .nlink(if kind == Kind::Dir { 2 } else { 1 })
            .mtime(MTIME)
            .rdev_major(rdev_major)
            .rdev_minor(rdev_minor)
            .write(&mut self.out, size);
        writer.write_all(contents).map_err(write_err)?;
        writer.finish().map_err(write_err)?;
        self.written.insert(name.to_owned(), kind);
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u8>, InitrdError> {
        cpio::newc::trailer(&mut self.out).map_err(|source| InitrdError::Write {
            path: "TRAILER!!!".into(),
            source,
        })?;
        Ok(self.out)
    }
}

/// Whether `elf` is an x86_64 ELF executable without a program interpreter (PT_INTERP),
/// i.e. one that runs without a dynamic loader. Hand-written: it reads four header
/// fields and the program headers, less code than wiring up an ELF crate for it.
fn is_static_x86_64_elf(elf: &[u8]) -> bool {
    const ELFCLASS64: u8 = 2;
    const ELFDATA2LSB: u8 = 1;
    const EM_X86_64: u16 = 62;
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', ELFCLASS64, ELFDATA2LSB][..])
        || u16_at(0x12) != Some(EM_X86_64)
    {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        usize::try_from(phoff)
            .ok()
            .and_then(|off| off.checked_add(i * usize::from(phentsize)))
            .and_then(u32_at)
            .is_some_and(|p_type| p_type != PT_INTERP)
    })
}

/// The archive name for a guest path: absolute, normalised, without the
/// leading '/' (the form `find . | cpio -o` writes and the kernel expects).
fn archive_name(path: &str) -> Result<String, InitrdError> {
    let bad = |reason| InitrdError::BadPath {
        path: path.to_owned(),
        reason,
    };
    let rest = path.strip_prefix('/').ok_or_else(|| bad("not absolute"))?;
    if rest.is_empty() {
        return Err(bad("is the root itself"));
    }
    if path.contains('\0') {
        return Err(bad("contains NUL"));
    }
    for component in rest.split('/') {
        match component {
            "" => return Err(bad("has an empty component (// or a trailing /)")),
            "." | ".." => return Err(bad("has a . or .. component")),
            _ => {}
        }
    }
    Ok(rest.to_owned())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[derive(Debug)]
    struct Parsed {
        name: String,
        mode: u32,
        ino: u32,
        rdev: (u32, u32),
        contents: Vec<u8>,
    }

    fn parse(mut archive: &[u8]) -> Vec<Parsed> {
        let mut entries = Vec::new();
        loop {
            let mut reader = cpio::newc::Reader::new(archive).expect("valid newc header");
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let (name, mode, ino, rdev) = (
                e.name().to_owned(),
                e.mode(),
                e.ino(),
                (e.rdev_major(), e.rdev_minor()),
            );
            assert_eq!((e.uid(), e.gid(), e.mtime()), (0, 0, MTIME), "{name}");
            let mut contents = Vec::new();
            reader.read_to_end(&mut contents).unwrap();
            archive = reader.finish().unwrap();
            entries.push(Parsed {
                name,
                mode,
                ino,
                rdev,
                contents,
            });
        }
        entries
    }

    fn find<'a>(entries: &'a [Parsed], name: &str) -> &'a Parsed {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing from {entries:?}"))
    }

    #[test]
    fn base_initrd_has_init_console_and_mount_points() {
        let archive = build_initrd(&[]).unwrap();
        let entries = parse(&archive);
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "nix",
                "nix/store",
                "fs",
                "dev/console",
                "init"
            ]
        );
        let init = find(&entries, "init");
        assert_eq!(init.mode, 0o100755);
        assert_eq!(init.contents, INIT);
        // The embedded init is a static ELF executable.
        assert_eq!(&INIT[..4], b"\x7fELF");
        let console = find(&entries, "dev/console");
        assert_eq!(console.mode, 0o020600);
        assert_eq!(console.rdev, (5, 1));
        assert_eq!(find(&entries, "nix/store").mode, 0o040755);
        let mut inos: Vec<_> = entries.iter().map(|e| e.ino).collect();
        inos.sort();
        inos.dedup();
        assert_eq!(inos.len(), entries.len(), "inode numbers are unique");
        // Small: little beyond the init itself.
        assert!(archive.len() < INIT.len() + 4096, "{} bytes", archive.len());
    }

    #[test]
    fn busybox_adds_binary_and_sh_symlink_with_parents() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("busybox");
        // Any static x86_64 executable will do: the init is one.
        std::fs::write(&host, INIT).unwrap();
        let archive = build_initrd(&InitrdFile::busybox(&host).unwrap()).unwrap();
        let entries = parse(&archive);
        let bin = entries.iter().position(|e| e.name == "bin").unwrap();
        let busybox = entries
            .iter()
            .position(|e| e.name == "bin/busybox")
            .unwrap();
        assert!(bin < busybox, "parent directory comes first");
        assert_eq!(entries[bin].mode, 0o040755);
        assert_eq!(entries[busybox].mode, 0o100755);
        assert_eq!(entries[busybox].contents, INIT);
        let sh = find(&entries, "bin/sh");
        assert_eq!(sh.mode, 0o120777);
        assert_eq!(sh.contents, b"busybox");
    }

    #[test]
    fn only_the_default_shell_brings_busybox() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("busybox");
        std::fs::write(&host, INIT).unwrap();
        let shell = Mode::Shell {
            path: DEFAULT_SHELL.into(),
        };
        let names = |mode: &Mode| -> Vec<String> {
            let archive = build_initrd_for(mode, &host, None).unwrap();
            parse(&archive).into_iter().map(|e| e.name).collect()
        };
        assert!(names(&shell).contains(&"bin/busybox".to_owned()));
        let store_shell = Mode::Shell {
            path: "/nix/store/x-bash/bin/bash".into(),
        };
        let run = Mode::Run {
            path: "/nix/store/x/bin/x".into(),
            args: vec![],
        };
        for mode in [Mode::Find, store_shell, run, Mode::Nothing] {
            assert!(
                !names(&mode).iter().any(|n| n.starts_with("bin")),
                "{mode:?}"
            );
        }
        // The default shell without a busybox on the host: an error naming it.
        let missing = dir.path().join("no-busybox");
        let msg = build_initrd_for(&shell, &missing, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no-busybox"), "{msg}");
    }

    #[test]
    fn a_dynamically_linked_busybox_is_refused() {
        assert!(is_static_x86_64_elf(INIT));
        // The init with its first program header turned into PT_INTERP.
        let mut dynamic = INIT.to_vec();
        let phoff = u64::from_le_bytes(dynamic[0x20..0x28].try_into().unwrap()) as usize;
        dynamic[phoff..phoff + 4].copy_from_slice(&3u32.to_le_bytes());
        assert!(!is_static_x86_64_elf(&dynamic));
        for garbage in [&b"#!/bin/sh\n"[..], b"\x7fELF", &INIT[..0x30]] {
            assert!(!is_static_x86_64_elf(garbage));
        }
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("busybox");
        std::fs::write(&host, &dynamic).unwrap();
        let msg = InitrdFile::busybox(&host).unwrap_err().to_string();
        assert!(
            msg.contains("busybox-static") && msg.contains("busybox"),
            "{msg}"
        );
    }

    #[test]
    fn nested_files_and_repeated_dirs() {
        let archive = build_initrd(&[
            InitrdFile::dir("/etc", 0o700),
            InitrdFile::dir("/etc", 0o755),
            InitrdFile::file("/etc/a/b/c", 0o644, b"x".to_vec()),
            InitrdFile::dir("/nix/store", 0o755),
        ])
        .unwrap();
        let entries = parse(&archive);
        assert_eq!(find(&entries, "etc").mode, 0o040700);
        assert_eq!(find(&entries, "etc/a").mode, 0o040755);
        assert_eq!(find(&entries, "etc/a/b/c").mode, 0o100644);
        assert_eq!(entries.iter().filter(|e| e.name == "etc").count(), 1);
    }

    #[test]
    fn bad_inputs_are_named_in_errors() {
        let err = |extra: &[InitrdFile]| build_initrd(extra).unwrap_err().to_string();
        assert!(
            err(&[InitrdFile::file("/init", 0o755, vec![])]).contains("\"/init\" is given twice")
        );
        assert!(err(&[InitrdFile::file("bin/x", 0o755, vec![])]).contains("\"bin/x\""));
        assert!(err(&[InitrdFile::file("/a/../b", 0o755, vec![])]).contains(".."));
        assert!(err(&[InitrdFile::file("/a//b", 0o755, vec![])]).contains("empty component"));
        assert!(err(&[InitrdFile::symlink("/x", "")]).contains("\"/x\""));
        let msg = err(&[InitrdFile::file("/init/x", 0o755, vec![])]);
        assert!(
            msg.contains("\"/init/x\"") && msg.contains("\"/init\""),
            "{msg}"
        );
        let msg = err(&[InitrdFile::file("/dev", 0o755, vec![])]);
        assert!(msg.contains("\"/dev\" is given twice"), "{msg}");

        let missing = Path::new("/nonexistent/busybox");
        let msg = InitrdFile::busybox(missing).unwrap_err().to_string();
        assert!(
            msg.contains("/nonexistent/busybox") && msg.contains("/bin/busybox"),
            "{msg}"
        );
    }

    /// Writes an initrd (with the host's busybox) to `$TVIX_BOOT_INITRD_OUT`
    /// for booting by hand, e.g. under plain QEMU:
    /// `TVIX_BOOT_INITRD_OUT=/tmp/initrd cargo test -p tvix-boot write_initrd -- --ignored`
    #[test]
    #[ignore = "writes a file for manual boots"]
    fn write_initrd_for_manual_boot() {
        let out = std::env::var_os("TVIX_BOOT_INITRD_OUT").expect("set TVIX_BOOT_INITRD_OUT");
        let extra = InitrdFile::busybox(Path::new(HOST_BUSYBOX)).unwrap();
        std::fs::write(out, build_initrd(&extra).unwrap()).unwrap();
    }
}
