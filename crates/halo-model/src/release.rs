//! A service's `[release]` section: how a new template reaches its
//! instances. `rolling` (the default) replaces instances one at a time;
//! `canary` starts the new revision beside the stable one, sends it a
//! growing share of traffic step by step while the proxies' own counters
//! show it no worse than allowed, and rolls it back by itself otherwise.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::values::parse_duration;
use crate::SpecError;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepSection>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cohort: Option<CohortSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_nodes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_zone: Option<String>,
}

/// Clients that see the canary from its first ready instance on, whatever
/// the weight: `{ header = "x-canary", value = "1" }` or
/// `{ cookie = "track", value = "beta" }`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSection {
    pub weight: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate_vs_stable: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_vs_stable: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_limit: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Rolling,
    Canary,
    /// The whole new set beside the old one, then every request at once;
    /// the old set is kept `scale_down_delay` for an instant rollback.
    BlueGreen,
}

/// One canary step: the canary's share of traffic, held for `pause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Percent of requests, 1 to 100.
    pub weight: u32,
    pub pause: Duration,
}

/// When a canary window passes.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub interval: Duration,
    /// Canary requests a window needs to count; fewer holds the step.
    pub min_requests: u64,
    /// 5xx and proxy errors over requests, for the canary.
    pub max_error_rate: f64,
    /// And at most this many times stable's rate over the same window
    /// (checked when stable failed any request in it).
    pub max_error_rate_vs_stable: Option<f64>,
    /// The canary's 99th percentile latency at most this many times
    /// stable's over the same window (both taken as at least 5 ms).
    pub max_p99_vs_stable: Option<f64>,
    /// Failed windows before the rollback.
    pub failure_limit: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseSpec {
    pub strategy: Strategy,
    pub steps: Vec<Step>,
    /// A canary that is not ready (no ready instance) this long after the
    /// rollout began is rolled back.
    pub progress_deadline: Duration,
    /// Blue/green: how long the old set stays after the switch.
    pub scale_down_delay: Duration,
    pub analysis: Analysis,
    pub cohort: Option<Cohort>,
    /// Canary instances go only to these nodes (empty: any node).
    pub canary_nodes: Vec<String>,
    /// Canary instances go only to nodes of this zone.
    pub canary_zone: Option<String>,
}

/// Who always sees the canary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cohort {
    Header { name: http::HeaderName, value: String },
    Cookie { name: String, value: String },
}

impl Default for ReleaseSpec {
    fn default() -> ReleaseSpec {
        ReleaseSpec {
            strategy: Strategy::Rolling,
            steps: Vec::new(),
            progress_deadline: Duration::from_secs(600),
            scale_down_delay: Duration::from_secs(30),
            analysis: Analysis {
                interval: Duration::from_secs(10),
                min_requests: 100,
                max_error_rate: 0.01,
                max_error_rate_vs_stable: None,
                max_p99_vs_stable: None,
                failure_limit: 2,
            },
            cohort: None,
            canary_nodes: Vec::new(),
            canary_zone: None,
        }
    }
}

/// Validates `r`; every problem goes to `errors` with its field.
pub fn validate(r: &ReleaseSection, errors: &mut Vec<SpecError>) -> ReleaseSpec {
    let mut err = |field: &str, message: String| errors.push(SpecError { field: field.into(), message });
    let strategy = match r.strategy.as_deref().unwrap_or("rolling") {
        "rolling" => Strategy::Rolling,
        "canary" => Strategy::Canary,
        "blue_green" => Strategy::BlueGreen,
        other => {
            err("release.strategy", format!("unknown strategy '{other}'; accepted: rolling, canary, blue_green"));
            Strategy::Rolling
        }
    };
    let mut spec = ReleaseSpec { strategy, ..ReleaseSpec::default() };
    let duration = |field: &str, v: &Option<String>, default: Duration, err: &mut dyn FnMut(&str, String)| match v {
        None => default,
        Some(s) => parse_duration(s).unwrap_or_else(|m| {
            err(field, m);
            default
        }),
    };
    let mut last = 0;
    for (i, s) in r.steps.iter().flatten().enumerate() {
        let field = format!("release.steps[{i}]");
        if !(1..=100).contains(&s.weight) {
            err(&format!("{field}.weight"), format!("{} is not accepted; a weight is a percent, 1 to 100", s.weight));
        } else if s.weight <= last {
            err(
                &format!("{field}.weight"),
                format!("{} does not grow: weights must increase, and {last} came before", s.weight),
            );
        }
        last = last.max(s.weight);
        let pause = duration(&format!("{field}.pause"), &s.pause, Duration::ZERO, &mut err);
        spec.steps.push(Step { weight: s.weight.clamp(1, 100) as u32, pause });
    }
    match spec.strategy {
        Strategy::Canary if spec.steps.is_empty() => err(
            "release.steps",
            "a canary needs steps, as in steps = [{ weight = 10, pause = \"1m\" }, { weight = 50, pause = \"1m\" }]"
                .into(),
        ),
        Strategy::Rolling | Strategy::BlueGreen if !spec.steps.is_empty() => err(
            "release.steps",
            "steps are for strategy = \"canary\"; rolling replaces one instance at a time, blue_green switches at once"
                .into(),
        ),
        _ => {}
    }
    spec.cohort = r.cohort.as_ref().and_then(|c| match (&c.header, &c.cookie) {
        (Some(h), None) if http::HeaderName::try_from(h.as_str()).is_ok() && !c.value.is_empty() => {
            Some(Cohort::Header { name: http::HeaderName::try_from(h.as_str()).ok()?, value: c.value.clone() })
        }
        (None, Some(k)) if !k.is_empty() && !k.contains([';', '=', ' ']) && !c.value.is_empty() => {
            Some(Cohort::Cookie { name: k.clone(), value: c.value.clone() })
        }
        _ => {
            err(
                "release.cohort",
                "give a header or a cookie name, and a value: { header = \"x-canary\", value = \"1\" } or \
                 { cookie = \"track\", value = \"beta\" }"
                    .into(),
            );
            None
        }
    });
    let node_name = |n: &str| {
        !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    for (i, n) in r.canary_nodes.iter().flatten().enumerate() {
        if !node_name(n) {
            err(&format!("release.canary_nodes[{i}]"), format!("'{n}' is not a node name (letters, digits, '-', '_')"));
        }
    }
    spec.canary_nodes = r.canary_nodes.clone().unwrap_or_default();
    spec.canary_zone = r.canary_zone.clone();
    if spec.canary_zone.as_deref().is_some_and(|z| z.is_empty()) {
        err("release.canary_zone", "is empty; give a zone name as agents take with --zone".into());
    }
    spec.progress_deadline =
        duration("release.progress_deadline", &r.progress_deadline, spec.progress_deadline, &mut err);
    spec.scale_down_delay = duration("release.scale_down_delay", &r.scale_down_delay, spec.scale_down_delay, &mut err);
    if let Some(a) = &r.analysis {
        let an = &mut spec.analysis;
        an.interval = duration("release.analysis.interval", &a.interval, an.interval, &mut err);
        if an.interval < Duration::from_millis(100) {
            err("release.analysis.interval", "must be at least 100ms".into());
        }
        an.min_requests = a.min_requests.unwrap_or(an.min_requests);
        if let Some(rate) = a.max_error_rate {
            if !(0.0..=1.0).contains(&rate) {
                err("release.analysis.max_error_rate", format!("{rate} is not accepted; a rate is 0.0 to 1.0"));
            }
            an.max_error_rate = rate.clamp(0.0, 1.0);
        }
        if let Some(ratio) = a.max_error_rate_vs_stable {
            if !(ratio >= 1.0 && ratio.is_finite()) {
                err("release.analysis.max_error_rate_vs_stable", format!("{ratio} is not accepted; use 1.0 or more"));
            }
            an.max_error_rate_vs_stable = Some(ratio);
        }
        if let Some(ratio) = a.max_p99_vs_stable {
            if !(ratio >= 1.0 && ratio.is_finite()) {
                err("release.analysis.max_p99_vs_stable", format!("{ratio} is not accepted; use 1.0 or more"));
            }
            an.max_p99_vs_stable = Some(ratio);
        }
        an.failure_limit = a.failure_limit.unwrap_or(an.failure_limit);
        if an.failure_limit == 0 {
            err("release.analysis.failure_limit", "must be at least 1".into());
        }
    }
    spec
}
