//! `--device` values: `cpu`, or `cuda[:N]` in builds with the `cuda` feature
//! (see `scripts/cuda-build.sh`).

use candle_core::Device;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device `{0}` is not `cpu` or `cuda[:N]`")]
    Unknown(String),
    #[error("--device `{0}` needs a build with the `cuda` feature (scripts/cuda-build.sh); this binary is CPU-only")]
    NoCuda(String),
    #[error("--device `{0}`: {1}")]
    Open(String, String),
}

/// Parses and opens a device.
pub fn parse(s: &str) -> Result<Device, DeviceError> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| DeviceError::Unknown(s.to_string()))?,
        None => return Err(DeviceError::Unknown(s.to_string())),
    };
    if !cfg!(feature = "cuda") {
        return Err(DeviceError::NoCuda(s.to_string()));
    }
    let device = open_cuda(s, ordinal)?;
    // f32 matmuls on the GPU use TF32 tensor cores (PyTorch's
    // `set_float32_matmul_precision("high")`): 10-bit mantissa products,
    // f32 accumulation; about 8x the strict-f32 rate on an H100/H200.
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    Ok(device)
}

/// cudarc loads the CUDA driver library on first use and panics when it is
/// not there (a machine without an NVIDIA driver): that panic becomes an
/// error that says so, with the panic's own message silenced.
fn open_cuda(s: &str, ordinal: usize) -> Result<Device, DeviceError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    match opened {
        Ok(r) => r.map_err(|e| DeviceError::Open(s.to_string(), e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|m| m.to_string()))
                .unwrap_or_default();
            let head = msg.split(" - ").next().unwrap_or("").trim().to_string();
            Err(DeviceError::Open(
                s.to_string(),
                format!("no usable CUDA driver on this machine ({head}); is an NVIDIA driver installed and LD_LIBRARY_PATH pointing at the CUDA libraries (scripts/cuda-run.sh)?"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_bad_names_say_what_is_wrong() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse("gpu")
            .unwrap_err()
            .to_string()
            .contains("not `cpu` or `cuda[:N]`"));
        assert!(parse("cuda:x").unwrap_err().to_string().contains("cuda:x"));
        if !cfg!(feature = "cuda") {
            let e = parse("cuda:0").unwrap_err().to_string();
            assert!(e.contains("`cuda` feature"), "{e}");
        }
    }
}
