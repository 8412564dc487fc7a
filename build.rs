//! CUDA builds only (`--features cuda`, see scripts/cuda-build.sh): link the
//! CUDA runtime statically from `$CUDA_HOME/lib/libcudart_static.a`, so the
//! binary needs no libcudart on the GPU machine (cuBLAS, cuRAND and NVRTC are
//! loaded at run time). CPU builds do nothing here.

fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let home = std::env::var("CUDA_HOME")
        .expect("the cuda feature needs CUDA_HOME (run scripts/cuda-build.sh)");
    let src = std::path::Path::new(&home).join("lib/libcudart_static.a");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("cudart");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(&src, out.join("libcudart.a"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", src.display()));
    println!("cargo:rustc-link-search=native={}", out.display());
    for lib in ["dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib={lib}");
    }
}
