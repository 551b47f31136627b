//! The castore's protobuf messages and gRPC services (package `tvix.castore.v1`),
//! generated from `castore/protos/` at build time.

#![allow(missing_docs)] // generated code; the .proto files document every field
#![allow(clippy::all)]

tonic::include_proto!("tvix.castore.v1");
