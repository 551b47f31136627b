//! A store server that lies about the objects below one store path, for the test host
//! (see tvix_boot_tests::lying_store): the daemon's own code over the store the usual
//! addresses name (XDG_DATA_HOME's embedded one by default).
//!
//!     lying-store SOCKET flip-blobs STORE_PATH
//!     lying-store SOCKET plant-directories STORE_PATH
//!
//! `flip-blobs` flips a byte of every file below STORE_PATH as it is read out;
//! `plant-directories` serves every directory below it (not the path's own) with an extra
//! entry. It prints `lying on SOCKET` once it listens, and exits 0 on SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use tvix_boot_store::{Store, StoreAddrs};
use tvix_boot_tests::lying_store::{self, Lie, Targets};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lying-store: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, lie, path] = args.as_slice() else {
        return Err("usage: lying-store SOCKET flip-blobs|plant-directories STORE_PATH".into());
    };
    let lie = match lie.as_str() {
        "flip-blobs" => Lie::FlipBlobBytes,
        "plant-directories" => Lie::PlantDirectoryEntries,
        other => {
            return Err(format!(
                "{other:?}: the lie is flip-blobs or plant-directories"
            ));
        }
    };
    let addrs = StoreAddrs::embedded().map_err(|e| e.to_string())?;
    let store = Store::open(&addrs).map_err(|e| e.to_string())?;
    let targets = Targets::below(&store, path).map_err(|e| e.to_string())?;
    let told = match lie {
        Lie::FlipBlobBytes => targets.blobs.len(),
        Lie::PlantDirectoryEntries => targets.directories.len(),
    };
    if told == 0 {
        return Err(format!("nothing below {path} to tell that lie about"));
    }
    let store = lying_store::lying(store, lie, targets);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("the runtime: {e}"))?;
    runtime.block_on(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| format!("cannot wait for SIGTERM: {e}"))?;
        let listener = lying_store::bind(PathBuf::from(socket))
            .await
            .map_err(|e| e.to_string())?;
        println!("lying on {socket}");
        lying_store::serve(store, listener, async move {
            terminate.recv().await;
        })
        .await
        .map_err(|e| e.to_string())
    })
}
