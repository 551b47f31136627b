//! The end-to-end tier: tvix-boot in the QEMU TCG test host (nested KVM), against real
//! peers (QEMU, Nix, systemd, CPython). Every test here fails, never skips, when what it
//! needs cannot run.
//!
//!     cargo test -p tvix-boot-tests --test e2e [-- FILTER]
//!
//! One binary, so that its test hosts run side by side (`--test-threads`, by default one
//! per CPU) rather than one test binary after another. Each module is a suite: its cases
//! share one test-host boot and are tests of their own, named `module::case`
//! (tvix_boot_tests::plan). Each suite prints where its boot's time went and writes its
//! whole serial log under the target directory (`tmp/e2e-logs/<suite>.log`).

mod bounded_resources;
mod grpc_store;
mod guest_kernel;
mod library_examples;
mod network;
mod nix_closure;
mod program_streams;
mod run_modes;
mod system_closures;
mod terminal;
mod testhost;
mod vhost_user_fs;
mod virtiofs_guest;
mod vm_boot;

use std::time::Duration;

use tvix_boot_tests::Plan;

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let mut plan = Plan::new().log_dir(concat!(env!("CARGO_TARGET_TMPDIR"), "/e2e-logs"));
    // Costs: roughly how long each boot took on the 2-core build machine with another
    // test host beside it (and other builds: halve them for a quiet machine); they only
    // set the order, longest first.
    plan.suite(
        "bounded_resources",
        secs(600),
        bounded_resources::suite,
        bounded_resources::CHECKS,
    );
    plan.suite(
        "system_closures",
        secs(90),
        system_closures::suite,
        system_closures::CHECKS,
    );
    plan.suite(
        "program_streams",
        secs(320),
        program_streams::suite,
        program_streams::CHECKS,
    );
    plan.suite("run_modes", secs(165), run_modes::suite, run_modes::CHECKS);
    plan.suite(
        "grpc_store",
        secs(350),
        grpc_store::suite,
        grpc_store::CHECKS,
    );
    plan.suite("terminal", secs(65), terminal::suite, terminal::CHECKS);
    plan.suite(
        "library_examples",
        secs(50),
        library_examples::suite,
        library_examples::CHECKS,
    );
    plan.suite(
        "vhost_user_fs",
        secs(180),
        vhost_user_fs::suite,
        vhost_user_fs::CHECKS,
    );
    plan.suite(
        "virtiofs_guest",
        secs(45),
        virtiofs_guest::suite,
        virtiofs_guest::CHECKS,
    );
    plan.suite(
        "virtiofs_guest_two_cpus",
        secs(40),
        virtiofs_guest::two_cpus_suite,
        virtiofs_guest::TWO_CPUS_CHECKS,
    );
    plan.suite("vm_boot", secs(45), vm_boot::suite, vm_boot::CHECKS);
    plan.suite("network", secs(120), network::suite, network::CHECKS);
    plan.suite(
        "nix_closure",
        secs(30),
        nix_closure::suite,
        nix_closure::CHECKS,
    );
    plan.test(
        "guest_kernel::guest_kernel_boots_under_qemu_and_powers_off_via_acpi",
        secs(30),
        guest_kernel::guest_kernel_boots_under_qemu_and_powers_off_via_acpi,
    );
    plan.test(
        "guest_kernel::guest_kernel_config_has_what_tvix_boot_and_systemd_need",
        secs(0),
        guest_kernel::guest_kernel_config_has_what_tvix_boot_and_systemd_need,
    );
    plan.suite(
        "testhost_suite",
        secs(20),
        testhost::suite,
        testhost::CHECKS,
    );
    for (name, test) in [
        (
            "testhost::kvm_is_available_in_the_test_host",
            testhost::kvm_is_available_in_the_test_host as fn(),
        ),
        (
            "testhost::script_exit_code_is_reported",
            testhost::script_exit_code_is_reported,
        ),
        (
            "testhost::a_too_short_timeout_is_reported",
            testhost::a_too_short_timeout_is_reported,
        ),
        (
            "testhost::host_files_and_the_guest_kernel_are_installed",
            testhost::host_files_and_the_guest_kernel_are_installed,
        ),
        (
            "testhost::static_tvix_boot_runs_in_the_test_host",
            testhost::static_tvix_boot_runs_in_the_test_host,
        ),
        (
            "testhost::a_failed_setup_fails_every_case_with_its_output",
            testhost::a_failed_setup_fails_every_case_with_its_output,
        ),
    ] {
        plan.test(name, secs(15), test);
    }
    plan.ignored_test("vm_boot::boot_timing", vm_boot::boot_timing);
    plan.ignored_test(
        "vm_boot::qemu_comparison_timing",
        vm_boot::qemu_comparison_timing,
    );
    plan.run(&args).exit();
}
