//! Protobuf definitions of Edge-LLM, generated at build time.

/// The runtime's gRPC service (`edge.runtime.v1`).
pub mod runtime {
    tonic::include_proto!("edge.runtime.v1");

    /// The encoded `FileDescriptorSet` of `edge_runtime.proto`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/edge_runtime_descriptor.bin"));
}

/// The manifest of a bundle (`.edgeb`, `edge.bundle.v1`; layout in docs/bundle.md).
pub mod bundle {
    include!(concat!(env!("OUT_DIR"), "/edge.bundle.v1.rs"));
}

/// The ONNX model schema (`onnx.proto`, from the ONNX specification).
#[cfg(feature = "onnx")]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
