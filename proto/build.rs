//! Generates Rust code for the `.proto` files with protox (a pure-Rust protobuf compiler,
//! so no `protoc` is needed on the machine) and prost/tonic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let service = protox::compile(["proto/edge_runtime.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(service)?;
    if std::env::var_os("CARGO_FEATURE_ONNX").is_some() {
        let onnx = protox::compile(["proto/onnx.proto"], ["proto"])?;
        prost_build::Config::new().compile_fds(onnx)?;
    }
    Ok(())
}
