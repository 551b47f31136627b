//! `tvix-boot store ...`: import, list, inspect and export store paths.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;
use tvix_boot_store::binary_cache::{self, CacheError};
use tvix_boot_store::import::{ImportError, import_path};
use tvix_boot_store::local_nix::{self, LocalNixError};
use tvix_boot_store::nixbase32;
use tvix_boot_store::store::{
    BLOB_SERVICE_ADDR_ENV, DIRECTORY_SERVICE_ADDR_ENV, PATH_INFO_SERVICE_ADDR_ENV,
};
use tvix_boot_store::store_path::StorePathError;
use tvix_boot_store::{Node, PathInfo, Store, StoreAddrs, StoreError, StorePath};
use tvix_boot_virtiofs::host_mount::{HostMount, MountError};
use tvix_boot_virtiofs::{StoreFs, StoreFsOptions};

/// Imports slower than this get a progress bar.
const PROGRESS_DELAY: Duration = Duration::from_secs(1);

/// Where the store lives. Any address left out falls back to the embedded store under
/// $XDG_DATA_HOME/tvix-boot (or ~/.local/share/tvix-boot).
#[derive(Args, Clone, Debug)]
pub struct StoreAddrArgs {
    /// Blob service: memory://, objectstore+file:///path, objectstore+memory://
    #[arg(long, global = true, env = BLOB_SERVICE_ADDR_ENV)]
    pub blob_service_addr: Option<String>,
    /// Directory service: memory://, redb:///path, objectstore+file:///path
    #[arg(long, global = true, env = DIRECTORY_SERVICE_ADDR_ENV)]
    pub directory_service_addr: Option<String>,
    /// Path-info service: memory://, redb:///path, objectstore+file:///path
    #[arg(long, global = true, env = PATH_INFO_SERVICE_ADDR_ENV)]
    pub path_info_service_addr: Option<String>,
}

impl StoreAddrArgs {
    pub fn open(&self) -> Result<Store, StoreError> {
        let all_given = self.blob_service_addr.is_some()
            && self.directory_service_addr.is_some()
            && self.path_info_service_addr.is_some();
        let defaults = if all_given {
            StoreAddrs::memory()
        } else {
            StoreAddrs::embedded()?
        };
        Store::open(&StoreAddrs {
            blob: self.blob_service_addr.clone().unwrap_or(defaults.blob),
            directory: self
                .directory_service_addr
                .clone()
                .unwrap_or(defaults.directory),
            path_info: self
                .path_info_service_addr
                .clone()
                .unwrap_or(defaults.path_info),
        })
    }
}

#[derive(Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Import files, directories or symlinks; prints one store path per line, the same
    /// path `nix-store --add` gives.
    Import {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List every store path in the store.
    List,
    /// Show a store path's NAR hash and size, references and root node.
    Info { store_path: String },
    /// Write a store path as a NAR to stdout, byte-identical to `nix-store --dump`.
    ExportNar { store_path: String },
    /// Copy store paths and their whole closure from the local Nix store (/nix/store),
    /// checking each NAR against Nix's recorded hash. Prints the closure.
    Copy {
        #[arg(required = true)]
        store_paths: Vec<String>,
    },
    /// Serve the store as an HTTP binary cache: `nix copy --to http://ADDR?compression=none`
    /// pushes closures into it, `nix copy --from` and substituters read from it.
    ServeNar {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
    },
    /// Mount the store read-only at DIR through /dev/fuse, in the foreground, until
    /// SIGINT or SIGTERM.
    Mount {
        dir: PathBuf,
        /// Allow listing the store root (else `ls DIR` fails with EPERM).
        #[arg(long)]
        list_root: bool,
        /// Expose castore digests as user.tvix.castore.* extended attributes.
        #[arg(long)]
        show_xattr: bool,
        /// Threads serving FUSE requests.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
}

#[derive(Debug, Error)]
enum CliError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error("{input:?} is not a store path: {source}")]
    BadStorePath {
        input: String,
        source: StorePathError,
    },
    #[error("{0} is not in the store")]
    NotInStore(StorePath),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot wait for signals: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    LocalNix(#[from] LocalNixError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

pub fn run(addrs: &StoreAddrArgs, args: StoreArgs) -> ExitCode {
    match run_command(addrs, args.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tvix-boot: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(addrs: &StoreAddrArgs, command: StoreCommand) -> Result<(), CliError> {
    let store = addrs.open()?;
    let mut stdout = BufWriter::new(std::io::stdout().lock());
    match command {
        StoreCommand::Import { paths } => {
            for path in paths {
                let info = import_with_progress(&store, &path)?;
                writeln!(stdout, "{}", info.store_path).map_err(CliError::Stdout)?;
                // Paths appear as they land, so a later failure still shows what succeeded.
                stdout.flush().map_err(CliError::Stdout)?;
            }
        }
        StoreCommand::List => {
            for info in store.path_infos.list().map_err(StoreError::from)? {
                writeln!(stdout, "{}", info.store_path).map_err(CliError::Stdout)?;
            }
        }
        StoreCommand::Info { store_path } => {
            let info = lookup(&store, &store_path)?;
            write_info(&mut stdout, &info).map_err(CliError::Stdout)?;
        }
        StoreCommand::ExportNar { store_path } => {
            let info = lookup(&store, &store_path)?;
            store.write_nar(&info.node, &mut stdout)?;
        }
        StoreCommand::Copy { store_paths } => {
            for (path, _already_there) in local_nix::copy_closure(&store, &store_paths)? {
                writeln!(stdout, "{path}").map_err(CliError::Stdout)?;
            }
        }
        StoreCommand::ServeNar { listen } => serve_nar(store, &listen)?,
        StoreCommand::Mount {
            dir,
            list_root,
            show_xattr,
            threads,
        } => {
            mount(
                store,
                &dir,
                StoreFsOptions {
                    list_root,
                    show_xattr,
                },
                threads,
            )?;
        }
    }
    stdout.flush().map_err(CliError::Stdout)
}

/// Accepts `/nix/store/<hash>-<name>` or the bare basename.
fn lookup(store: &Store, input: &str) -> Result<PathInfo, CliError> {
    let parsed = if input.starts_with('/') {
        StorePath::from_absolute_path(input).and_then(|(path, rest)| {
            if rest.trim_matches('/').is_empty() {
                Ok(path)
            } else {
                Err(StorePathError::NotInStore(input.into()))
            }
        })
    } else {
        StorePath::from_basename(input)
    };
    let path = parsed.map_err(|source| CliError::BadStorePath {
        input: input.to_owned(),
        source,
    })?;
    store.path_info(&path)?.ok_or(CliError::NotInStore(path))
}

fn write_info(out: &mut impl Write, info: &PathInfo) -> std::io::Result<()> {
    writeln!(out, "path: {}", info.store_path)?;
    writeln!(
        out,
        "nar-hash: sha256:{}",
        nixbase32::encode(&info.nar_sha256)
    )?;
    writeln!(out, "nar-size: {}", info.nar_size)?;
    match &info.node {
        Node::Directory { digest, size } => {
            writeln!(out, "root: directory {digest} ({size} entries below)")?
        }
        Node::File {
            digest,
            size,
            executable,
        } => {
            let kind = if *executable {
                "executable file"
            } else {
                "file"
            };
            writeln!(out, "root: {kind} {digest} ({size} bytes)")?
        }
        Node::Symlink { target } => {
            writeln!(out, "root: symlink -> {}", String::from_utf8_lossy(target))?
        }
    }
    writeln!(out, "references:")?;
    for reference in &info.references {
        writeln!(out, "  {reference}")?;
    }
    if let Some(deriver) = &info.deriver {
        writeln!(out, "deriver: {deriver}")?;
    }
    if let Some(ca) = &info.ca {
        writeln!(out, "ca: {ca}")?;
    }
    for signature in &info.signatures {
        writeln!(out, "signature: {signature}")?;
    }
    Ok(())
}

fn serve_nar(store: Store, listen: &str) -> Result<(), CliError> {
    let runtime = tokio::runtime::Runtime::new().map_err(CliError::Runtime)?;
    runtime.block_on(async {
        let (listener, addr) = binary_cache::bind(listen).await?;
        eprintln!("tvix-boot: serving the store as a binary cache on http://{addr}");
        binary_cache::serve(Arc::new(store), listener, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        // Without signal handlers the default actions still end the process.
        _ => std::future::pending().await,
    }
}

fn mount(
    store: Store,
    dir: &std::path::Path,
    options: StoreFsOptions,
    threads: usize,
) -> Result<(), CliError> {
    // Register for the signals before mounting, so none is lost in between.
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(CliError::Signals)?;
    let mounted = HostMount::mount(StoreFs::new(Arc::new(store), options), dir, threads)?;
    eprintln!(
        "tvix-boot: store mounted at {}; SIGINT or SIGTERM unmounts",
        dir.display()
    );
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "unmounting");
    }
    mounted.unmount()?;
    Ok(())
}

fn import_with_progress(store: &Store, path: &std::path::Path) -> Result<PathInfo, ImportError> {
    let started = Instant::now();
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{spinner} importing {msg}: {bytes} ({binary_bytes_per_sec})")
            .expect("progress template is valid"),
    );
    bar.set_message(path.display().to_string());
    let mut shown = false;
    let result = import_path(store, path, &mut |bytes| {
        bar.inc(bytes);
        if !shown && started.elapsed() > PROGRESS_DELAY {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
    });
    bar.finish_and_clear();
    result
}
