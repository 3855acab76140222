//! A seeded random source for tests that explore (fuzzed inputs, fault
//! soaks, kill points): the seed is printed, and setting the same seed in
//! the environment replays the run.

/// xorshift64*: small, fast, reproducible.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the environment variable `var` when it holds a number,
    /// else from the clock; prints `VAR=SEED` so a failed run can be
    /// replayed.
    pub fn from_env(var: &str) -> Rng {
        let seed = std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        });
        println!("{var}={seed}");
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A duration between `lo` and `hi`, to the millisecond.
    pub fn between(&mut self, lo: std::time::Duration, hi: std::time::Duration) -> std::time::Duration {
        let span = hi.saturating_sub(lo).as_millis() as usize;
        lo + std::time::Duration::from_millis(self.below(span + 1) as u64)
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}
