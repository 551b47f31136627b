//! The content-addressed store behind tvix-boot: the tvix castore model (blobs,
//! directories, path info) with Nix's store paths and NAR format on top.
//!
//! Nothing here knows about VMs. The API is synchronous; see `runtime` for why.

#![warn(missing_docs)]

pub mod binary_cache;
pub mod blobservice;
pub mod castore;
pub mod digest;
pub mod directoryservice;
pub mod import;
pub mod kv;
pub mod local_nix;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub(crate) mod outboard;
pub mod pathinfo;
pub(crate) mod proto;
mod runtime;
pub mod store;
pub mod store_path;
pub mod substituter;

pub use castore::{Directory, Node, PathComponent};
pub use digest::B3Digest;
pub use pathinfo::PathInfo;
pub use runtime::start_with as start_io_runtime;
pub use store::{Lookup, Store, StoreAddrs, StoreError};
pub use store_path::StorePath;
