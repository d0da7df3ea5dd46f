//! Compiles `proto/cohort.proto` with protox (pure Rust), so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cohort.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Chunk payloads are `bytes::Bytes`: slices of a buffer, not copies.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
