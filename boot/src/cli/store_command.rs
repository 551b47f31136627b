//! `tvix-boot store ...`: import, list, inspect and export store paths.

use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use thiserror::Error;
use tvix_boot::StopSignals;
use tvix_boot::seccomp::{EnableError, SeccompError, ThreadRole};
use tvix_boot_store::binary_cache::{self, CacheError};
use tvix_boot_store::grpc;
use tvix_boot_store::import::{ImportError, import_path};
use tvix_boot_store::local_nix::{self, LocalNixError};
use tvix_boot_store::nixbase32;
use tvix_boot_store::signing::{SigningKey, SigningKeyError};
use tvix_boot_store::store::{
    BLOB_SERVICE_ADDR_ENV, DIRECTORY_SERVICE_ADDR_ENV, PATH_INFO_SERVICE_ADDR_ENV,
};
use tvix_boot_store::store_path::StorePathError;
use tvix_boot_store::{Node, PathInfo, Store, StoreAddrs, StoreError, StorePath};
use tvix_boot_virtiofs::host_mount::{HostMount, MountError};
use tvix_boot_virtiofs::vhost_user::{MAX_REQUEST_QUEUES, VhostUserFsError, VhostUserFsSocket};
use tvix_boot_virtiofs::{StoreFs, StoreFsOptions};

use super::run_vm::parse_duration;
use super::seccomp_flag::SeccompArgs;

/// Imports slower than this get a progress bar.
const PROGRESS_DELAY: Duration = Duration::from_secs(1);

/// Where the store lives. Any address left out falls back to the embedded store under
/// $XDG_DATA_HOME/tvix-boot (or ~/.local/share/tvix-boot).
#[derive(Args, Clone, Debug)]
pub struct StoreAddrArgs {
    /// Blob service: memory://, objectstore+file:///path, objectstore+memory://,
    /// grpc+unix:///socket, grpc+http://host:port, grpc+https://host:port
    #[arg(long, global = true, env = BLOB_SERVICE_ADDR_ENV)]
    pub blob_service_addr: Option<String>,
    /// Directory service: memory://, redb:///path, objectstore+file:///path, grpc+…
    #[arg(long, global = true, env = DIRECTORY_SERVICE_ADDR_ENV)]
    pub directory_service_addr: Option<String>,
    /// Path-info service: memory://, redb:///path, objectstore+file:///path, grpc+…,
    /// nix+https://cache?trusted-public-keys=…
    #[arg(long, global = true, env = PATH_INFO_SERVICE_ADDR_ENV)]
    pub path_info_service_addr: Option<String>,
}

impl StoreAddrArgs {
    /// Whether the store substitutes from a binary cache over HTTP(S) or reaches a
    /// remote store over gRPC (a unix socket or TCP): its threads then need sockets.
    pub fn fetches_over_network(&self) -> bool {
        self.path_info_service_addr
            .as_deref()
            .is_some_and(|addr| addr.starts_with("nix+http"))
            || [
                &self.blob_service_addr,
                &self.directory_service_addr,
                &self.path_info_service_addr,
            ]
            .into_iter()
            .flatten()
            .any(|addr| addr.starts_with("grpc+"))
    }

    pub fn open(&self) -> Result<Store, StoreError> {
        Store::open(&self.addrs()?)
    }

    /// The addresses given, the embedded store's for those left out.
    pub fn addrs(&self) -> Result<StoreAddrs, StoreError> {
        let all_given = self.blob_service_addr.is_some()
            && self.directory_service_addr.is_some()
            && self.path_info_service_addr.is_some();
        let defaults = if all_given {
            StoreAddrs::memory()
        } else {
            StoreAddrs::embedded()?
        };
        Ok(StoreAddrs {
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

impl StoreArgs {
    /// Whether the command serves until SIGINT or SIGTERM, which it then reads from a
    /// signalfd ([`StopSignals`]): they must be blocked before any thread starts.
    pub fn waits_for_stop_signals(&self) -> bool {
        matches!(
            self.command,
            StoreCommand::ServeNar { .. }
                | StoreCommand::Daemon { .. }
                | StoreCommand::Mount { .. }
                | StoreCommand::Virtiofs { .. }
        )
    }
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
        /// Sign every narinfo with this key (Nix's format, as `nix-store
        /// --generate-binary-cache-key` writes it), so a Nix that trusts its public key
        /// copies with its default settings.
        #[arg(long)]
        secret_key: Option<PathBuf>,
    },
    /// Serve the store over gRPC, as tvix-store's daemon does (its blob, directory and
    /// path-info services, under both tvix.* and snix.* names, and grpc.health.v1), to
    /// many clients at once, until SIGINT or SIGTERM. Then it takes no new clients, lets
    /// the connected ones finish (for at most --shutdown-grace, then a few seconds for the
    /// requests running) and exits 0. Clients use grpc+unix:///PATH or
    /// grpc+http://HOST:PORT as store addresses.
    Daemon {
        /// A unix socket path (created with mode 0600, or 0660 with --socket-group), or
        /// HOST:PORT for TCP (a bare PORT listens on 127.0.0.1).
        #[arg(long, short = 'l')]
        listen: String,
        /// Give the unix socket to this group (name or number) and let it connect too.
        #[arg(long)]
        socket_group: Option<String>,
        /// Threads that call the store (its backends block); at least 1.
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// After SIGINT or SIGTERM, how long connected clients may go on (`30s`, `2m`)
        /// before they may send no new requests and are disconnected once their running
        /// ones end.
        // 30 s: long enough for a NAR export or an import in progress, well inside a
        // supervisor's stop timeout (systemd's is 90 s).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        shutdown_grace: Duration,
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
        #[command(flatten)]
        seccomp: SeccompArgs,
    },
    /// Serve the store read-only as a vhost-user-fs backend on a unix socket, for QEMU,
    /// cloud-hypervisor and other VMMs (the guest mounts it by the tag the VMM gives).
    /// Frontends are served one after another until SIGINT or SIGTERM, which remove the
    /// socket.
    Virtiofs {
        /// The unix socket to create (mode 0600, or 0660 with --socket-group).
        #[arg(long)]
        socket: PathBuf,
        /// Give the socket to this group (name or number) and let it connect too.
        #[arg(long)]
        socket_group: Option<String>,
        /// Request queues offered to the frontend, each served by its own thread (the
        /// frontend uses as many as it was configured with, e.g. QEMU's
        /// num-request-queues). Default: the number of host CPUs.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_REQUEST_QUEUES as i64))]
        threads: Option<u16>,
        /// Allow listing the store root (else `ls /nix/store` fails with EPERM).
        #[arg(long)]
        list_root: bool,
        /// Expose castore digests as user.tvix.castore.* extended attributes.
        #[arg(long)]
        show_xattr: bool,
        /// Exit when the first frontend disconnects, instead of waiting for the next.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        seccomp: SeccompArgs,
    },
}

#[derive(Debug, Error)]
enum CliError {
    #[error(transparent)]
    EnableSeccomp(#[from] EnableError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
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
    #[error(transparent)]
    VhostUser(#[from] VhostUserFsError),
    #[error("--socket-group {0:?}: no such group")]
    NoSuchGroup(String),
    #[error(transparent)]
    SigningKey(SigningKeyError),
    #[error(transparent)]
    Daemon(#[from] grpc::DaemonError),
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

/// The buffer between `export-nar` and its stdout: NAR framing comes in small writes.
const NAR_WRITE_BUFFER: usize = 256 << 10;

fn run_command(addrs: &StoreAddrArgs, command: StoreCommand) -> Result<(), CliError> {
    tune_allocator_for_streams();
    // The threads that serve requests run under filters (see tvix_boot::seccomp).
    if let StoreCommand::Mount { seccomp, .. } | StoreCommand::Virtiofs { seccomp, .. } = &command {
        seccomp.enable(addrs)?;
    }
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
            // Straight to descriptor 1: std's stdout is line-buffered, so it would scan
            // every byte of the NAR for newlines and split its writes at them.
            let raw = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(CliError::Stdout)?;
            let mut nar = BufWriter::with_capacity(NAR_WRITE_BUFFER, std::fs::File::from(raw));
            store.write_nar(&info.node, &mut nar)?;
            nar.flush().map_err(CliError::Stdout)?;
        }
        StoreCommand::Copy { store_paths } => {
            for (path, _already_there) in local_nix::copy_closure(&store, &store_paths)? {
                writeln!(stdout, "{path}").map_err(CliError::Stdout)?;
            }
        }
        StoreCommand::ServeNar { listen, secret_key } => {
            let key = secret_key
                .map(|path| SigningKey::read(&path))
                .transpose()
                .map_err(CliError::SigningKey)?;
            serve_nar(store, &listen, key)?
        }
        StoreCommand::Daemon {
            listen,
            socket_group,
            threads,
            shutdown_grace,
        } => {
            let group = socket_group.as_deref().map(group_id).transpose()?;
            daemon(store, &listen, group, threads, shutdown_grace)?;
        }
        StoreCommand::Mount {
            dir,
            list_root,
            show_xattr,
            threads,
            seccomp: _,
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
        StoreCommand::Virtiofs {
            socket,
            socket_group,
            threads,
            list_root,
            show_xattr,
            once,
            seccomp: _,
        } => {
            let group = socket_group.as_deref().map(group_id).transpose()?;
            let request_queues = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(1, |n| u16::try_from(n.get()).unwrap_or(MAX_REQUEST_QUEUES))
                    .min(MAX_REQUEST_QUEUES)
            });
            serve_vhost_user(
                store,
                &socket,
                group,
                request_queues,
                StoreFsOptions {
                    list_root,
                    show_xattr,
                },
                once,
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

fn daemon(
    store: Store,
    listen: &str,
    group: Option<u32>,
    threads: usize,
    grace: Duration,
) -> Result<(), CliError> {
    let signals = StopSignals::new().map_err(CliError::Signals)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("daemon")
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(async {
        let listener = grpc::Listener::bind(&grpc::ListenAddr::parse(listen), group).await?;
        eprintln!(
            "tvix-boot: serving the store over gRPC; clients use {}",
            listener.client_url()
        );
        let shutdown = async move {
            match signals.recv().await {
                Ok(signal) => eprintln!(
                    "tvix-boot: signal {signal}: taking no new clients; exiting when the \
                     connected ones have finished (at most {} s)",
                    grace.as_secs_f64()
                ),
                Err(e) => {
                    tracing::warn!("cannot wait for SIGINT and SIGTERM: {e}");
                    std::future::pending::<()>().await;
                }
            }
        };
        let on_connect: Arc<dyn Fn(&str) + Send + Sync> =
            Arc::new(|peer: &str| eprintln!("tvix-boot: client connected: {peer}"));
        grpc::serve(
            Arc::new(store),
            listener,
            threads,
            on_connect,
            shutdown,
            grace,
        )
        .await?;
        Ok(())
    })
}

fn serve_nar(store: Store, listen: &str, key: Option<SigningKey>) -> Result<(), CliError> {
    let signals = StopSignals::new().map_err(CliError::Signals)?;
    let runtime = tokio::runtime::Runtime::new().map_err(CliError::Runtime)?;
    runtime.block_on(async {
        let (listener, addr) = binary_cache::bind(listen).await?;
        eprintln!("tvix-boot: serving the store as a binary cache on http://{addr}");
        if let Some(key) = &key {
            eprintln!(
                "tvix-boot: narinfos are signed; the public key is {}",
                key.public_key()
            );
        }
        let shutdown = async move {
            match signals.recv().await {
                Ok(signal) => tracing::info!(signal, "stopping the binary cache"),
                Err(e) => {
                    // Nothing else would ever stop the server: say so, and serve on
                    // until the process is killed.
                    tracing::warn!("cannot wait for SIGINT and SIGTERM: {e}");
                    std::future::pending::<()>().await;
                }
            }
        };
        binary_cache::serve_signed(Arc::new(store), listener, key.map(Arc::new), shutdown).await?;
        Ok(())
    })
}

fn mount(
    store: Store,
    dir: &std::path::Path,
    options: StoreFsOptions,
    threads: usize,
) -> Result<(), CliError> {
    let mut signals = StopSignals::new().map_err(CliError::Signals)?;
    // An unmount from outside ends the serving threads, which then end the wait below,
    // as FUSE daemons exit when their file system goes away.
    let unmounted = signals.waker();
    let mounted = HostMount::mount(
        StoreFs::new(fs_store(Arc::new(store)), options),
        dir,
        threads,
        Box::new(unmounted),
    )?;
    eprintln!(
        "tvix-boot: store mounted at {}; SIGINT or SIGTERM unmounts",
        dir.display()
    );
    match signals.wait().map_err(CliError::Signals)? {
        Some(signal) => {
            tracing::info!(signal, "unmounting");
            mounted.unmount()?;
        }
        None => {
            eprintln!("tvix-boot: {} was unmounted; exiting", dir.display());
            mounted.finish();
        }
    }
    Ok(())
}

fn serve_vhost_user(
    store: Store,
    socket: &std::path::Path,
    group: Option<u32>,
    request_queues: u16,
    options: StoreFsOptions,
    once: bool,
) -> Result<(), CliError> {
    let mut signals = StopSignals::new().map_err(CliError::Signals)?;
    let mut listener = VhostUserFsSocket::bind(socket, group)?;
    let socket_path = socket.to_owned();
    // The main thread blocks in accept or in a session; a signal ends the process from
    // here. Nothing is lost by that: the store is only read.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || match signals.wait() {
            Ok(Some(signal)) => {
                let _ = std::fs::remove_file(&socket_path);
                eprintln!("tvix-boot: signal {signal}: socket removed, exiting");
                std::process::exit(0);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot wait for SIGINT and SIGTERM: {e}"),
        })
        .map_err(CliError::Signals)?;
    // From here on this thread only serves frontends.
    tvix_boot_seccomp::apply_to_current_thread(ThreadRole::VhostUserFrontend)?;
    eprintln!(
        "tvix-boot: serving the store as vhost-user-fs on {} ({request_queues} request queues)",
        socket.display()
    );
    let store = Arc::new(store);
    loop {
        let end = listener.serve_session(
            StoreFs::new(fs_store(store.clone()), options),
            request_queues,
            |frontend| match frontend {
                Some(frontend) => eprintln!("tvix-boot: frontend connected: {frontend}"),
                None => eprintln!("tvix-boot: frontend connected (could not tell which)"),
            },
        )?;
        let who = end.frontend.map_or_else(
            || "frontend".to_owned(),
            |f| format!("frontend pid {}", f.pid),
        );
        match end.error {
            None => eprintln!("tvix-boot: {who} disconnected"),
            Some(e) => eprintln!("tvix-boot: {who}: session ended: {e}"),
        }
        eprintln!("tvix-boot: requests per queue: {}", end.requests);
        if once {
            return Ok(());
        }
        eprintln!("tvix-boot: waiting for the next frontend");
    }
}

/// A group by name, or by number.
fn group_id(group: &str) -> Result<u32, CliError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group).map_err(|_| CliError::NoSuchGroup(group.into()))?;
    let mut entry = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut result = std::ptr::null_mut();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the call: `name` is NUL-terminated, `entry` and
    // `result` are writable, and `buffer` is writable for its stated length.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            entry.as_mut_ptr(),
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(CliError::NoSuchGroup(group.into()));
    }
    // SAFETY: getgrnam_r succeeded and set `result` to `entry`, which it filled in.
    Ok(unsafe { entry.assume_init() }.gr_gid)
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

/// What a file system over `store` serves: its castore services and its store paths.
fn fs_store(store: Arc<Store>) -> tvix_boot_virtiofs::FsStore {
    tvix_boot_virtiofs::FsStore {
        blobs: store.blobs.clone(),
        directories: store.directories.clone(),
        root_nodes: store,
    }
}

/// Fixed glibc malloc thresholds for the store commands, which pass 1 MiB buffers around
/// (gRPC messages, blob chunks, NAR copies). Not for a VM: it would keep more memory.
///
/// glibc's default moves its mmap threshold up to the size of the last large block
/// freed and its trim threshold to twice that. With a few 1 MiB blocks in flight, the
/// free space at the top of a thread's heap keeps crossing 2 MiB and is handed back to
/// the kernel, and the next block faults it in again, zeroed. Reading a 1 GiB blob over
/// `grpc+unix` (`store export-nar`) spent most of its system time so: 0.7 to 0.9 s with
/// the defaults, 0.3 s with these values (1.8 against 1.3 s wall, beside another job).
/// On a quiet machine a trim threshold of 8, 16 and 32 MiB took 1.3, 1.1 and 0.95 s.
/// The local `export-nar` of the same blob went from 0.9 to 0.45 s. The cost: up to
/// 32 MiB of free space kept at the top of a heap (the client's peak RSS for that read:
/// 41 to 50 MB). A VM keeps glibc's defaults: there this kept 7.6 MiB more after a
/// guest's 100,000 opens.
fn tune_allocator_for_streams() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 4 << 20;
        const TRIM_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only sets glibc's allocator parameters, under its own lock.
        let set = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        // mallopt refuses only values out of its range, which these are not; with the
        // defaults everything works, only slower.
        debug_assert!(set, "mallopt refused the thresholds");
    }
}
