//! What the CLI tests share: the binary under test, run against a store of the test's own.

use std::path::Path;
use std::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_tvix-boot");

/// A tvix-boot whose embedded store lives in `data_home`, with no store address from the
/// caller's environment leaking in.
pub fn tvix_boot(data_home: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("XDG_DATA_HOME", data_home)
        .env_remove("BLOB_SERVICE_ADDR")
        .env_remove("DIRECTORY_SERVICE_ADDR")
        .env_remove("PATH_INFO_SERVICE_ADDR");
    cmd
}
