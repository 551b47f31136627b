//! The CLI's mode flags: `--run`, `--shell`, `--shell-path`, `--init`, `--find` and the
//! program's arguments, turned into the guest init's `Mode` (the library checks it
//! against the command line and the store).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use tvix_boot_guest_init::protocol::{DEFAULT_SHELL, Mode};

/// What to do in the guest. At most one of these.
#[derive(clap::Args, Debug, Default)]
pub struct ModeArgs {
    /// Run PATH (a program in /nix/store) in the guest, then power off. tvix-boot exits
    /// with the program's exit status. Arguments for the program follow `--`.
    #[arg(long, value_name = "PATH", group = "mode")]
    pub run: Option<String>,

    /// An interactive shell on the console, with the store at /nix/store. The shell is
    /// the host's static busybox (/bin/busybox) unless --shell-path names one.
    #[arg(long, group = "mode")]
    pub shell: bool,

    /// The shell for --shell: a program in /nix/store, or a store path with bin/sh.
    /// Implies --shell.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["run", "init", "find"])]
    pub shell_path: Option<String>,

    /// Boot a system: the guest switch_roots into a tmpfs with the store at
    /// /nix/store and runs PATH (in /nix/store) as PID 1.
    #[arg(long, value_name = "PATH", group = "mode")]
    pub init: Option<String>,

    /// Print every path under /nix/store, then power off.
    #[arg(long, group = "mode")]
    pub find: bool,

    /// Arguments for --run's program, passed on byte for byte (spaces included).
    // (clap does not enforce `requires` on a `last` positional; `requested` checks.)
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// Flags that make no mode.
#[derive(Debug, thiserror::Error)]
pub enum ModeArgsError {
    #[error("arguments after `--` are for the program of --run, but --run is not given")]
    ArgsWithoutRun,
}

impl ModeArgs {
    /// The mode the flags ask for, `None` if they ask for nothing.
    pub fn requested(&self) -> Result<Option<Mode>, ModeArgsError> {
        if let Some(path) = &self.run {
            let args = self.args.iter().cloned().map(OsString::into_vec).collect();
            return Ok(Some(Mode::Run {
                path: path.clone(),
                args,
            }));
        }
        if !self.args.is_empty() {
            return Err(ModeArgsError::ArgsWithoutRun);
        }
        Ok(self.requested_without_run())
    }

    fn requested_without_run(&self) -> Option<Mode> {
        if let Some(path) = &self.shell_path {
            return Some(Mode::Shell { path: path.clone() });
        }
        if self.shell {
            return Some(Mode::Shell {
                path: DEFAULT_SHELL.into(),
            });
        }
        if let Some(path) = &self.init {
            return Some(Mode::Init { path: path.clone() });
        }
        self.find.then_some(Mode::Find)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ModeArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            mode: ModeArgs,
        }
        let argv = std::iter::once("tvix-boot").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).map(|cli| cli.mode)
    }

    #[test]
    fn flags_become_modes() {
        let run = parse(&["--run", "/nix/store/x/bin/p", "--", "a b", "", "--c"]).unwrap();
        assert_eq!(
            run.requested().unwrap(),
            Some(Mode::Run {
                path: "/nix/store/x/bin/p".into(),
                args: vec![b"a b".to_vec(), b"".to_vec(), b"--c".to_vec()],
            })
        );
        assert_eq!(
            parse(&["--shell"]).unwrap().requested().unwrap(),
            Some(Mode::Shell {
                path: DEFAULT_SHELL.into()
            })
        );
        assert_eq!(
            parse(&["--shell-path", "/nix/store/b"])
                .unwrap()
                .requested()
                .unwrap(),
            Some(Mode::Shell {
                path: "/nix/store/b".into()
            })
        );
        assert_eq!(
            parse(&["--find"]).unwrap().requested().unwrap(),
            Some(Mode::Find)
        );
        assert_eq!(parse(&[]).unwrap().requested().unwrap(), None);
    }

    #[test]
    fn contradicting_flags_are_refused() {
        for args in [
            &["--run", "/a", "--shell"][..],
            &["--run", "/a", "--init", "/b"],
            &["--shell-path", "/a", "--run", "/b"],
            &["--find", "--init", "/b"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        for args in [&["--shell", "--", "arg"][..], &["--", "arg"]] {
            let err = parse(args).unwrap().requested().unwrap_err().to_string();
            assert!(err.contains("--run"), "{err}");
        }
    }
}
