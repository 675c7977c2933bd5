//! Generates Rust code for the `.proto` files with protox (a pure-Rust protobuf compiler,
//! so no `protoc` is needed on the machine) and prost/tonic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let service = protox::compile(["proto/edge_runtime.proto"], ["proto"])?;
    // The encoded descriptors, for the service's gRPC reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("edge_runtime_descriptor.bin"),
        prost::Message::encode_to_vec(&service),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(service)?;
    let bundle = protox::compile(["proto/bundle.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(bundle)?;
    if std::env::var_os("CARGO_FEATURE_ONNX").is_some() {
        let onnx = protox::compile(["proto/onnx.proto"], ["proto"])?;
        prost_build::Config::new().compile_fds(onnx)?;
    }
    Ok(())
}
