//! End-to-end with real Nix: a closure built by `nix-build` on this machine runs in a
//! tvix-boot guest (inside the QEMU TCG test host), reached two ways:
//!
//! - `nix copy --to http://…` into `tvix-boot store serve-nar`; the resulting embedded
//!   store goes into the test host, and `tvix-boot --run` runs the closure from it;
//! - `nix copy --to file://…` makes a signed binary cache; in the test host tvix-boot
//!   starts from an empty store with `PATH_INFO_SERVICE_ADDR=nix+file://…` and the guest
//!   pulls every path lazily, the referenced ones only when the guest opens them.
//!
//! Needs nix-bin (as root, sandbox off: the closure copies the host's static busybox).
//! Fails, never skips, when Nix or the test host is missing.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tvix_boot_tests::nix::{CacheKey, ServeNar, nix, nix_build, run};
use tvix_boot_tests::plan::Check;
use tvix_boot_tests::{GUEST_KERNEL, GuestFile, Suite, TestHost, TestHostOutput, assets};

const TIMEOUT: Duration = Duration::from_secs(420);

/// busybox as a store path of its own, and a program whose shebang and body refer to it
/// and to a data path: three store paths, with references Nix finds by scanning. Every
/// builder script ends with a builtin (see `nix_build`).
const CLOSURE: &str = r#"
let
  sh = "/bin/sh";
  bb = derivation { name = "busybox-static"; system = builtins.currentSystem; builder = sh;
    args = [ "-c" "/bin/mkdir -p $out/bin && /bin/cp /bin/busybox $out/bin/busybox && /bin/ln -s busybox $out/bin/sh && true" ]; };
  data = derivation { name = "greeting-data"; system = builtins.currentSystem; builder = sh;
    args = [ "-c" "/bin/mkdir -p $out/share && echo 'greetings from a dependency' > $out/share/greeting" ]; };
in derivation { name = "greeter"; system = builtins.currentSystem; builder = sh;
  args = [ "-c" ''
    /bin/mkdir -p $out/bin
    /usr/bin/printf '#!${bb}/bin/sh\n${bb}/bin/busybox cat ${data}/share/greeting\necho "greeter args: $*"\nexit 7\n' > $out/bin/greeter
    /bin/chmod +x $out/bin/greeter
    true
  '' ]; }
"#;

pub const CHECKS: &[(&str, Check)] = &[(
    "a_closure_from_nix_runs_in_a_guest_copied_and_substituted_lazily",
    a_closure_from_nix_runs_in_a_guest_copied_and_substituted_lazily,
)];

/// Builds the closure with Nix, copies it both ways on the host, and runs it from both
/// in the test host.
pub fn suite() -> Suite {
    let tvix_boot: PathBuf = assets::tvix_boot_static_once()
        .unwrap_or_else(|e| panic!("cannot get the static tvix-boot: {e}"));
    let work = tempfile::tempdir().unwrap();
    let expr = work.path().join("closure.nix");
    std::fs::write(&expr, CLOSURE).unwrap();
    let greeter = nix_build(&expr);
    let closure = run(Command::new("nix-store").args(["--query", "--requisites", &greeter]));
    let closure: Vec<String> = String::from_utf8_lossy(&closure.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(closure.len(), 3, "greeter, busybox, data: {closure:?}");

    // Route 1: nix copy into serve-nar.
    let data_home = work.path().join("data");
    let nix_cache = work.path().join("nix-cache");
    {
        let server = ServeNar::start(&tvix_boot, &data_home);
        run(nix(&nix_cache)
            .args(["copy", "--to", &server.url("?compression=xz")])
            .arg(&greeter));
        server.stop();
    }

    // Route 2: a signed file:// binary cache.
    let cache = work.path().join("cache");
    let key = CacheKey::generate(work.path(), "closure-test-1");
    key.copy_to(&cache, &[&greeter]);
    let public_key = &key.public;

    let mut files = GuestFile::host_tree(&data_home, "/input/data").unwrap();
    files.extend(GuestFile::host_tree(&cache, "/input/cache").unwrap());
    let script = format!(
        r#"
export TVIX_BOOT_KERNEL={GUEST_KERNEL}
echo copied-begin
XDG_DATA_HOME=/input/data tvix-boot --run {greeter}/bin/greeter -- "two words"
echo "copied-status=$?"
echo copied-end
echo lazy-begin
XDG_DATA_HOME=/tmp/empty PATH_INFO_SERVICE_ADDR='nix+file:///input/cache?trusted-public-keys={key}' \
  tvix-boot --run {greeter}/bin/greeter -- lazily
echo "lazy-status=$?"
echo lazy-end
XDG_DATA_HOME=/tmp/empty PATH_INFO_SERVICE_ADDR='nix+file:///input/cache?trusted-public-keys=other-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=' \
  tvix-boot --run {greeter}/bin/greeter
echo "untrusted-status=$?"
"#,
        key = public_key.trim(),
    );
    Suite::new("nix_closure", TestHost::builder().tvix_boot(&tvix_boot))
        .case(
            "a_closure_from_nix_runs_in_a_guest_copied_and_substituted_lazily",
            &script,
            files,
            TIMEOUT,
        )
        .hold(work)
}

fn a_closure_from_nix_runs_in_a_guest_copied_and_substituted_lazily(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert!(out.success(), "{out}");

    let section = |name: &str| {
        out.between(&format!("{name}-begin"), &format!("{name}-end"))
            .unwrap_or_else(|| panic!("no {name}-begin ... {name}-end in the output: {out}"))
    };
    for (name, args) in [("copied", "two words"), ("lazy", "lazily")] {
        let text = section(name);
        assert!(
            text.contains("greetings from a dependency"),
            "{name}: {out}"
        );
        assert!(
            text.contains(&format!("greeter args: {args}")),
            "{name}: {out}"
        );
        assert!(
            out.serial.contains(&format!("{name}-status=7")),
            "{name}: the program's own exit status: {out}"
        );
    }
    // Without a trusted signature nothing is substituted: refused before boot.
    assert!(out.serial.contains("untrusted-status=1"), "{out}");
    assert!(
        out.serial.contains("no signature by a trusted key"),
        "the refusal names why: {out}"
    );
}
