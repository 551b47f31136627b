//! Generates the store's protobuf messages and gRPC path-info service from `protos/`,
//! referring to the castore's generated types for `tvix.castore.v1`. Parsed by protox,
//! so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["pathinfo.proto", "rpc_pathinfo.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed=protos/{proto}");
    }
    println!("cargo:rerun-if-changed=../castore/protos/castore.proto");
    let descriptors = protox::compile(protos, ["protos", "../castore/protos"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .extern_path(".tvix.castore.v1", "::tvix_boot_castore::proto")
        .compile_fds(descriptors)?;
    Ok(())
}
