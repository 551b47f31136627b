//! Generates the castore's protobuf messages and gRPC client and server code from
//! `protos/`. The .proto files are parsed by protox (a protobuf compiler in Rust), so
//! building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "castore.proto",
        "rpc_blobstore.proto",
        "rpc_directory.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed=protos/{proto}");
    }
    let descriptors = protox::compile(protos, ["protos"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
