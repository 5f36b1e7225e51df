//! Generates the victor.v1 gRPC code and the descriptor set served by reflection.
//! Uses the vendored protoc unless PROTOC is set, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: the build script has no other threads that could read the environment.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("victor_v1_descriptor.bin"))
        .compile_protos(&["victor/v1/victor.proto"], &["."])?;
    println!("cargo:rerun-if-changed=victor/v1/victor.proto");
    Ok(())
}
