fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: no system install needed to build.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let include_dir = include.to_string_lossy().into_owned();
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/csi.proto"], &["proto", include_dir.as_str()])?;
    println!("cargo:rerun-if-changed=proto/csi.proto");
    Ok(())
}
