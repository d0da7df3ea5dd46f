//! Links the worker so that CUDA works on GPU hosts and no LD_LIBRARY_PATH is needed.
//!
//! torch-sys links with `--as-needed`; nothing in our code references a symbol
//! of `libtorch_cuda.so` directly, so the linker drops it and
//! `tch::Cuda::is_available()` silently reports false. Forcing
//! `--no-as-needed` around it keeps it in the binary's NEEDED list. The rpath
//! points at torch's `lib/` so the binary runs without environment tweaks.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!("cargo:warning=torch-sys did not report its libtorch lib directory; no rpath set");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
