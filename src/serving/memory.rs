//! How much memory the server may use, and what its KV caches take, so
//! `serve` can refuse a `--max-active` whose caches cannot fit instead of
//! being killed for memory under load.

use crate::model::config::Config;
use crate::model::cpu::KvDtype;

/// Bytes of the CPU backend's KV cache of one sequence: keys and values
/// in `kv` (`--kv-cache`), every layer, the whole context window
/// (preallocated).
pub fn kv_bytes_per_sequence(cfg: &Config, kv: KvDtype) -> u64 {
    2 * cfg.n_layer as u64 * cfg.block_size as u64 * cfg.n_embd as u64 * kv.bytes() as u64
}

/// Memory available to this process: the smaller of the cgroup's limit
/// left (v2 `memory.max - memory.current`, or v1's limit less usage) and
/// the system's MemAvailable. None when neither can be read.
pub fn available_bytes() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup = match num(read("/sys/fs/cgroup/memory.max")) {
        Some(max) => {
            Some(max.saturating_sub(num(read("/sys/fs/cgroup/memory.current")).unwrap_or(0)))
        }
        None => num(read("/sys/fs/cgroup/memory/memory.limit_in_bytes")).map(|max| {
            max.saturating_sub(
                num(read("/sys/fs/cgroup/memory/memory.usage_in_bytes")).unwrap_or(0),
            )
        }),
    };
    let meminfo = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match (cgroup, meminfo) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Checks that `max_active` KV caches in `kv` fit in `available` bytes;
/// the error names the flag, the need and the limit.
pub fn check_kv_fits(
    cfg: &Config,
    kv: KvDtype,
    max_active: usize,
    available: u64,
) -> Result<(), String> {
    let per = kv_bytes_per_sequence(cfg, kv);
    let need = per * max_active as u64;
    if need > available {
        return Err(format!(
            "--max-active {max_active} needs {} MiB of KV cache ({} MiB per sequence), \
             more than the {} MiB of memory available to this process; lower --max-active \
             to at most {}",
            need >> 20,
            per >> 20,
            available >> 20,
            available / per.max(1)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_layer: usize, n_embd: usize, block_size: usize) -> Config {
        Config {
            n_layer,
            n_embd,
            block_size,
            ..Config::preset("tiny").unwrap()
        }
    }

    #[test]
    fn kv_bytes_of_the_shipped_shape_and_gpt2() {
        // 6 x 384, 256 positions: 4.5 MiB; GPT-2 small, 1024 positions: 72 MiB.
        assert_eq!(
            kv_bytes_per_sequence(&cfg(6, 384, 256), KvDtype::F32),
            4_718_592
        );
        assert_eq!(
            kv_bytes_per_sequence(&cfg(12, 768, 1024), KvDtype::F32),
            75_497_472
        );
    }

    #[test]
    fn an_f16_cache_counts_two_bytes_a_value_and_fits_twice_the_sequences() {
        let c = cfg(12, 768, 1024);
        assert_eq!(kv_bytes_per_sequence(&c, KvDtype::F16), 37_748_736);
        // 1 GiB holds 14 f32 caches of GPT-2 small, and 28 in f16.
        assert!(check_kv_fits(&c, KvDtype::F32, 28, 1 << 30).is_err());
        assert!(check_kv_fits(&c, KvDtype::F16, 28, 1 << 30).is_ok());
        let e = check_kv_fits(&c, KvDtype::F16, 32, 1 << 30).unwrap_err();
        assert!(
            e.contains("at most 28") && e.contains("36 MiB per sequence"),
            "{e}"
        );
    }

    #[test]
    fn too_many_caches_are_refused_with_the_limit_named() {
        let c = cfg(12, 768, 1024);
        assert!(check_kv_fits(&c, KvDtype::F32, 32, 4 << 30).is_ok());
        let e = check_kv_fits(&c, KvDtype::F32, 32, 1 << 30).unwrap_err();
        assert!(
            e.contains("--max-active 32") && e.contains("1024 MiB"),
            "{e}"
        );
        assert!(e.contains("at most 14"), "{e}");
    }
}
