//! End-to-end with real systems from the store, inside the QEMU TCG test host (nested
//! KVM): closures that `nix-build` makes on this machine out of Debian's own dynamically
//! linked binaries (tests/nix/, patchelf'd onto a glibc in the store the way Nix packages
//! prebuilt software), copied into tvix-boot's store with `nix copy --to http://…`.
//!
//! - `--init $system/init`: a stage-2 init execs Debian's systemd 252 as PID 1, which
//!   reaches multi-user.target; a oneshot unit prints a marker and runs
//!   `systemctl poweroff`, which ends tvix-boot with status 0.
//! - `--run $python/bin/python3.11`: Debian's CPython imports a dozen standard modules,
//!   C extension modules (dlopen'ed through their RUNPATH) among them.
//!
//! Needs nix-bin, patchelf, systemd, python3.11 and busybox-static on the build machine
//! (.ci/setup installs them). Fails, never skips, when one is missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tvix_boot_tests::nix::{ServeNar, nix, nix_build, run};
use tvix_boot_tests::plan::Check;
use tvix_boot_tests::testhost::shell_quote;
use tvix_boot_tests::{GUEST_KERNEL, GuestFile, Suite, TestHost, TestHostOutput, assets};

const TIMEOUT: Duration = Duration::from_secs(600);

fn tvix_boot_bin() -> PathBuf {
    assets::tvix_boot_static_once()
        .unwrap_or_else(|e| panic!("cannot get the static tvix-boot: {e}"))
}

/// Builds `tests/nix/<file>` and returns its store path.
fn build(file: &str) -> String {
    nix_build(&Path::new(env!("CARGO_MANIFEST_DIR")).join("nix").join(file))
}

/// Copies the closure of `path` into a fresh tvix-boot store under `work/<name>/data`
/// through `nix copy --to http://…` and `tvix-boot store serve-nar`, and returns the
/// store's files as test-host files under /input/<name>/data.
fn closure_into_store(tvix_boot: &Path, work: &Path, name: &str, path: &str) -> Vec<GuestFile> {
    let data_home = work.join(name).join("data");
    let server = ServeNar::start(tvix_boot, &data_home);
    run(nix(&work.join(name).join("nix-cache"))
        .args(["copy", "--to", &server.url("?compression=none")])
        .arg(path));
    server.stop();
    GuestFile::host_tree(&data_home, &format!("/input/{name}/data"))
        .unwrap_or_else(|e| panic!("the store copied into the test host: {e}"))
}

/// A case's script, run with the store its closure was copied into.
fn in_store(name: &str, script: &str) -> String {
    format!("export XDG_DATA_HOME=/input/{name}/data TVIX_BOOT_KERNEL={GUEST_KERNEL}\n{script}")
}

pub const CHECKS: &[(&str, Check)] = &[
    (
        "systemd_boots_to_multi_user_through_init_and_powers_off",
        systemd_boots_to_multi_user_through_init_and_powers_off,
    ),
    (
        "python_closure_runs_and_loads_c_extension_modules",
        python_closure_runs_and_loads_c_extension_modules,
    ),
];

/// Builds both closures with Nix, copies each into a store of its own, and boots one test
/// host for both.
pub fn suite() -> Suite {
    let tvix_boot = tvix_boot_bin();
    let work = tempfile::tempdir().unwrap();

    let system = build("systemd-system.nix");
    let systemd_files = closure_into_store(&tvix_boot, work.path(), "systemd", &system);

    let python = build("python.nix");
    let python_files = closure_into_store(&tvix_boot, work.path(), "python", &python);

    Suite::new("system_closures", TestHost::builder().tvix_boot(&tvix_boot))
        .case(
            "systemd_boots_to_multi_user_through_init_and_powers_off",
            &in_store(
                "systemd",
                &format!(
                    "echo systemd-begin\n\
                     tvix-boot --init {system}/init\n\
                     echo \"systemd-status=$?\"\n\
                     echo systemd-end\n"
                ),
            ),
            systemd_files,
            TIMEOUT,
        )
        // The program goes into the store too (the kernel command line that carries the
        // arguments is too short for it).
        .case(
            "python_closure_runs_and_loads_c_extension_modules",
            &in_store(
                "python",
                &format!(
                    "mkdir -p /tmp/program && printf '%s' {program} > /tmp/program/check.py\n\
                     PROGRAM=$(tvix-boot store import /tmp/program)\n\
                     echo python-begin\n\
                     tvix-boot --run {python}/bin/python3.11 -- \"$PROGRAM/check.py\" {python}\n\
                     echo \"python-status=$?\"\n\
                     echo python-end\n",
                    program = shell_quote(PYTHON_PROGRAM),
                ),
            ),
            python_files,
            TIMEOUT,
        )
        .hold(work)
}

fn systemd_boots_to_multi_user_through_init_and_powers_off(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    let guest = out
        .between("systemd-begin", "systemd-end")
        .unwrap_or_else(|| panic!("no systemd-begin ... systemd-end: {out}"));
    assert!(
        guest.contains("stage 2: starting systemd"),
        "the system's stage-2 init ran: {out}"
    );
    assert!(
        guest.contains("tvix-boot-systemd-marker: multi-user.target is active"),
        "systemd reached multi-user.target and started the marker unit: {out}"
    );
    assert!(
        out.serial.contains("systemd-status=0"),
        "`systemctl poweroff` ends tvix-boot with status 0: {out}"
    );
}

/// Run in the guest by the store's CPython: every import below either is a C extension
/// module in lib-dynload (dlopen'ed, with its own libraries found through RUNPATH) or
/// pulls some in, and each one is used, not just imported.
const PYTHON_PROGRAM: &str = r#"
import sys, json, ssl, sqlite3, decimal, ctypes, hashlib, bz2, lzma, uuid, asyncio, csv
import zoneinfo, unicodedata, xml.etree.ElementTree as ET, email.parser, multiprocessing
checks = {
    "prefix": sys.prefix == sys.argv[1],
    "ssl": ssl.OPENSSL_VERSION.startswith("OpenSSL 3"),
    "sqlite3": sqlite3.connect(":memory:").execute("select 6*7").fetchone() == (42,),
    "decimal": str(decimal.Decimal(1) / 8) == "0.125",
    "ctypes": ctypes.CDLL(None).getpid() > 0,
    "hashlib": hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf"),
    "bz2": bz2.decompress(bz2.compress(b"x" * 1000)) == b"x" * 1000,
    "lzma": lzma.decompress(lzma.compress(b"tvix")) == b"tvix",
    "uuid": len(str(uuid.uuid4())) == 36,
    "asyncio": asyncio.run(asyncio.sleep(0, result=7)) == 7,
    "json": json.loads(json.dumps({"a": [1, 2]})) == {"a": [1, 2]},
    "xml": ET.fromstring('<a b="1"/>').get("b") == "1",
    "unicodedata": unicodedata.name("λ") == "GREEK SMALL LETTER LAMDA",
}
extensions = sorted(
    m.__file__.rsplit("/", 1)[-1].split(".")[0] for m in list(sys.modules.values())
    if (getattr(m, "__file__", "") or "").endswith(".so")
)
print("python-extensions", len(extensions), " ".join(extensions))
failed = [name for name, ok in checks.items() if not ok]
print("python-checks", "ok" if not failed else "failed: " + " ".join(failed))
sys.exit(3)
"#;

fn python_closure_runs_and_loads_c_extension_modules(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    let guest = out
        .between("python-begin", "python-end")
        .unwrap_or_else(|| panic!("no python-begin ... python-end: {out}"));
    assert!(guest.contains("python-checks ok"), "{out}");
    let extensions: Vec<&str> = guest
        .lines()
        .find_map(|l| l.trim().strip_prefix("python-extensions "))
        .unwrap_or_else(|| panic!("no python-extensions line: {out}"))
        .split_whitespace()
        .skip(1)
        .collect();
    for module in [
        "_ssl", "_sqlite3", "_decimal", "_ctypes", "_hashlib", "_bz2", "_lzma",
    ] {
        assert!(
            extensions.contains(&module),
            "{module} was loaded from lib-dynload: {extensions:?}"
        );
    }
    assert!(
        out.serial.contains("python-status=3"),
        "the interpreter's own exit status: {out}"
    );
}
