//! Outlier detection by failure rate: which endpoints of a group fail
//! visibly more often than the rest of it over the last interval.
//!
//! Consecutive failures (in [`crate::endpoint`]) catch an endpoint that
//! fails everything; a gray failure (one endpoint answering one request in
//! ten with a 500) never makes five in a row, and health checks pass. Here
//! each endpoint's share of failed tries is compared with the rest of its
//! group's over the same interval: an endpoint is an outlier when its rate
//! exceeds theirs by at least `excess_percent` points *and* the difference
//! is significant (a two-proportion z-test at `Z_MIN`), so that an
//! application failing 1% everywhere, or a handful of requests, ejects
//! nothing. Comparing with the rest of the group, rather than with the
//! group's mean and deviation (Envoy's `success_rate_stdev_factor`), works
//! with three endpoints, where one outlier can never sit two deviations
//! from the mean.

use crate::config::FailureRate;

/// How many standard errors the difference must span (about 1 in 1,000
/// for a chance difference of one endpoint in one interval).
const Z_MIN: f64 = 3.0;

/// Tries and failed tries of one endpoint in one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tries {
    pub total: u64,
    pub failed: u64,
}

/// An endpoint found failing more than the rest of its group.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlier {
    pub index: usize,
    /// Its failure rate and the rest of the group's (0 to 1).
    pub rate: f64,
    pub rest: f64,
}

/// The outliers among `tries` (one entry per endpoint of a group), the
/// worst first (what a cap on ejections keeps).
pub fn judge(tries: &[Tries], cfg: &FailureRate) -> Vec<Outlier> {
    let all =
        tries.iter().fold(Tries::default(), |a, t| Tries { total: a.total + t.total, failed: a.failed + t.failed });
    let mut found: Vec<Outlier> = tries
        .iter()
        .enumerate()
        .filter(|(_, t)| t.total >= cfg.min_requests)
        .filter_map(|(index, t)| {
            let rest = Tries { total: all.total - t.total, failed: all.failed - t.failed };
            if rest.total < cfg.min_requests {
                return None;
            }
            let rate = t.failed as f64 / t.total as f64;
            let rest_rate = rest.failed as f64 / rest.total as f64;
            let pooled = all.failed as f64 / all.total as f64;
            let se = (pooled * (1.0 - pooled) * (1.0 / t.total as f64 + 1.0 / rest.total as f64)).sqrt();
            let excess = rate - rest_rate;
            let stands_out = excess * 100.0 >= f64::from(cfg.excess_percent) && se > 0.0 && excess / se >= Z_MIN;
            stands_out.then_some(Outlier { index, rate, rest: rest_rate })
        })
        .collect();
    found.sort_by(|a, b| b.rate.total_cmp(&a.rate));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(total: u64, failed: u64) -> Tries {
        Tries { total, failed }
    }

    fn judged(tries: &[Tries]) -> Vec<usize> {
        judge(tries, &FailureRate::default()).into_iter().map(|o| o.index).collect()
    }

    #[test]
    fn one_endpoint_failing_a_tenth_stands_out() {
        assert_eq!(judged(&[t(1000, 100), t(1000, 0), t(1000, 1)]), vec![0]);
        // A quiet group still shows it once there are enough tries.
        assert_eq!(judged(&[t(60, 6), t(60, 0), t(60, 0)]), vec![0]);
    }

    #[test]
    fn the_same_rate_everywhere_is_no_outlier() {
        assert!(judged(&[t(1000, 10), t(1000, 12), t(1000, 9)]).is_empty());
        assert!(judged(&[t(1000, 500), t(1000, 480), t(1000, 520)]).is_empty());
        // Every endpoint failing everything: nothing to compare with.
        assert!(judged(&[t(100, 100), t(100, 100)]).is_empty());
    }

    #[test]
    fn small_or_chance_differences_are_no_outliers() {
        // Too few tries to judge.
        assert!(judged(&[t(49, 49), t(1000, 0)]).is_empty());
        // Nothing to compare with: the rest had too few.
        assert!(judged(&[t(1000, 500), t(40, 0)]).is_empty());
        // Significant but under the excess: 3% against 1%.
        assert!(judged(&[t(100_000, 3000), t(100_000, 1000)]).is_empty());
        // Over the excess but not significant: 3 of 50 against 1 of 100.
        assert!(judged(&[t(50, 3), t(50, 1), t(50, 0)]).is_empty());
    }

    #[test]
    fn the_worst_comes_first() {
        let tries = [t(1000, 300), t(1000, 600), t(1000, 0), t(1000, 0), t(1000, 0), t(1000, 0)];
        let found = judge(&tries, &FailureRate::default());
        assert_eq!(found.iter().map(|o| o.index).collect::<Vec<_>>(), vec![1, 0]);
        assert!((found[0].rate - 0.6).abs() < 1e-9);
    }

    /// A uniform 1% failure over many intervals of a busy and of a quiet
    /// group ejects nothing (a fixed-seed generator: the same draws on
    /// every run).
    #[test]
    fn a_uniform_one_percent_is_never_judged_an_outlier() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut draw = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % 10_000 < 100
        };
        for per_interval in [60u64, 300, 3000] {
            for _ in 0..120 {
                let tries: Vec<Tries> =
                    (0..3).map(|_| t(per_interval, (0..per_interval).filter(|_| draw()).count() as u64)).collect();
                assert!(judged(&tries).is_empty(), "{tries:?}");
            }
        }
    }
}
