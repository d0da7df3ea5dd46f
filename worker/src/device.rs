//! Chooses the tch device from `--device auto|cpu|cuda|cuda:N`, never silently falling back to the CPU.

use std::fmt;
use std::str::FromStr;

use tch::Device;

/// What the operator asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA device 0 when CUDA is available, the CPU otherwise.
    Auto,
    Cpu,
    /// `cuda` (device 0) or `cuda:N`.
    Cuda(usize),
}

/// Why a device request cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected auto, cpu, cuda or cuda:N")]
    Unknown(String),
    #[error(
        "device {requested} was requested but CUDA is not available \
         (no GPU or driver, or libtorch was built without CUDA); use --device cpu to train on the CPU"
    )]
    CudaUnavailable { requested: String },
    #[error("device {requested} was requested but only {count} CUDA device(s) are visible")]
    NoSuchCudaDevice { requested: String, count: usize },
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

impl FromStr for DeviceRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

impl DeviceRequest {
    /// Resolves the request against what this process can see.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        let available = tch::Cuda::is_available();
        let count = if available {
            usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
        } else {
            0
        };
        self.resolve_with(available, count)
    }

    /// Resolves the request given CUDA's availability and device count (pure, for tests).
    pub fn resolve_with(
        self,
        cuda_available: bool,
        cuda_count: usize,
    ) -> Result<Device, DeviceError> {
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Auto if cuda_available && cuda_count > 0 => Ok(Device::Cuda(0)),
            DeviceRequest::Auto => Ok(Device::Cpu),
            DeviceRequest::Cuda(_) if !cuda_available || cuda_count == 0 => {
                Err(DeviceError::CudaUnavailable {
                    requested: self.to_string(),
                })
            }
            DeviceRequest::Cuda(index) if index >= cuda_count => {
                Err(DeviceError::NoSuchCudaDevice {
                    requested: self.to_string(),
                    count: cuda_count,
                })
            }
            DeviceRequest::Cuda(index) => Ok(Device::Cuda(index)),
        }
    }
}

/// The device as the protocol spells it: `cpu`, `cuda:0`, ...
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Mps => "mps".to_string(),
        Device::Vulkan => "vulkan".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_spelling() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2", "cuda0"] {
            assert_eq!(
                bad.parse::<DeviceRequest>(),
                Err(DeviceError::Unknown(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cuda_requests_never_fall_back_to_the_cpu() {
        let err = DeviceRequest::Cuda(0).resolve_with(false, 0).unwrap_err();
        assert_eq!(
            err,
            DeviceError::CudaUnavailable {
                requested: "cuda:0".into()
            }
        );
        assert!(err.to_string().contains("CUDA is not available"));
        assert_eq!(
            DeviceRequest::Cuda(2).resolve_with(true, 2),
            Err(DeviceError::NoSuchCudaDevice {
                requested: "cuda:2".into(),
                count: 2
            })
        );
        assert_eq!(
            DeviceRequest::Cuda(1).resolve_with(true, 2),
            Ok(Device::Cuda(1))
        );
    }

    #[test]
    fn auto_prefers_cuda_and_cpu_is_always_cpu() {
        assert_eq!(
            DeviceRequest::Auto.resolve_with(true, 1),
            Ok(Device::Cuda(0))
        );
        assert_eq!(DeviceRequest::Auto.resolve_with(false, 0), Ok(Device::Cpu));
        assert_eq!(DeviceRequest::Cpu.resolve_with(true, 4), Ok(Device::Cpu));
    }

    #[test]
    fn resolving_against_this_machine_is_consistent_with_tch() {
        let resolved = DeviceRequest::Cuda(0).resolve();
        if tch::Cuda::is_available() {
            assert_eq!(resolved, Ok(Device::Cuda(0)));
        } else {
            assert!(matches!(resolved, Err(DeviceError::CudaUnavailable { .. })));
            assert_eq!(DeviceRequest::Auto.resolve(), Ok(Device::Cpu));
        }
        let too_high = DeviceRequest::Cuda(10_000).resolve();
        assert!(too_high.is_err());
    }
}
