//! Harness for end-to-end tests: real guests, real peers.
//!
//! The build machines' /dev/kvm is PVM and cannot run a Linux guest, so
//! end-to-end tests run the static tvix-boot binary inside a QEMU TCG "test
//! host" that has real (nested SVM) KVM:
//!
//! ```no_run
//! use std::time::Duration;
//! use tvix_boot_tests::{GuestFile, TestHost, assets};
//!
//! let bin = assets::tvix_boot_static()?; // $TVIX_BOOT_BIN, or a static cargo build
//! let host = TestHost::builder().tvix_boot(bin).build()?;
//! let out = host.run_tvix_boot(
//!     &["--initrd", "/guest/initrd.cpio", "--cmdline", "console=ttyS0"],
//!     &[("CH_NUM_CPUS", "2")],
//!     &[GuestFile::bytes("/guest/initrd.cpio", vec![], 0o644)],
//!     Duration::from_secs(120),
//! )?;
//! assert!(out.success(), "{out}");
//! # Ok::<(), tvix_boot_tests::Error>(())
//! ```
//!
//! Heavy inputs (Debian test-host kernel, guest kernel) are cached under
//! [`assets::cache_dir`]; the per-run initramfs is rebuilt every time.
//!
//! A boot costs seconds to tens of seconds, so the end-to-end tests
//! (`tests/tests/e2e/`) share them: a [`Suite`] runs many cases in one boot, each with
//! its own output and exit status, and a [`Plan`] runs the suites, two test hosts at a
//! time on the build machines' two cores, the longest first, with every case a test
//! of its own.

pub mod assets;
pub mod cpython;
mod error;
pub mod initramfs;
mod kvm;
pub mod lying_store;
pub mod nix;
pub mod plan;
pub mod qemu;
pub mod suite;
pub mod testhost;
pub mod tree;

pub use error::{Error, Result};
pub use initramfs::Initramfs;
pub use kvm::hardware_kvm_available;
pub use plan::Plan;
pub use suite::{Suite, SuiteOutput};
pub use testhost::{
    FileContents, GUEST_KERNEL, GuestFile, TVIX_BOOT, TestHost, TestHostBuilder, TestHostOutput,
    Timings,
};
