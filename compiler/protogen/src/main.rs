//! Generates the prost types for ONNX. Run from anywhere:
//!   cargo run --manifest-path compiler/protogen/Cargo.toml
//! protox compiles the schema in pure Rust, so no protoc is needed.
use std::path::Path;

fn main() {
    let compiler = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let proto_dir = compiler.join("proto");
    let out_dir = compiler.join("src/onnx");
    let descriptors = protox::compile([proto_dir.join("onnx.proto3")], [&proto_dir])
        .expect("onnx.proto3 must compile");
    prost_build::Config::new()
        // Zero-copy: raw_data of a model decoded from a memory map stays a slice of the map.
        .bytes([".onnx.TensorProto.raw_data"])
        .out_dir(&out_dir)
        .compile_fds(descriptors)
        .expect("code generation");
    let generated = out_dir.join("onnx.rs");
    std::fs::rename(&generated, out_dir.join("proto.rs")).expect("rename generated file");
    println!("wrote {}", out_dir.join("proto.rs").display());
}
