//! What the guest is asked to do (`tvix_boot_guest_init::protocol::Mode`), checked before
//! anything boots: that the command line's own `tvix.*` / `init=` keys agree with the
//! mode asked for, and that the programs it names are in the store. The mode becomes
//! kernel command-line keys the guest init reads (boot/guest-init).

use tvix_boot_guest_init::protocol::{Cmdline, DEFAULT_SHELL, Mode, ModeError};
use tvix_boot_store::store_path::StorePathError;
use tvix_boot_store::{Lookup, Node, Store, StoreError, StorePath};

/// Why the guest cannot run the mode asked for. `flag` names the mode as the CLI flag
/// that asks for it (`--run`, `--shell-path`, ...), `path` the program.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum GuestModeError {
    /// The command line's `tvix.*` keys are malformed.
    #[error("{0}")]
    Cmdline(#[from] ModeError),
    /// The command line's own keys ask for something else.
    #[error(
        "{flag} conflicts with the command line, where the guest would do `{keys}` instead; \
         drop one of them"
    )]
    Conflict { flag: String, keys: String },
    /// The program is not in the store, or not a program.
    #[error("{flag} {path}: {reason}")]
    NotInStore {
        flag: &'static str,
        path: String,
        reason: String,
    },
    /// The store could not be asked.
    #[error("{flag} {path}: cannot look it up in the store: {source}")]
    Store {
        flag: &'static str,
        path: String,
        source: Box<StoreError>,
    },
}

/// The CLI flag that asks for `mode`, to name it in messages.
pub(crate) fn flag(mode: &Mode) -> &'static str {
    match mode {
        Mode::Run { .. } => "--run",
        Mode::Shell { path } if path == DEFAULT_SHELL => "--shell",
        Mode::Shell { .. } => "--shell-path",
        Mode::Init { .. } => "--init",
        Mode::Find => "--find",
        Mode::Nothing => "(no mode)",
    }
}

/// The mode the guest init will pick once the keys for `requested` follow `cmdline`.
/// Keys the user put on the command line themselves work as they always did; a flag
/// that the init would overrule (it checks `tvix.find`, then `tvix.shell`, `tvix.run`,
/// `init=`) is an error rather than a surprise.
pub(crate) fn choose(cmdline: &str, requested: Option<&Mode>) -> Result<Mode, GuestModeError> {
    let Some(mode) = requested else {
        return Ok(Mode::from_cmdline(&Cmdline::parse(cmdline))?);
    };
    let with_keys = format!("{cmdline} {}", mode.to_cmdline()?);
    let chosen = Mode::from_cmdline(&Cmdline::parse(&with_keys))?;
    if chosen != *mode {
        return Err(GuestModeError::Conflict {
            flag: flag(mode).into(),
            keys: chosen.to_cmdline()?,
        });
    }
    Ok(chosen)
}

/// The guest kernel's command line, in the order it is built: tvix-boot's defaults,
/// the user's own arguments (later arguments win in Linux, so these can override the
/// defaults), then the keys for tvix-boot's init, which win over the user's.
#[derive(Clone, Debug)]
pub(crate) struct GuestCmdline(String);

impl GuestCmdline {
    /// `defaults`, then `user`'s arguments.
    pub(crate) fn new(defaults: &str, user: Option<&str>) -> Self {
        let mut line = defaults.to_owned();
        if let Some(user) = user.map(str::trim).filter(|s| !s.is_empty()) {
            line.push(' ');
            line.push_str(user);
        }
        Self(line)
    }

    /// The line so far.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// A key without a value (`tvix.stdio-ports`).
    pub(crate) fn push_flag(&mut self, key: &str) {
        self.0.push(' ');
        self.0.push_str(key);
    }

    /// `key=value`; `value` has no spaces or quotes.
    pub(crate) fn push_value(&mut self, key: &str, value: &str) {
        debug_assert!(!value.contains([' ', '"']));
        self.0.push(' ');
        self.0.push_str(key);
        self.0.push('=');
        self.0.push_str(value);
    }

    /// The keys for `mode`: the guest then does `mode` as checked, e.g. with
    /// `--shell-path`'s store path resolved to its bin/sh.
    pub(crate) fn push_mode(&mut self, mode: &Mode) -> Result<(), GuestModeError> {
        let keys = mode.to_cmdline()?;
        if !keys.is_empty() {
            self.0.push(' ');
            self.0.push_str(&keys);
        }
        Ok(())
    }

    /// The finished line.
    pub(crate) fn into_string(self) -> String {
        self.0
    }
}

/// Checks that the program `mode` names is in the store, so a typo is reported here and
/// not by a guest after a boot. A `--shell-path` naming a store path becomes its
/// `bin/sh`. Paths outside /nix/store are refused: the guest has nothing else.
pub(crate) fn check_in_store(store: &Store, mode: &mut Mode) -> Result<(), GuestModeError> {
    let (flag, path) = match mode {
        Mode::Run { path, .. } => ("--run", path),
        Mode::Init { path } => ("--init", path),
        Mode::Shell { path } if path != DEFAULT_SHELL => ("--shell-path", path),
        Mode::Shell { .. } | Mode::Find | Mode::Nothing => return Ok(()),
    };
    let not_in_store = |reason: String| GuestModeError::NotInStore {
        flag,
        path: path.clone(),
        reason,
    };
    let (store_path, sub_path) = StorePath::from_absolute_path(path).map_err(|e| match e {
        StorePathError::NotInStore(_) => {
            not_in_store("not a path in /nix/store, the only file system the guest has".into())
        }
        e => not_in_store(e.to_string()),
    })?;
    let store_error = |source| GuestModeError::Store {
        flag,
        path: path.clone(),
        source: Box::new(source),
    };
    let lookup = store.lookup(&store_path, sub_path).map_err(store_error)?;
    let node = match lookup {
        Lookup::Found(node) => node,
        Lookup::NoStorePath => {
            return Err(not_in_store(format!(
                "{} is not in the store (import it with `tvix-boot store import` or \
                 `tvix-boot store copy`)",
                store_path.to_absolute_path()
            )));
        }
        Lookup::Missing { found, name } => {
            return Err(not_in_store(format!(
                "{}{found} has no entry {name:?}",
                store_path.to_absolute_path(),
            )));
        }
        Lookup::NotADirectory { at } => {
            return Err(not_in_store(format!(
                "{}{at} is a file, not a directory",
                store_path.to_absolute_path()
            )));
        }
        // Where a symlink on the way leads is the guest's business.
        Lookup::Symlink { .. } => return Ok(()),
    };
    match node {
        Node::File {
            executable: true, ..
        }
        | Node::Symlink { .. } => Ok(()),
        Node::File { .. } => Err(not_in_store("is not executable".into())),
        Node::Directory { .. } if flag == "--shell-path" => {
            let mut shell = Mode::Shell {
                path: format!("{}/bin/sh", path.trim_end_matches('/')),
            };
            check_in_store(store, &mut shell)?;
            *mode = shell;
            Ok(())
        }
        Node::Directory { .. } => Err(not_in_store("is a directory, not a program".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_appended_and_conflicts_named() {
        let run = Mode::Run {
            path: "/nix/store/x-p/bin/p".into(),
            args: vec![b"a b".to_vec()],
        };
        let mut cmdline = GuestCmdline::new("console=ttyS0", Some(" quiet "));
        let chosen = choose(cmdline.as_str(), Some(&run)).unwrap();
        assert_eq!(chosen, run);
        cmdline.push_mode(&chosen).unwrap();
        cmdline.push_flag("tvix.stdio-ports");
        let cmdline = cmdline.into_string();
        assert!(
            cmdline.starts_with("console=ttyS0 quiet tvix.run=/nix/store/x-p/bin/p"),
            "{cmdline}"
        );
        assert!(cmdline.ends_with(" tvix.stdio-ports"), "{cmdline}");

        // The original keys alone still work.
        let cmdline = "console=ttyS0 tvix.run=/nix/store/x-p/bin/p";
        assert!(matches!(choose(cmdline, None), Ok(Mode::Run { .. })));
        let mut cmdline = GuestCmdline::new("console=ttyS0", None);
        assert_eq!(choose(cmdline.as_str(), None).unwrap(), Mode::Nothing);
        cmdline.push_mode(&Mode::Nothing).unwrap();
        assert_eq!(
            cmdline.as_str(),
            "console=ttyS0",
            "no keys, nothing appended"
        );

        // tvix.shell on the command line overrules --run: refused, naming both.
        let cmdline = "console=ttyS0 tvix.shell";
        let err = choose(cmdline, Some(&run)).unwrap_err().to_string();
        assert!(err.contains("--run") && err.contains("tvix.shell"), "{err}");

        assert!(choose("tvix.run", None).is_err());
    }

    #[test]
    fn store_check_names_what_is_missing() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path().join("tools");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/sh"), b"").unwrap();
        std::fs::write(root.join("readme"), b"").unwrap();
        let mut perms = std::fs::metadata(root.join("bin/sh"))
            .unwrap()
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(root.join("bin/sh"), perms).unwrap();
        let store = Store::memory();
        let info = tvix_boot_store::import::import_path(&store, &root, &mut |_| {}).unwrap();
        let base = info.store_path.to_absolute_path();

        let check = |mode: Mode| {
            let mut mode = mode;
            check_in_store(&store, &mut mode).map(|()| mode)
        };
        let run = |path: String| Mode::Run { path, args: vec![] };
        assert!(check(run(format!("{base}/bin/sh"))).is_ok());
        let err = |mode| check(mode).unwrap_err().to_string();
        let e = err(run(format!("{base}/bin/hsh")));
        assert!(
            e.contains("--run") && e.contains("has no entry \"hsh\""),
            "{e}"
        );
        // Unnormalised paths name the same entry.
        let e = err(run(format!("{base}/./bin//hsh")));
        assert!(e.contains("/bin has no entry \"hsh\""), "{e}");
        let e = err(run(format!("{base}/readme")));
        assert!(e.contains("not executable"), "{e}");
        let e = err(run(base.clone()));
        assert!(e.contains("is a directory"), "{e}");
        let e = err(run("/bin/sh".into()));
        assert!(e.contains("not a path in /nix/store"), "{e}");
        let missing = StorePath::new([3; 20], "gone").unwrap().to_absolute_path();
        let e = err(Mode::Init {
            path: format!("{missing}/init"),
        });
        assert!(
            e.contains("--init") && e.contains("is not in the store"),
            "{e}"
        );

        // --shell-path with a store path means its bin/sh.
        assert_eq!(
            check(Mode::Shell { path: base.clone() }).unwrap(),
            Mode::Shell {
                path: format!("{base}/bin/sh")
            }
        );
        assert!(
            check(Mode::Shell {
                path: DEFAULT_SHELL.into()
            })
            .is_ok()
        );
    }
}
