//! Compiles the .proto files with protox (pure Rust), so a fresh machine needs no protoc.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "proto/rollwave/v1/types.proto",
    "proto/rollwave/v1/agent.proto",
    "proto/rollwave/v1/operator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves the same descriptors the code was generated from.
    std::fs::write(
        out_dir.join("rollwave_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
