//! The retry budget: retries may be at most a share of recent requests plus a
//! small floor per second, over a sliding window of ten one-second slots
//! (Finagle's and Linkerd's budget). It stops retry storms: when an upstream
//! fails everything, traffic grows by the ratio, not by the attempt count.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::util::now_ms;

const SLOTS: usize = 10;

#[derive(Default)]
pub struct RetryBudget {
    slots: [Slot; SLOTS],
}

#[derive(Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    fn slot(&self, now_s: u64) -> &Slot {
        let s = &self.slots[(now_s % SLOTS as u64) as usize];
        let seen = s.second.load(Relaxed);
        if seen != now_s && s.second.compare_exchange(seen, now_s, Relaxed, Relaxed).is_ok() {
            s.requests.store(0, Relaxed);
            s.retries.store(0, Relaxed);
        }
        s
    }

    /// Counts one original request; `now` from [`crate::util::now_ms`].
    pub fn deposit(&self, now: u64) {
        self.slot(now / 1000).requests.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget if there is room.
    pub fn withdraw(&self, ratio: f64, min_per_sec: u32) -> bool {
        let now_s = now_ms() / 1000;
        let (mut reqs, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            let sec = s.second.load(Relaxed);
            if sec + (SLOTS as u64) > now_s && sec <= now_s {
                reqs += s.requests.load(Relaxed);
                retries += s.retries.load(Relaxed);
            }
        }
        let allowed = ratio * reqs as f64 + f64::from(min_per_sec) * SLOTS as f64;
        if (retries as f64) < allowed {
            self.slot(now_s).retries.fetch_add(1, Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_retries_to_ratio_plus_floor() {
        let b = RetryBudget::default();
        for _ in 0..1000 {
            b.deposit(now_ms());
        }
        let granted = (0..1000).filter(|_| b.withdraw(0.2, 1)).count();
        // 20% of 1000 plus a floor of 1/s over 10 s.
        assert_eq!(granted, 210);
    }
}
