//! Cron expressions for backup schedules: five fields (minute, hour, day
//! of month, month, day of week; UTC), each `*`, a number, a range `a-b`,
//! a step `*/n` or `a-b/n`, or a list of those. As in cron, when both the
//! day of month and the day of week are restricted, a day matching either
//! fires.

/// A parsed cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minute: Vec<bool>,
    hour: Vec<bool>,
    dom: Vec<bool>,
    month: Vec<bool>,
    dow: Vec<bool>,
    dom_any: bool,
    dow_any: bool,
}

fn field(text: &str, name: &str, lo: u32, hi: u32) -> Result<(Vec<bool>, bool), String> {
    let mut set = vec![false; hi as usize + 1];
    let bad =
        |why: &str| format!("{name} '{text}': {why}; accepted: *, N, A-B, */N, A-B/N and lists of them ({lo}-{hi})");
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                (r, s.parse::<u32>().ok().filter(|s| *s > 0).ok_or_else(|| bad("a step is a number above 0"))?)
            }
            None => (part, 1),
        };
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => {
                    (a.parse().map_err(|_| bad("not a number"))?, b.parse().map_err(|_| bad("not a number"))?)
                }
                None => {
                    let n = r.parse().map_err(|_| bad("not a number"))?;
                    (n, if step > 1 { hi } else { n })
                }
            },
        };
        if a < lo || b > hi || a > b {
            return Err(bad("out of range"));
        }
        for v in (a..=b).step_by(step as usize) {
            set[v as usize] = true;
        }
    }
    Ok((set, text == "*"))
}

impl Cron {
    pub fn parse(text: &str) -> Result<Cron, String> {
        let f: Vec<&str> = text.split_whitespace().collect();
        let [mi, h, dm, mo, dw] = f[..] else {
            return Err(format!(
                "'{text}' has {} fields; a cron expression has 5: minute hour day month weekday",
                f.len()
            ));
        };
        let (minute, _) = field(mi, "minute", 0, 59)?;
        let (hour, _) = field(h, "hour", 0, 23)?;
        let (dom, dom_any) = field(dm, "day of month", 1, 31)?;
        let (month, _) = field(mo, "month", 1, 12)?;
        // 0 and 7 are both Sunday.
        let (mut dow, dow_any) = field(dw, "day of week", 0, 7)?;
        if dow[7] {
            dow[0] = true;
        }
        Ok(Cron { minute, hour, dom, month, dow, dom_any, dow_any })
    }

    /// The first whole minute after `after` (unix seconds) that matches, in
    /// unix seconds; `None` when none does within 5 years (as `0 0 30 2 *`).
    pub fn next_after(&self, after: u64) -> Option<u64> {
        let mut t = (after / 60 + 1) * 60;
        let limit = t + 5 * 366 * 86_400;
        while t < limit {
            let days = t / 86_400;
            let (y, m, d) = civil(days as i64);
            let _ = y;
            let weekday = ((days + 4) % 7) as usize; // 1970-01-01 was a Thursday
            let day_ok = match (self.dom_any, self.dow_any) {
                (true, true) => true,
                (false, true) => self.dom[d as usize],
                (true, false) => self.dow[weekday],
                (false, false) => self.dom[d as usize] || self.dow[weekday],
            };
            if !self.month[m as usize] || !day_ok {
                t = (days + 1) * 86_400;
                continue;
            }
            let (hour, minute) = ((t % 86_400) / 3600, (t % 3600) / 60);
            if !self.hour[hour as usize] {
                t = (t / 3600 + 1) * 3600;
                continue;
            }
            if self.minute[minute as usize] {
                return Some(t);
            }
            t += 60;
        }
        None
    }
}

/// `secs` (unix seconds) as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    let (y, m, d) = civil((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", t / 3600, t % 3600 / 60, t % 60)
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01
/// (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-12-01 (a Tuesday) 20:17:55 UTC.
    const NOW: u64 = 1_796_156_275;

    #[test]
    fn next_times() {
        let at = |e: &str| Cron::parse(e).unwrap().next_after(NOW).unwrap();
        assert_eq!(at("* * * * *"), NOW - NOW % 60 + 60);
        assert_eq!(at("*/15 * * * *") % 900, 0);
        // 03:00 the next day.
        assert_eq!(at("0 3 * * *"), 1_796_180_400);
        // The next Sunday (2026-12-06) at 04:30, also as weekday 7.
        assert_eq!(at("30 4 * * 0"), 1_796_531_400);
        assert_eq!(at("30 4 * * 7"), 1_796_531_400);
        // The 1st of January.
        assert_eq!(at("0 0 1 1 *"), 1_798_761_600);
        assert_eq!(civil(20_453), (2025, 12, 31));
        assert_eq!(utc(NOW), "2026-12-01 20:17:55 UTC");
    }

    #[test]
    fn bad_expressions_say_what_is_accepted() {
        for (e, says) in [
            ("* * *", "5: minute"),
            ("60 * * * *", "out of range"),
            ("*/0 * * * *", "step"),
            ("a * * * *", "not a number"),
        ] {
            let err = Cron::parse(e).unwrap_err();
            assert!(err.contains(says), "{e}: {err}");
        }
        assert_eq!(Cron::parse("0 0 30 2 *").unwrap().next_after(NOW), None);
    }
}
