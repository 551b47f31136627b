//! Real Nix and `tvix-boot store serve-nar`, for tests that use both. These helpers
//! panic with a message naming what failed: they are for tests only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// Runs `cmd` and panics, with its stderr, unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (apt-get install nix-bin)"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds the Nix expression in the file `expr` with the real nix-build and returns its
/// store path. Sandbox off: the test closures copy this machine's own binaries.
///
/// A pitfall for the expressions: Nix 2.8 takes the end of the builder's log pipe for the
/// end of the build and kills the builder's process group. `bash -c SCRIPT` execs the
/// script's last command in its own place, and coreutils programs close stdout and
/// stderr before they exit, so a script ending in `chmod` or `ln` fails with "signal 9"
/// about one build in ten. Builder scripts end with a shell builtin.
pub fn nix_build(expr: &Path) -> String {
    let built = run(Command::new("nix-build")
        .args(["--option", "sandbox", "false", "--no-out-link"])
        .arg(expr));
    String::from_utf8(built.stdout)
        .expect("nix-build printed a non-UTF-8 path")
        .trim()
        .to_owned()
}

/// `nix` with its own cache directory, so narinfo lookups it remembers from other runs
/// (they are cached for days) cannot hide what a server does now.
pub fn nix(cache: &Path) -> Command {
    let mut cmd = Command::new("nix");
    cmd.env("XDG_CACHE_HOME", cache)
        .args(["--extra-experimental-features", "nix-command"]);
    cmd
}

/// `tvix-boot store serve-nar` on a free port, over the embedded store in `data_home`.
/// Killed when dropped; [`stop`](Self::stop) stops it the polite way and checks that.
pub struct ServeNar {
    child: Child,
    addr: String,
}

impl ServeNar {
    pub fn start(tvix_boot: &Path, data_home: &Path) -> Self {
        let mut child = Command::new(tvix_boot)
            .env("XDG_DATA_HOME", data_home)
            .args(["store", "serve-nar", "--listen", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {} store serve-nar: {e}", tvix_boot.display())
            });
        let mut line = String::new();
        BufReader::new(child.stderr.take().expect("stderr is piped"))
            .read_line(&mut line)
            .expect("serve-nar's first line");
        let addr = line
            .trim()
            .rsplit_once("http://")
            .unwrap_or_else(|| panic!("serve-nar did not print its address: {line:?}"))
            .1
            .to_owned();
        ServeNar { child, addr }
    }

    /// `http://ADDR` followed by `query` (e.g. "?compression=none").
    pub fn url(&self, query: &str) -> String {
        format!("http://{}{query}", self.addr)
    }

    /// SIGTERM, then checks that it exited successfully.
    pub fn stop(mut self) {
        // SAFETY: kill sends a signal to our own child process, which has not been
        // waited for yet, so its pid is still ours.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("waiting for serve-nar");
        assert!(
            status.success(),
            "serve-nar exited with {status} on SIGTERM"
        );
    }

    /// A raw HTTP/1.1 request; returns the status code and body.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(&self.addr).expect("connect to serve-nar");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        )
        .expect("send request");
        stream.write_all(body).expect("send body");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("read response");
        let text = String::from_utf8_lossy(&response);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("an HTTP status line");
        let body_start = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(response.len(), |p| p + 4);
        (status, response[body_start..].to_vec())
    }
}

impl Drop for ServeNar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary-cache signing key made by `nix-store --generate-binary-cache-key`, for signed
/// `file://` caches that `nix copy` fills.
pub struct CacheKey {
    secret: std::path::PathBuf,
    /// `name:base64`, as `trusted-public-keys=` takes it.
    pub public: String,
    /// Nix's own cache directory for the copies (see [`nix`]).
    nix_cache: std::path::PathBuf,
}

impl CacheKey {
    /// A fresh key called `name`, its files kept in `dir`.
    pub fn generate(dir: &Path, name: &str) -> Self {
        let secret = dir.join(format!("{name}.secret"));
        let public = dir.join(format!("{name}.public"));
        run(Command::new("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&secret)
            .arg(&public));
        let public = std::fs::read_to_string(&public)
            .unwrap_or_else(|e| panic!("reading {}: {e}", public.display()))
            .trim()
            .to_owned();
        CacheKey {
            secret,
            public,
            nix_cache: dir.join(format!("{name}.nix-cache")),
        }
    }

    /// `nix copy` of `paths` and their closures into the `file://` cache at `cache`,
    /// signed with this key.
    pub fn copy_to(&self, cache: &Path, paths: &[&str]) {
        run(nix(&self.nix_cache)
            .args(["copy", "--to"])
            .arg(format!(
                "file://{}?secret-key={}",
                cache.display(),
                self.secret.display()
            ))
            .args(paths));
    }

    /// The substituter address of `cache` trusting this key.
    pub fn file_cache_address(&self, cache: &Path) -> String {
        format!(
            "nix+file://{}?trusted-public-keys={}",
            cache.display(),
            self.public
        )
    }
}
