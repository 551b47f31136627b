//! Debian's CPython as a Nix closure (tests/nix/python.nix) in a tvix-boot store, and an
//! import-heavy program for it: the end-to-end suite `grpc_store` checks that it runs
//! from a remote store, the benchmark `grpc_run_start` times its start from each store.
//!
//! Needs nix-bin, patchelf and python3.11 on the build machine.

use std::path::Path;

use crate::nix::{ServeNar, nix, nix_build, run};
use crate::testhost::GuestFile;

/// Imports much of the standard library (hundreds of files, C extension modules) and uses
/// each module a little. Prints `python-modules N` and `python-checks ok` (or `failed`).
pub const PROGRAM: &str = r#"
import sys, json, ssl, sqlite3, decimal, ctypes, hashlib, bz2, lzma, uuid, asyncio, csv
import zoneinfo, unicodedata, xml.etree.ElementTree as ET, email.parser, multiprocessing
import argparse, logging, http.client, urllib.request, subprocess, tempfile, pathlib
import dataclasses, typing, statistics, fractions, datetime, textwrap, pprint, shutil
checks = [
    sqlite3.connect(":memory:").execute("select 6*7").fetchone() == (42,),
    str(decimal.Decimal(1) / 8) == "0.125",
    hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf"),
    lzma.decompress(lzma.compress(b"tvix")) == b"tvix",
    asyncio.run(asyncio.sleep(0, result=7)) == 7,
    json.loads(json.dumps({"a": [1, 2]})) == {"a": [1, 2]},
    ET.fromstring('<a b="1"/>').get("b") == "1",
    statistics.mean([1, 2, 3]) == 2,
    unicodedata.name("λ") == "GREEK SMALL LETTER LAMDA",
]
print("python-modules", len(sys.modules))
print("python-checks", "ok" if all(checks) else "failed")
"#;

/// Where [`closure_in_store`] puts the store in the test host (its `XDG_DATA_HOME`).
pub const DATA_HOME: &str = "/input/data";

/// Builds the CPython closure with Nix and copies it into a fresh tvix-boot store under
/// `work/data`, through `nix copy --to http://…` into `tvix_boot`'s `store serve-nar`.
/// Returns the interpreter's store path and the store's files, as test-host files under
/// [`DATA_HOME`].
pub fn closure_in_store(tvix_boot: &Path, work: &Path) -> (String, Vec<GuestFile>) {
    let python = nix_build(&Path::new(env!("CARGO_MANIFEST_DIR")).join("nix/python.nix"));
    let data_home = work.join("data");
    let server = ServeNar::start(tvix_boot, &data_home);
    run(nix(&work.join("nix-cache"))
        .args(["copy", "--to", &server.url("?compression=none")])
        .arg(&python));
    server.stop();
    let files = GuestFile::host_tree(&data_home, DATA_HOME)
        .unwrap_or_else(|e| panic!("the store copied into the test host: {e}"));
    (python, files)
}
