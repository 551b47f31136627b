//! [`MicroVm::start`], in the order it happens: what the configuration means (checked
//! before anything is opened), the store, the guest's ports and initrd, the machine and
//! its devices, and then the VM's own thread.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tvix_boot_devices::virtio::net::{DEFAULT_MAC, VirtioNet};
use tvix_boot_guest_init::protocol::{KEY_NET, Mode};
use tvix_boot_store::{Store, StoreAddrs};
use tvix_boot_virtiofs::{FsStore, QueueService, StoreFs, StoreFsOptions, VirtioFs};
use tvix_boot_vmm::{ConsoleIo, HostStop, Initrd, VmBuilder, VmConfig, startup};

use super::ports::{Ports, dup_own};
use super::running::{VmJob, VmStopper, VmThread};
use super::{
    Console, DEFAULT_CMDLINE, ExitStatus, Guest, MicroVm, MicroVmError, RunningVm, StoreSource,
    default_kernel,
};
use crate::guest_mode::{self, GuestCmdline};
use crate::host_signals::HostSignals;
use crate::initrd::{self, HOST_BUSYBOX, ProgramSetup};
use crate::network::{self, GUEST_NETWORK, NetworkError};
use crate::terminal::RawTerminal;

/// The virtio-fs tag the guest mounts at /nix/store.
const STORE_TAG: &str = "tvix";

/// What the configuration means, worked out before anything is opened or started, so
/// that every error in it is reported first.
pub(super) struct Plan {
    guest: Guest,
    /// What tvix-boot's init does; `None` for a custom initrd.
    mode: Option<Mode>,
    cmdline: GuestCmdline,
    /// The console is this process's stdin and stdout.
    pub(super) console_stdio: bool,
    /// `run`'s program has its own streams, on console ports.
    program_streams: bool,
    /// The environment and working directory of `run`'s or `shell`'s program.
    program: Option<ProgramSetup>,
}

impl Plan {
    pub(super) fn new(vm: &MicroVm) -> Result<Self, MicroVmError> {
        let cmdline = GuestCmdline::new(DEFAULT_CMDLINE, vm.cmdline.as_deref());
        let mut guest = vm.guest.clone();
        if !vm.args.is_empty() {
            match &mut guest {
                Guest::Init(Some(Mode::Run { args, .. })) => args.extend(vm.args.iter().cloned()),
                _ => return Err(MicroVmError::ArgsWithoutRun),
            }
        }
        // The mode, checked against the command line's own keys.
        let mode = match &guest {
            Guest::Init(requested) => {
                Some(guest_mode::choose(cmdline.as_str(), requested.as_ref())?)
            }
            Guest::CustomInitrd(_) => None,
        };
        let runs = matches!(mode, Some(Mode::Run { .. }));
        let console_stdio = match vm.console {
            Console::Stdio => true,
            Console::Log => false,
            Console::Auto => {
                !runs || (std::io::stdin().is_terminal() && std::io::stdout().is_terminal())
            }
            Console::StdioExceptRun => !runs,
        };
        let program_streams = runs && !console_stdio;
        let streams_given = vm.stdin.is_some() || vm.stdout.is_some() || vm.stderr.is_some();
        if streams_given && !program_streams {
            return Err(MicroVmError::StreamsWithConsole);
        }
        let program = match &mode {
            Some(Mode::Run { .. } | Mode::Shell { .. }) => Some(ProgramSetup {
                env: program_env(&vm.env, console_stdio),
                workdir: vm.workdir.clone(),
            }),
            _ if !vm.env.is_empty() || vm.workdir.is_some() => {
                return Err(MicroVmError::ProgramSetupWithoutProgram);
            }
            _ => None,
        };
        Ok(Self {
            guest,
            mode,
            cmdline,
            console_stdio,
            program_streams,
            program,
        })
    }

    /// Whether the guest runs a program under tvix-boot's init, which reports its status
    /// and takes requests (stop, signals).
    fn runs_a_program(&self) -> bool {
        matches!(
            self.mode,
            Some(Mode::Run { .. } | Mode::Shell { .. } | Mode::Find)
        )
    }
}

impl MicroVm {
    /// Checks everything, creates the VM and starts it on a thread of its own. Every
    /// input error (kernel, store, a program not in the store, memory) is reported here,
    /// before anything runs.
    pub fn start(self) -> Result<RunningVm, MicroVmError> {
        let started_at = Instant::now();
        let kernel = match &self.kernel {
            Some(kernel) => kernel.clone(),
            None => match default_kernel() {
                Some(kernel) if kernel.exists() => kernel,
                looked_at => return Err(MicroVmError::NoKernel { looked_at }),
            },
        };
        let mut plan = Plan::new(&self)?;
        // passt starts while the VM is set up; it is waited for before the VM runs.
        let mut network = self.network.as_ref().map(network::start).transpose()?;
        // Installing its seccomp filter overlaps with the set-up below.
        let vm_thread = VmThread::start()?;

        let store = match self.store {
            StoreSource::Open(store) => store,
            StoreSource::Addrs(addrs) => Arc::new(Store::open(&addrs)?),
            StoreSource::Embedded => Arc::new(Store::open(&StoreAddrs::embedded()?)?),
        };
        startup::mark("store opened");
        if let Some(mode) = &mut plan.mode {
            guest_mode::check_in_store(&store, mode)?;
            plan.cmdline.push_mode(mode)?;
        }

        let mut ports = Ports::default();
        if plan.program_streams {
            let streams = [self.stdin, self.stdout, self.stderr].map(Option::unwrap_or_default);
            ports.add_program_streams(&mut plan.cmdline, streams)?;
        }
        let mut terminal_sizes = None;
        if plan.console_stdio && plan.program.is_some() {
            match self.terminal_sizes {
                Some(sizes) => ports.add_terminal_sizes(&mut plan.cmdline, sizes),
                None if self.follow_terminal_size => {
                    terminal_sizes = ports.follow_terminal_size(&mut plan.cmdline)?;
                }
                None => {}
            }
        }
        if plan.runs_a_program() {
            ports.add_control(&mut plan.cmdline)?;
        }
        if network.is_some() {
            plan.cmdline.push_value(KEY_NET, &GUEST_NETWORK.to_value());
        }

        let initrd = match (&plan.guest, &plan.mode) {
            (Guest::CustomInitrd(path), _) => Initrd::File(path.clone()),
            (_, Some(mode)) => {
                let bytes =
                    initrd::build_initrd_for(mode, Path::new(HOST_BUSYBOX), plan.program.as_ref())?;
                tracing::info!("initrd built in memory: {} bytes", bytes.len());
                startup::mark("initrd built");
                Initrd::Bytes(bytes)
            }
            (Guest::Init(_), None) => unreachable!("tvix-boot's init always has a mode"),
        };
        let console = if plan.console_stdio {
            ConsoleIo {
                input: dup_own(libc::STDIN_FILENO).map_err(MicroVmError::Stdio)?,
                output: Box::new(std::io::stdout()),
            }
        } else {
            ConsoleIo {
                input: None,
                output: self
                    .console_log
                    .unwrap_or_else(|| Box::new(std::io::sink())),
            }
        };

        let expects_status = plan.runs_a_program();
        let config = VmConfig {
            kernel,
            initrd: Some(initrd),
            cmdline: plan.cmdline.into_string(),
            vcpus: self.cpus,
            mem_size: self.memory,
        };
        let mut vm = VmBuilder::new(config, console)?;
        vm.add_virtio_device(store_device(
            store,
            u16::from(self.cpus),
            self.virtiofs_queues,
        ))?;
        if let Some(console_ports) = ports.device()? {
            vm.add_virtio_device(Box::new(console_ports))?;
        }
        let mut passt = None;
        if let Some(host) = network.take() {
            let device =
                VirtioNet::new(host.backend, DEFAULT_MAC, host.mtu).map_err(NetworkError::from)?;
            vm.add_virtio_device(Box::new(device))?;
            passt = host.passt;
        }
        let exit = vm.exit_notifier();
        if let Some(timeout) = self.timeout {
            exit.set_deadline(started_at + timeout, HostStop::TimedOut);
        }
        let stopper = VmStopper {
            exit,
            control: ports.control.take().map(Arc::new),
            grace: self.stop_grace,
        };
        let forward = self.forward_signals.then(|| stopper.clone());
        if terminal_sizes.is_some() || forward.is_some() {
            let signals = HostSignals::new(terminal_sizes, forward).map_err(MicroVmError::Stdio)?;
            vm.add_subscriber(Box::new(signals));
        }
        let status = vm.guest_status();
        // Here, not on the VM's thread: creating vCPUs takes ioctls its filter forbids.
        let vm = vm.build()?;
        if let Some(passt) = &mut passt {
            passt.wait_ready()?;
            startup::mark("passt ready");
        }

        let console_stdio = plan.console_stdio;
        let job: VmJob = Box::new(move || {
            // Raw mode only while the guest runs; restored on every way out of here.
            let _raw_terminal = if console_stdio {
                RawTerminal::enable_if_tty().map_err(MicroVmError::Terminal)?
            } else {
                None
            };
            let exit = vm.run()?;
            Ok(ExitStatus::from_vm(exit, status.get(), expects_status))
        });
        let mut running = vm_thread.run(job, stopper);
        running.stdin = ports.stdin;
        running.stdout = ports.stdout;
        running.stderr = ports.stderr;
        running.passt = passt;
        Ok(running)
    }
}

/// The program's environment: the defaults, then `extra` (later entries win).
pub(crate) fn program_env(
    extra: &[(String, String)],
    with_terminal: bool,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/bin:/sbin".into()),
        ("HOME".into(), "/".into()),
    ];
    if with_terminal {
        let term = std::env::var("TERM").unwrap_or_else(|_| "linux".into());
        env.push(("TERM".into(), term));
    }
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env
}

/// The guest's /nix/store: the store as a virtio-fs device with tag `tvix`, one request
/// queue per vCPU. The root is listable, so `tvix.find` and `ls /nix/store` work.
fn store_device(store: Arc<Store>, request_queues: u16, service: QueueService) -> Box<VirtioFs> {
    let fs = StoreFs::new(
        FsStore {
            blobs: store.blobs.clone(),
            directories: store.directories.clone(),
            root_nodes: store,
        },
        StoreFsOptions {
            list_root: true,
            show_xattr: false,
        },
    );
    Box::new(
        VirtioFs::new(fs, STORE_TAG, request_queues)
            .expect("the tag and queue count are valid")
            .with_queue_service(service),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_environment_starts_small() {
        let env = program_env(
            &[("HOME".into(), "/root".into()), ("X".into(), "1".into())],
            false,
        );
        assert_eq!(
            env,
            vec![
                ("PATH".to_owned(), "/bin:/sbin".to_owned()),
                ("HOME".to_owned(), "/root".to_owned()),
                ("X".to_owned(), "1".to_owned()),
            ]
        );
    }
}
