//! The rule every health check of halo follows, whatever it checks
//! (an instance's probes, the proxy's active checks of its endpoints, the
//! check a node passes to hold a floating IP): a state changes only after
//! `rise` passes, or `fall` failures, in a row.

/// Consecutive results of one check.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    passes: u32,
    failures: u32,
}

/// What one result says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `rise` passes in a row (or more).
    Passing,
    /// `fall` failures in a row (or more).
    Failing,
    /// Neither yet: the state stays as it was.
    Undecided,
}

impl Tally {
    /// Records one result against the thresholds.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Verdict {
        if ok {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
            if self.passes >= rise {
                return Verdict::Passing;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
            if self.failures >= fall {
                return Verdict::Failing;
            }
        }
        Verdict::Undecided
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_need_results_in_a_row() {
        let mut t = Tally::default();
        let (rise, fall) = (2, 3);
        assert_eq!(t.record(true, rise, fall), Verdict::Undecided);
        assert_eq!(t.record(false, rise, fall), Verdict::Undecided);
        assert_eq!(t.record(true, rise, fall), Verdict::Undecided, "a failure resets the passes");
        assert_eq!(t.record(true, rise, fall), Verdict::Passing);
        assert_eq!(t.record(true, rise, fall), Verdict::Passing, "and stays passing");
        assert_eq!(t.record(false, rise, fall), Verdict::Undecided);
        assert_eq!(t.record(false, rise, fall), Verdict::Undecided);
        assert_eq!(t.record(false, rise, fall), Verdict::Failing);
    }
}
