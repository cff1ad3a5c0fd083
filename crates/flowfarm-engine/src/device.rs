//! Where and in what precision a model runs, as written in configs and on
//! command lines: `cpu`, `cuda` (= `cuda:0`), `cuda:N`; `f32`, `f16`, `bf16`.

use candle_core::{DType, Device};

use crate::EngineError;

/// Whether this build carries candle's CUDA kernels (the `cuda` feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// A device as configs name it, before anything is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// The GPU with this CUDA ordinal.
    Cuda(usize),
}

/// Parses `cpu`, `cpu:N`, `cuda` (= `cuda:0`) or `cuda:N` without opening
/// anything. `cpu:N` is the CPU too: a worker that lists several gives each
/// its own share of the cores.
///
/// # Errors
/// [`EngineError::Device`] saying which forms are accepted.
pub fn parse_device(spec: &str) -> Result<DeviceSpec, EngineError> {
    let bad = |reason: String| EngineError::Device { spec: spec.to_string(), reason };
    match spec.trim() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        other => match (other.strip_prefix("cuda:"), other.strip_prefix("cpu:")) {
            (Some(n), _) => n.parse::<usize>().map(DeviceSpec::Cuda).map_err(|_| bad(format!("`{n}` is not a GPU number"))),
            (_, Some(n)) => n.parse::<usize>().map(|_| DeviceSpec::Cpu).map_err(|_| bad(format!("`{n}` is not a CPU device number"))),
            _ => Err(bad("expected `cpu`, `cpu:N`, `cuda` or `cuda:N`".into())),
        },
    }
}

/// Opens the device named by `spec`.
///
/// # Errors
/// [`EngineError::Device`] when the name is not one of the forms above, when
/// this build has no CUDA support (rebuild with `--features cuda`), or when
/// the CUDA driver cannot open that GPU.
pub fn open_device(spec: &str) -> Result<Device, EngineError> {
    let ordinal = match parse_device(spec)? {
        DeviceSpec::Cpu => return Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => ordinal,
    };
    let bad = |reason: String| EngineError::Device { spec: spec.to_string(), reason };
    if !CUDA_BUILT {
        return Err(bad("this flowfarm was built without CUDA; rebuild with `--features cuda`".into()));
    }
    Device::new_cuda(ordinal).map_err(|e| bad(format!("cannot open GPU {ordinal}: {e}")))
}

/// Every GPU the driver lets this process open, as `cuda:N` names (a
/// worker's `devices = "all"`).
///
/// # Errors
/// [`EngineError::Device`] when this build has no CUDA support or no GPU opens.
pub fn every_gpu() -> Result<Vec<String>, EngineError> {
    let bad = |reason: &str| EngineError::Device { spec: "all".into(), reason: reason.into() };
    if !CUDA_BUILT {
        return Err(bad("`all` means every GPU, and this flowfarm was built without CUDA; rebuild with `--features cuda`, or list CPU devices (`cpu:0`, `cpu:1`)"));
    }
    // Ordinals are dense: the first that does not open is past the last GPU.
    let names: Vec<String> = (0..64).take_while(|&n| Device::new_cuda(n).is_ok()).map(|n| format!("cuda:{n}")).collect();
    if names.is_empty() {
        return Err(bad("no GPU could be opened (is the driver loaded, and CUDA_VISIBLE_DEVICES set right?)"));
    }
    Ok(names)
}

/// The dtype named by `name` (`f32`, `f16` or `bf16`, any case).
///
/// # Errors
/// [`EngineError::Input`] naming the accepted values.
pub fn parse_dtype(name: &str) -> Result<DType, EngineError> {
    match name.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(EngineError::Input(format!("dtype `{name}`: expected `f32`, `f16` or `bf16`"))),
    }
}

/// A short name of `device` for logs and worker registration (`cpu`, `cuda:0`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// What a worker reports of its device: a name (`cpu`, or `cuda:0 NVIDIA H200`
/// with the GPU's model) and, for a GPU, its memory in bytes (None on the CPU,
/// or when the driver does not say).
pub fn device_info(device: &Device) -> (String, Option<u64>) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let stream = cuda.cuda_stream();
        let context = stream.context();
        let name = match context.name() {
            Ok(model) => format!("{} {model}", device_name(device)),
            Err(_) => device_name(device),
        };
        return (name, context.total_mem().ok().map(|bytes| bytes as u64));
    }
    (device_name(device), None)
}

/// Memory `device` can still give, in bytes, where it can be known: on the
/// CPU, Linux's `MemAvailable`. None elsewhere, on GPUs too: their free
/// memory is not read yet (the memory planner of multi-device workers will),
/// so callers that ask take None as "assume it fits".
pub fn available_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            mem_available(&meminfo)
        }
        _ => None,
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_say_what_is_accepted() {
        assert!(open_device("cpu").unwrap().is_cpu());
        assert_eq!(device_name(&open_device(" cpu ").unwrap()), "cpu");
        let err = open_device("gpu0").unwrap_err().to_string();
        assert!(err.contains("`cpu`, `cpu:N`, `cuda` or `cuda:N`"), "{err}");
        assert!(open_device("cpu:1").unwrap().is_cpu());
        let err = open_device("cpu:one").unwrap_err().to_string();
        assert!(err.contains("`one` is not a CPU device number"), "{err}");
        let err = open_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("`x` is not a GPU number"), "{err}");
        if !CUDA_BUILT {
            let err = open_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        assert_eq!(parse_dtype("BF16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("f16").unwrap(), DType::F16);
        assert!(parse_dtype("f64").unwrap_err().to_string().contains("`f32`, `f16` or `bf16`"));
    }

    #[test]
    fn available_memory_reads_meminfo() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(text), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemFree: 12 kB\n"), None);
        // This machine's own, whatever it is: something, and not more than all of it.
        let available = available_memory(&Device::Cpu).expect("Linux says how much memory is available");
        assert!(available > 0);
    }

    #[test]
    fn the_cpu_has_no_device_memory_of_its_own() {
        assert_eq!(device_info(&Device::Cpu), ("cpu".to_string(), None));
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn a_gpu_reports_its_model_and_memory() {
        let gpu = open_device("cuda:0").expect("a CUDA build's tests need a GPU");
        let (name, memory) = device_info(&gpu);
        println!("{name}: {memory:?} bytes");
        assert!(name.starts_with("cuda:0 ") && name.len() > 7, "{name}");
        assert!(memory.is_some_and(|m| m > 1 << 30), "{memory:?}");
    }
}
