//! Properties of the built binaries: how they link, and how they refuse what they cannot do.

use std::process::Command;
use std::time::Duration;

use cohort_tests::{binary, Proc};

fn ldd(name: &str) -> String {
    let output = Command::new("ldd")
        .arg(binary(name))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("ldd runs");
    assert!(
        output.status.success(),
        "ldd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// torch-sys links with --as-needed, which drops libtorch_cuda.so and makes
/// CUDA silently unavailable; build.rs forces it in and sets an rpath.
#[test]
fn worker_links_libtorch_cuda_and_finds_it_without_ld_library_path() {
    let deps = ldd("cohort-worker");
    assert!(!deps.contains("not found"), "unresolved libraries:\n{deps}");
    let torch_cuda = deps
        .lines()
        .find(|l| l.contains("libtorch_cuda.so"))
        .unwrap_or_else(|| panic!("libtorch_cuda.so missing:\n{deps}"));
    assert!(torch_cuda.contains("=> /"), "{torch_cuda}");
}

#[test]
fn coordinator_does_not_link_libtorch() {
    let deps = ldd("cohort-coordinator");
    assert!(
        !deps.contains("libtorch") && !deps.contains("libc10"),
        "the coordinator links libtorch:\n{deps}"
    );
}

#[test]
fn worker_asked_for_cuda_without_a_gpu_refuses_instead_of_falling_back() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!("skipped: this host has a GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "pretrain",
        "--coordinator",
        "http://127.0.0.1:9",
        "--data-dir",
        ".",
        "--device",
        "cuda",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut worker = Proc::spawn("cuda-worker", &binary("cohort-worker"), &args, dir.path());
    let status = worker.wait(Duration::from_secs(30));
    assert!(!status.success(), "{}", worker.report("should fail"));
    assert!(
        worker.output().contains("CUDA"),
        "{}",
        worker.report("should explain that CUDA is unavailable")
    );
}
