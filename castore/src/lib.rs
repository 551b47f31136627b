//! The content-addressed core of tvix-boot's store, as tvix and snix split it: BLAKE3
//! digests, directories of named nodes, blobs with their outboards, the key-value backends
//! that hold directories, and the castore's gRPC protocol (client and server).
//!
//! Nothing here knows about Nix (store paths, NAR, narinfo: the `tvix-boot-store` crate)
//! or about VMs. The API is synchronous; see `runtime` for why.

#![warn(missing_docs)]

pub mod blobservice;
pub mod digest;
pub mod directory;
pub mod directoryservice;
pub mod grpc;
pub mod kv;
pub(crate) mod outboard;
pub mod proto;
pub mod root_nodes;
pub mod runtime;

pub use digest::B3Digest;
pub use directory::{Directory, Node, PathComponent};
pub use root_nodes::RootNodes;
