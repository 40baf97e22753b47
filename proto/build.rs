//! Compiles the .proto files with protox (pure Rust, no protoc needed) and
//! generates prost messages and tonic client and server code from the
//! resulting descriptor set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["meshfed/config/v1/config.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
