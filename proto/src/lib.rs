//! Protobuf definitions of Edge-LLM, generated at build time.

/// The runtime's gRPC service (`edge.runtime.v1`).
pub mod runtime {
    tonic::include_proto!("edge.runtime.v1");
}

/// The ONNX model schema (`onnx.proto`, from the ONNX specification).
#[cfg(feature = "onnx")]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
