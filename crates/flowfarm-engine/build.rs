//! With the `cuda` feature, compiles the engine's own CUDA kernels
//! (src/mmdit/cuda/*.cu) to PTX with `nvcc`, as candle's kernels are built.
//! `CUDA_COMPUTE_CAP` (e.g. 90) picks the target; without it nvcc's default
//! PTX is built, which newer GPUs compile on load.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/mmdit/cuda/softmax.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("softmax.ptx");
    let mut nvcc = std::process::Command::new("nvcc");
    nvcc.args(["--ptx", "-O3", "-std=c++17", "-o"]).arg(&out).arg("src/mmdit/cuda/softmax.cu");
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        nvcc.arg(format!("-arch=compute_{}", cap.trim()));
    }
    let status = nvcc.status().unwrap_or_else(|e| panic!("the cuda feature needs nvcc (the CUDA toolkit) on PATH: {e}"));
    assert!(status.success(), "nvcc failed on src/mmdit/cuda/softmax.cu");
}
