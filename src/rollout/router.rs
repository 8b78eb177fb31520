//! Sticky traffic splitting: a routing key hashes to a fixed point in [0, 1), and a key sees the
//! candidate while that point is below the candidate's share. Raising the share therefore only moves keys
//! from stable to candidate, and the salt (the rollout's id) reshuffles keys between rollouts.

/// Where `key` falls in [0, 1) for a rollout salted with `salt`: FNV-1a over both, then a SplitMix64
/// finaliser so nearby keys spread evenly. Stable across processes, platforms and releases.
pub fn bucket(salt: &str, key: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.bytes().chain([0u8]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether `key` sees the candidate at share `traffic`.
pub fn to_candidate(salt: &str, key: &str, traffic: f64) -> bool {
    bucket(salt, key) < traffic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_accurate_sticky_and_monotonic_over_ten_thousand_keys() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        for target in [0.1, 0.5] {
            let share = keys
                .iter()
                .filter(|k| to_candidate("r-1", k, target))
                .count() as f64
                / keys.len() as f64;
            assert!((share - target).abs() <= 0.02, "share {share} for {target}");
        }
        for k in &keys {
            // Repeated keys keep their arm.
            assert_eq!(to_candidate("r-1", k, 0.1), to_candidate("r-1", k, 0.1));
            // 10 % → 50 % only moves keys from stable to candidate.
            if to_candidate("r-1", k, 0.1) {
                assert!(to_candidate("r-1", k, 0.5), "{k} moved back to stable");
            }
        }
        let moved = keys
            .iter()
            .filter(|k| to_candidate("r-1", k, 0.1) != to_candidate("r-2", k, 0.1))
            .count();
        assert!(
            moved > 1000,
            "a new rollout reshuffles keys ({moved} moved)"
        );
    }
}
