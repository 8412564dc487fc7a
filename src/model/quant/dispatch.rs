//! Which int8 kernel a quantized matmul runs: AVX-512 VNNI (512-bit
//! `vpdpbusd`, needs AVX-512F+BW+VNNI), AVX2 (`vpmaddubsw` + `vpmaddwd`), or
//! the portable loop; detected once at run time. `GPT_SERVE_QUANT_KERNEL`
//! = `portable`, `avx2` or `vnni` forces one for testing and comparison; a
//! forced path this CPU lacks falls back to the best available one with a
//! warning (never runs instructions the CPU does not have).
//!
//! All three give the same bits (see `quant`'s doc), so the choice is
//! speed only.

use std::sync::OnceLock;

/// The environment variable that forces a kernel.
pub const KERNEL_ENV: &str = "GPT_SERVE_QUANT_KERNEL";

/// An int8 dot-product kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    Portable,
    Avx2,
    Vnni,
}

impl KernelPath {
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
            KernelPath::Vnni => "vnni",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [KernelPath::Portable, KernelPath::Avx2, KernelPath::Vnni]
            .into_iter()
            .find(|p| p.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether this CPU has the instructions the path uses.
    pub fn is_available(self) -> bool {
        match self {
            KernelPath::Portable => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Vnni => {
                KernelPath::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this CPU can run, portable first.
    pub fn available() -> Vec<KernelPath> {
        [KernelPath::Portable, KernelPath::Avx2, KernelPath::Vnni]
            .into_iter()
            .filter(|p| p.is_available())
            .collect()
    }

    /// The fastest available path.
    pub fn best() -> KernelPath {
        *Self::available().last().unwrap_or(&KernelPath::Portable)
    }

    /// The path `forward` uses: `GPT_SERVE_QUANT_KERNEL` if set and
    /// available, else the best; decided once per process.
    pub fn selected() -> KernelPath {
        static PATH: OnceLock<KernelPath> = OnceLock::new();
        *PATH.get_or_init(|| {
            let forced = std::env::var(KERNEL_ENV).ok();
            let (path, warning) = Self::resolve(forced.as_deref());
            if let Some(w) = warning {
                tracing::warn!("{w}");
            }
            path
        })
    }

    /// The path for a `GPT_SERVE_QUANT_KERNEL` value, and a warning when
    /// the value is unknown or names a path this CPU lacks.
    pub fn resolve(forced: Option<&str>) -> (KernelPath, Option<String>) {
        let Some(value) = forced else {
            return (Self::best(), None);
        };
        let best = Self::best();
        match Self::parse(value) {
            Some(p) if p.is_available() => (p, None),
            Some(p) => (
                best,
                Some(format!(
                    "{KERNEL_ENV}={value}: this CPU lacks the {} instructions; using {}",
                    p.name(),
                    best.name()
                )),
            ),
            None => (
                best,
                Some(format!(
                    "{KERNEL_ENV}={value} is not portable, avx2 or vnni; using {}",
                    best.name()
                )),
            ),
        }
    }
}
