//! The Nix layer of tvix-boot's store: store paths, NAR, narinfo, path info,
//! substitution and import, and the store's gRPC path-info service, over the
//! content-addressed core in `tvix-boot-castore` (re-exported here under the names it
//! had before the split).
//!
//! Nothing here knows about VMs. The API is synchronous; see the castore's `runtime`.

#![warn(missing_docs)]

pub mod binary_cache;
pub mod grpc;
pub mod import;
pub mod local_nix;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod pathinfo;
pub mod proto;
pub mod signing;
pub mod store;
pub mod store_path;
pub mod substituter;

pub use tvix_boot_castore::directory as castore;
pub use tvix_boot_castore::{blobservice, digest, directoryservice, kv};

pub use castore::{Directory, Node, PathComponent};
pub use digest::B3Digest;
pub use pathinfo::PathInfo;
pub use store::{Lookup, Store, StoreAddrs, StoreError};
pub use store_path::StorePath;
pub use tvix_boot_castore::runtime::start_with as start_io_runtime;
