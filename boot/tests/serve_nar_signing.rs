//! `store serve-nar --secret-key`: narinfos signed with a Nix binary-cache key, so a real
//! Nix (Debian's nix-bin) that trusts the public key copies from it with its default
//! settings, and one that does not, or an unsigned server, is refused. Fails loudly when
//! Nix is missing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tvix-boot");

fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (these tests need nix-bin)"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

struct Server {
    child: Child,
    url: String,
    /// Kept open: the server logs to it.
    _stderr: BufReader<std::process::ChildStderr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_nar(data_home: &Path, secret_key: Option<&Path>) -> Server {
    let mut cmd = Command::new(BIN);
    cmd.env("XDG_DATA_HOME", data_home)
        .args(["store", "serve-nar", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped());
    if let Some(key) = secret_key {
        cmd.arg("--secret-key").arg(key);
    }
    let mut child = cmd.spawn().expect("tvix-boot store serve-nar");
    let mut line = String::new();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .rsplit_once("http://")
        .expect(&line)
        .1
        .to_owned();
    Server {
        child,
        url: format!("http://{addr}"),
        _stderr: stderr,
    }
}

/// `nix copy --from` the server into a fresh store, with default settings but for
/// `trusted-public-keys`.
fn nix_copy_from(server: &Server, path: &str, trusted: &str) -> Output {
    let root = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let output = Command::new("nix")
        .env("XDG_CACHE_HOME", cache.path())
        .args(["--extra-experimental-features", "nix-command"])
        .args(["--option", "trusted-public-keys", trusted])
        .args(["copy", "--from", &server.url, "--to"])
        .arg(format!("local?root={}", root.path().display()))
        .arg(path)
        .output()
        .expect("nix from Debian's nix-bin");
    if output.status.success() {
        assert!(
            root.path()
                .join(path.trim_start_matches('/'))
                .join("greeting")
                .is_file(),
            "{path} missing after nix copy"
        );
    }
    output
}

#[test]
fn nix_copies_from_a_signing_server_with_its_default_settings() {
    let work = tempfile::tempdir().unwrap();
    // Built, not added: a content-addressed path (nix-store --add) needs no signature.
    let expr = work.path().join("demo.nix");
    std::fs::write(
        &expr,
        r#"derivation { name = "signed-demo"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin"; args = [ "-c" "mkdir $out; echo signed hello > $out/greeting" ]; }"#,
    )
    .unwrap();
    let path = String::from_utf8(
        run(Command::new("nix-build")
            .args(["--option", "sandbox", "false", "--no-out-link"])
            .arg(&expr))
        .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let data = work.path().join("data");
    run(Command::new(BIN)
        .env("XDG_DATA_HOME", &data)
        .args(["store", "copy", &path]));

    let secret = work.path().join("key.secret");
    let public = work.path().join("key.public");
    run(Command::new("nix-store")
        .args(["--generate-binary-cache-key", "tvix-boot-test-1"])
        .arg(&secret)
        .arg(&public));
    let public = std::fs::read_to_string(&public).unwrap().trim().to_owned();

    // Unsigned: refused by default, as a new user finds.
    let unsigned = serve_nar(&data, None);
    let refused = nix_copy_from(&unsigned, &path, &public);
    assert!(!refused.status.success(), "an unsigned path was accepted");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("signature"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    drop(unsigned);

    // Signed, and the key trusted: copied.
    let signed = serve_nar(&data, Some(&secret));
    let copied = nix_copy_from(&signed, &path, &public);
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    // Signed by a key Nix does not trust: refused.
    let other = "other-1:Qf9p2pW7ZX1L0nS1kx/3ecf8fZxr0N+EXtb7yFM5JdM=";
    assert!(!nix_copy_from(&signed, &path, other).status.success());

    // A key file that is not one is a clear error naming it.
    std::fs::write(work.path().join("bad.secret"), "garbage").unwrap();
    let output = Command::new(BIN)
        .env("XDG_DATA_HOME", &data)
        .args([
            "store",
            "serve-nar",
            "--listen",
            "127.0.0.1:0",
            "--secret-key",
        ])
        .arg(work.path().join("bad.secret"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad.secret"));
}
