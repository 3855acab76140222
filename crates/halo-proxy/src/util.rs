//! Small shared helpers: a stable hash, a fast thread-local random source and
//! a monotonic millisecond clock that fits in an atomic.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// FNV-1a followed by a SplitMix64 finaliser: stable across processes and
/// versions, so hashes (Maglev tables, session cookie ids) never move on
/// restart.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    mix64(t ^ (&local as *const u8 as u64))
}

/// A uniformly distributed `u64` (xorshift64*); not for secrets.
pub fn rand_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A number in `0..n` (`n > 0`).
pub fn rand_below(n: u64) -> u64 {
    ((u128::from(rand_u64()) * u128::from(n)) >> 64) as u64
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds since the process first asked; never 0 after the first call
/// so that 0 can mean "never".
pub fn now_ms() -> u64 {
    base().elapsed().as_millis() as u64 + 1
}

/// [`now_ms`] for an instant already read, to spare a clock read.
pub fn ms_at(t: Instant) -> u64 {
    t.saturating_duration_since(base()).as_millis() as u64 + 1
}

pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// A 128-bit random id in lower-case hex, for `x-request-id`.
pub fn request_id() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    let (a, b) = (rand_u64(), rand_u64());
    for i in 0..16 {
        out[i] = HEX[((a >> (60 - 4 * i)) & 0xf) as usize];
        out[16 + i] = HEX[((b >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// A small deterministic generator (xorshift) for the property tests: no
/// crate, and the same cases every run.
#[cfg(test)]
pub(crate) struct Rng(pub u64);

#[cfg(test)]
impl Rng {
    /// The next value in `0..n`.
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        assert_eq!(hash64(b"127.0.0.1:9000"), hash64(b"127.0.0.1:9000"));
        assert_ne!(hash64(b"127.0.0.1:9000"), hash64(b"127.0.0.1:9001"));
    }

    #[test]
    fn rand_below_stays_in_range() {
        for n in [1u64, 2, 3, 10, 1000] {
            for _ in 0..1000 {
                assert!(rand_below(n) < n);
            }
        }
    }
}
