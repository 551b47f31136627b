//! The store's protobuf messages and gRPC path-info service (package `tvix.store.v1`),
//! generated from `store/protos/` at build time; castore messages are the castore crate's.

#![allow(missing_docs)] // generated code; the .proto files document every field
#![allow(clippy::all)]

pub use tvix_boot_castore::proto::{DirectoryNode, FileNode, Node, SymlinkNode, node};

tonic::include_proto!("tvix.store.v1");
