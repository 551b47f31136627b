//! `nix copy` into `tvix-boot store serve-nar` and back out, with real Nix (Debian's nix-bin,
//! as root, sandbox off to build a small closure). Fails loudly when Nix is missing.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use tvix_boot_tests::nix::{CacheKey, ServeNar, nix, run};

const BIN: &str = env!("CARGO_BIN_EXE_tvix-boot");

fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A two-path closure built by real Nix: top-1.0 refers to dep-1.0. Built once per test run.
fn closure() -> &'static (String, String) {
    static CLOSURE: OnceLock<(String, String)> = OnceLock::new();
    CLOSURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let expr = dir.path().join("closure.nix");
        std::fs::write(
            &expr,
            r#"let
  dep = derivation { name = "dep-1.0"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out/lib; echo dependency > $out/lib/data; seq 1 50000 > $out/lib/numbers" ]; };
in derivation { name = "top-1.0"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "mkdir -p $out/bin; printf '#!/bin/sh\\necho hello from top, dep at ${dep}\\n' > $out/bin/top; chmod +x $out/bin/top; ln -s ${dep}/lib/data $out/data" ]; }
"#,
        )
        .unwrap();
        let out = run(Command::new("nix-build").args(["--option", "sandbox", "false", "--no-out-link"]).arg(&expr));
        let top = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let refs = run(Command::new("nix-store").args(["--query", "--references", &top]));
        let dep = stdout_lines(&refs).into_iter().find(|r| r.ends_with("-dep-1.0")).expect("top refers to dep");
        (top, dep)
    })
}

fn nix_dump(path: &str) -> Vec<u8> {
    run(Command::new("nix-store").args(["--dump", path])).stdout
}

fn tvix_store(data_home: &Path, args: &[&str]) -> Output {
    run(Command::new(BIN)
        .env("XDG_DATA_HOME", data_home)
        .arg("store")
        .args(args))
}

/// `nix copy --from` the server into a fresh local store (with `nix_cache` as nix's
/// cache directory); panics unless `top` arrives whole.
fn copy_back_with_nix(nix_cache: &Path, server: &ServeNar, top: &str) {
    let root = tempfile::tempdir().unwrap();
    run(nix(nix_cache)
        .args(["copy", "--no-check-sigs", "--from", &server.url(""), "--to"])
        .arg(format!("local?root={}", root.path().display()))
        .arg(top));
    let copied = root.path().join(top.trim_start_matches('/'));
    assert!(
        copied.join("bin/top").is_file(),
        "{} missing after nix copy --from",
        copied.display()
    );
}

#[test]
fn nix_copy_round_trips_a_closure() {
    let (top, dep) = closure();
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let server = ServeNar::start(Path::new(BIN), data.path());
    run(nix(cache.path()).args(["copy", "--to", &server.url("?compression=none"), top]));

    let mut listed = stdout_lines(&tvix_store(data.path(), &["list"]));
    listed.sort();
    let mut expected = vec![top.clone(), dep.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    for path in [top, dep] {
        assert!(
            tvix_store(data.path(), &["export-nar", path]).stdout == nix_dump(path),
            "NAR of {path} differs"
        );
    }
    let info = String::from_utf8(tvix_store(data.path(), &["info", top]).stdout).unwrap();
    assert!(info.contains(&format!("references:\n  {dep}")), "{info}");
    let nix_hash = run(Command::new("nix-store").args(["--query", "--hash", top]));
    assert!(
        info.contains(String::from_utf8_lossy(&nix_hash.stdout).trim()),
        "{info}"
    );

    // Substituters read it back.
    copy_back_with_nix(cache.path(), &server, top);

    // What was acknowledged survives a restart.
    server.stop();
    let server = ServeNar::start(Path::new(BIN), data.path());
    let (status, narinfo) = server.request("GET", &format!("/{}.narinfo", &top[11..43]), b"");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&narinfo).contains(&format!("StorePath: {top}")));
    server.stop();
}

#[test]
fn compressed_uploads_are_accepted() {
    let (top, _) = closure();
    for compression in ["xz", "zstd", "bzip2"] {
        let data = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let server = ServeNar::start(Path::new(BIN), data.path());
        run(nix(cache.path()).args([
            "copy",
            "--to",
            &server.url(&format!("?compression={compression}")),
            top,
        ]));
        assert_eq!(
            stdout_lines(&tvix_store(data.path(), &["list"])).len(),
            2,
            "{compression}"
        );
        assert!(
            tvix_store(data.path(), &["export-nar", top]).stdout == nix_dump(top),
            "{compression}"
        );
        // The same nix reads it back. Its disk cache still holds the narinfo it uploaded,
        // whose URL names the compressed file, so that URL must be served too.
        copy_back_with_nix(cache.path(), &server, top);
        server.stop();
    }
}

#[test]
fn lying_uploads_are_refused_and_store_nothing() {
    let (top, dep) = closure();
    let data = tempfile::tempdir().unwrap();
    let server = ServeNar::start(Path::new(BIN), data.path());
    let nar = nix_dump(dep);
    let hash = |bytes: &[u8]| {
        let out = Command::new("sh")
            .arg("-c")
            .arg("nix-hash --type sha256 --flat --base32 /dev/stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        out.stdin.as_ref().unwrap().write_all(bytes).unwrap();
        String::from_utf8(out.wait_with_output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    let good_hash = hash(&nar);
    let other_hash = hash(b"something else");

    // A NAR under another NAR's name, a truncated NAR, garbage, a bad name.
    let (status, body) = server.request("PUT", &format!("/nar/{other_hash}.nar"), &nar);
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("hashes to"));
    assert_eq!(
        server
            .request(
                "PUT",
                &format!("/nar/{good_hash}.nar"),
                &nar[..nar.len() - 9]
            )
            .0,
        400
    );
    assert_eq!(
        server
            .request("PUT", &format!("/nar/{good_hash}.nar"), b"not a nar at all")
            .0,
        400
    );
    assert_eq!(
        server
            .request("PUT", &format!("/nar/{good_hash}.nar.xz"), &nar)
            .0,
        400
    );
    assert_eq!(server.request("PUT", "/nar/short.nar", &nar).0, 400);

    // A narinfo for a NAR that never arrived.
    let basename = &dep[11..];
    let narinfo = format!(
        "StorePath: {dep}\nURL: nar/{good_hash}.nar\nCompression: none\nNarHash: sha256:{good_hash}\nNarSize: {}\nReferences: \n",
        nar.len()
    );
    let (status, body) = server.request(
        "PUT",
        &format!("/{}.narinfo", &basename[..32]),
        narinfo.as_bytes(),
    );
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("not uploaded"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // Now the real NAR, then narinfos that lie about it.
    assert_eq!(
        server
            .request("PUT", &format!("/nar/{good_hash}.nar"), &nar)
            .0,
        200
    );
    let wrong_size = narinfo.replace(&format!("NarSize: {}", nar.len()), "NarSize: 12");
    assert_eq!(
        server
            .request(
                "PUT",
                &format!("/{}.narinfo", &basename[..32]),
                wrong_size.as_bytes()
            )
            .0,
        400
    );
    assert_eq!(
        server
            .request(
                "PUT",
                &format!("/{}.narinfo", &top[11..43]),
                narinfo.as_bytes()
            )
            .0,
        400
    );
    assert_eq!(
        server
            .request("PUT", "/garbage.narinfo", narinfo.as_bytes())
            .0,
        400
    );
    let broken = narinfo.replace("StorePath: /nix/store/", "StorePath: /nix/stor/");
    assert_eq!(
        server
            .request(
                "PUT",
                &format!("/{}.narinfo", &basename[..32]),
                broken.as_bytes()
            )
            .0,
        400
    );
    assert!(stdout_lines(&tvix_store(data.path(), &["list"])).is_empty());

    // The honest narinfo is accepted.
    assert_eq!(
        server
            .request(
                "PUT",
                &format!("/{}.narinfo", &basename[..32]),
                narinfo.as_bytes()
            )
            .0,
        200
    );
    assert_eq!(
        stdout_lines(&tvix_store(data.path(), &["list"])),
        vec![dep.clone()]
    );
    let (status, served) = server.request("GET", &format!("/nar/{good_hash}.nar"), b"");
    assert_eq!(status, 200);
    assert!(served == nar);
    assert_eq!(
        server
            .request("GET", &format!("/nar/{other_hash}.nar"), b"")
            .0,
        404
    );
    assert_eq!(
        server
            .request("GET", "/00000000000000000000000000000000.narinfo", b"")
            .0,
        404
    );
    let (status, info) = server.request("GET", "/nix-cache-info", b"");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&info).contains("StoreDir: /nix/store"));
    server.stop();
}

#[test]
fn store_copy_takes_the_closure_from_the_local_nix_store() {
    let (top, dep) = closure();
    let data = tempfile::tempdir().unwrap();
    let copied = stdout_lines(&tvix_store(data.path(), &["copy", top]));
    assert_eq!(
        copied,
        vec![dep.clone(), top.clone()],
        "closure, dependencies first"
    );
    for path in [top, dep] {
        assert!(
            tvix_store(data.path(), &["export-nar", path]).stdout == nix_dump(path),
            "NAR of {path} differs"
        );
    }
    let info = String::from_utf8(tvix_store(data.path(), &["info", top]).stdout).unwrap();
    assert!(
        info.contains(&format!("references:\n  {dep}")) && info.contains("deriver: /nix/store/"),
        "{info}"
    );
    // Copying again finds everything there.
    assert_eq!(
        stdout_lines(&tvix_store(data.path(), &["copy", top])).len(),
        2
    );

    let missing = "/nix/store/00000000000000000000000000000000-not-in-nix";
    let output = Command::new(BIN)
        .env("XDG_DATA_HOME", data.path())
        .args(["store", "copy", missing])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains(missing));
    assert_eq!(stdout_lines(&tvix_store(data.path(), &["list"])).len(), 2);
}

#[test]
fn paths_substitute_lazily_from_a_binary_cache() {
    let (top, dep) = closure();
    let work = tempfile::tempdir().unwrap();
    let cache_dir = work.path().join("cache");
    let key = CacheKey::generate(work.path(), "test-cache-1");
    key.copy_to(&cache_dir, &[top]);
    let nix_cache = tempfile::tempdir().unwrap();

    // Each run starts from an empty embedded store: everything must come from the cache.
    let with_cache = |addr: &str, args: &[&str]| {
        let data = tempfile::tempdir().unwrap();
        Command::new(BIN)
            .env("XDG_DATA_HOME", data.path())
            .env("PATH_INFO_SERVICE_ADDR", addr)
            .arg("store")
            .args(args)
            .output()
            .unwrap()
    };
    let trusted = key.file_cache_address(&cache_dir);
    let out = with_cache(&trusted, &["export-nar", top]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == nix_dump(top), "substituted NAR differs");
    let out = with_cache(&trusted, &["info", dep]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("signature: test-cache-1:"),
        "{out:?}"
    );
    let out = with_cache(&trusted, &["info", top]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("references:\n  {dep}")),
        "{out:?}"
    );

    // A key the cache did not sign with: refused, naming the key.
    let other = work.path().join("other");
    run(Command::new("nix-store")
        .args(["--generate-binary-cache-key", "other-1"])
        .arg(work.path().join("osk"))
        .arg(&other));
    let untrusted = format!(
        "nix+file://{}?trusted-public-keys={}",
        cache_dir.display(),
        std::fs::read_to_string(&other).unwrap().trim()
    );
    let out = with_cache(&untrusted, &["export-nar", top]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no signature by a trusted key (other-1)"),
        "{out:?}"
    );

    // Over HTTP, from serve-nar, whose paths nobody signed: refused unless the address
    // says unsigned paths are fine.
    let data = tempfile::tempdir().unwrap();
    let server = ServeNar::start(Path::new(BIN), data.path());
    run(nix(nix_cache.path()).args(["copy", "--to", &server.url("?compression=none"), top]));
    let out = with_cache(&format!("nix+{}", server.url("")), &["export-nar", top]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("require-sigs=false"),
        "{out:?}"
    );
    let out = with_cache(
        &format!("nix+{}", server.url("?require-sigs=false")),
        &["export-nar", top],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == nix_dump(top));
    server.stop();

    // A cache whose NAR was tampered with: the hash check refuses it.
    for entry in std::fs::read_dir(cache_dir.join("nar")).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let out = with_cache(
        &trusted,
        &["export-nar", "--blob-service-addr", "memory://", top],
    );
    assert!(!out.status.success(), "a tampered NAR was served");
    assert!(out.stdout.is_empty());
    // xz's own check or our NAR hash catches it; either way the message names the file.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nar/"),
        "{out:?}"
    );
}

/// `openssl` with `args`, panicking with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args));
}

/// A CA and a server certificate it signed for 127.0.0.1, made with openssl in `dir`:
/// `<name>-ca.pem`, `<name>-server.pem`, `<name>-server.key`.
fn certificates(dir: &Path, name: &str) {
    let ca = format!("{name}-ca");
    let server = format!("{name}-server");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=tvix-boot test CA",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &format!("{server}.key"),
            "-out",
            &format!("{server}.csr"),
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &format!("{server}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-extfile",
            "san.ext",
            "-out",
            &format!("{server}.pem"),
        ],
    );
}

/// Real binary caches are served over TLS: `nix+https://` trusts the CA Nix is told about
/// (NIX_SSL_CERT_FILE) and refuses a server whose certificate no trusted CA signed.
#[test]
fn substitutes_over_https_from_a_server_the_configured_ca_signed() {
    let (top, _) = closure();
    let work = tempfile::tempdir().unwrap();
    let cache_dir = work.path().join("cache");
    let key = CacheKey::generate(work.path(), "tls-cache-1");
    key.copy_to(&cache_dir, &[top]);
    certificates(work.path(), "good");
    certificates(work.path(), "other");

    // openssl's test server serves the cache directory as files over HTTPS.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("openssl")
        .current_dir(&cache_dir)
        .args(["s_server", "-WWW", "-quiet", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(work.path().join("good-server.pem"))
        .arg("-key")
        .arg(work.path().join("good-server.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server (apt-get install openssl)");
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed().as_secs() < 20,
            "openssl s_server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let address = format!(
        "nix+https://127.0.0.1:{port}?trusted-public-keys={}",
        key.public
    );
    let export = |ca: Option<&Path>| {
        let data = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.env("XDG_DATA_HOME", data.path())
            .env("PATH_INFO_SERVICE_ADDR", &address)
            .env_remove("SSL_CERT_FILE")
            .env_remove("NIX_SSL_CERT_FILE")
            .args(["store", "export-nar", top]);
        if let Some(ca) = ca {
            cmd.env("NIX_SSL_CERT_FILE", ca);
        }
        cmd.output().unwrap()
    };
    let out = export(Some(&work.path().join("good-ca.pem")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == nix_dump(top), "the NAR over HTTPS differs");
    for ca in [None, Some(work.path().join("other-ca.pem"))] {
        let out = export(ca.as_deref());
        assert!(
            !out.status.success(),
            "a certificate no trusted CA signed was accepted"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("invalid peer certificate"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}
