//! Sampling decided from the trace id alone, so every replica that sees a call makes the
//! same choice without coordination.

/// FNV-1a over the judge name and the trace id: stable across processes and versions.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    // FNV's low bits mix poorly; finish with a 64-bit avalanche (splitmix64's).
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d049bb133111eb);
    h ^ (h >> 31)
}

/// Whether `judge` looks at `trace_id` at `rate` (0.0 to 1.0).
pub fn is_sampled(trace_id: &str, judge: &str, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate <= 0.0 {
        return false;
    }
    let h = fnv1a(&[judge.as_bytes(), trace_id.as_bytes()]);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_holds_within_a_point_over_20000_ids_and_is_stable() {
        let ids: Vec<String> =
            (0..20_000u64).map(|i| format!("{:032x}", i.wrapping_mul(0x9e3779b97f4a7c15) as u128 * 31 + 7)).collect();
        let n = ids.iter().filter(|id| is_sampled(id, "helpfulness", 0.2)).count();
        let rate = n as f64 / ids.len() as f64;
        assert!((rate - 0.2).abs() <= 0.01, "observed {rate}");
        // Same decision every time (and so in every process): a fixed expectation.
        let first: Vec<bool> = ids.iter().take(16).map(|id| is_sampled(id, "helpfulness", 0.2)).collect();
        let again: Vec<bool> = ids.iter().take(16).map(|id| is_sampled(id, "helpfulness", 0.2)).collect();
        assert_eq!(first, again);
        assert!(is_sampled("x", "j", 1.0) && !is_sampled("x", "j", 0.0));
    }
}
