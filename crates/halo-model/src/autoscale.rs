//! A service's `[autoscale]` and `[budget]` sections.
//!
//! `[autoscale]` lets the leader choose the replica count between `min`
//! and `max` from what the proxies measure: requests in flight, requests a
//! second, or the 99th percentile latency, each a target per ready
//! instance. With `min = 0` the service goes to zero instances after
//! `scale_to_zero_after` without a request, and a request that finds none
//! is held by the proxy (`cold_start_timeout`, `cold_start_queue`) while
//! one starts.
//!
//! `[budget]` bounds voluntary disruptions (drains, rolling updates,
//! maintenance): at least `min_available` instances stay ready, or at most
//! `max_unavailable` of the replicas are missing. Without one, nothing
//! ready goes before its replacement is ready.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::values::parse_duration;
use crate::SpecError;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    pub max: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_queue: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
}

/// What the autoscaler aims at, per ready instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Requests in flight at once (the mean over the window).
    InFlight(f64),
    /// Requests a second.
    Rps(f64),
    /// The 99th percentile of the time to a response head.
    P99(Duration),
}

impl Target {
    /// The name as written in the file.
    pub fn name(&self) -> &'static str {
        match self {
            Target::InFlight(_) => "in_flight",
            Target::Rps(_) => "rps",
            Target::P99(_) => "p99",
        }
    }

    /// The target as a number in its unit (p99: milliseconds).
    pub fn value(&self) -> f64 {
        match self {
            Target::InFlight(v) | Target::Rps(v) => *v,
            Target::P99(d) => d.as_secs_f64() * 1000.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleSpec {
    pub min: u32,
    pub max: u32,
    /// At least one.
    pub targets: Vec<Target>,
    /// What a measurement averages over (a burst is measured over its
    /// last tenth, at least a second).
    pub window: Duration,
    /// A scale-down takes the highest count asked for over this long.
    pub scale_down_window: Duration,
    /// With `min = 0`: no request for this long, and the service has none.
    pub scale_to_zero_after: Duration,
    /// How long the proxy holds a request while the first instance starts.
    pub cold_start_timeout: Duration,
    /// How many requests it holds at most, per proxy.
    pub cold_start_queue: u32,
}

impl AutoscaleSpec {
    /// Whether the service may have no instance at all.
    pub fn scales_to_zero(&self) -> bool {
        self.min == 0
    }
}

/// A service's disruption budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    MinAvailable(u32),
    MaxUnavailable(u32),
}

impl Budget {
    /// The fewest ready instances a voluntary disruption may leave of
    /// `replicas`.
    pub fn floor(&self, replicas: u32) -> u32 {
        match *self {
            Budget::MinAvailable(n) => n.min(replicas),
            Budget::MaxUnavailable(n) => replicas.saturating_sub(n),
        }
    }
}

/// Validates `[autoscale]`; `replicas` is the file's own (the count to
/// start from), `max_replicas` the most a service may have.
pub fn validate(
    a: &AutoscaleSection,
    replicas: Option<u32>,
    max_replicas: u32,
    errors: &mut Vec<SpecError>,
) -> AutoscaleSpec {
    let mut err = |field: &str, message: String| errors.push(SpecError { field: field.into(), message });
    let min = a.min.unwrap_or(1);
    if a.max == 0 || a.max > max_replicas {
        err("autoscale.max", format!("{} is not accepted; accepted: 1 to {max_replicas}", a.max));
    }
    if min > a.max {
        err("autoscale.min", format!("{min} is above max ({}); accepted: 0 to max", a.max));
    }
    if let Some(r) = replicas.filter(|r| *r < min || *r > a.max) {
        err(
            "replicas",
            format!("{r} is outside [autoscale] min {min} to max {}; with [autoscale] replicas is the count to start from (or leave it out: min)", a.max),
        );
    }
    let mut duration = |field: &str, v: &Option<String>, default: Duration, least: Duration| match v {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) if d < least => {
                err(field, format!("'{s}' is too short; at least {least:?}"));
                default
            }
            Ok(d) => d,
            Err(m) => {
                err(field, m);
                default
            }
        },
    };
    let ms = Duration::from_millis;
    let p99 = a.p99.as_ref().map(|_| duration("autoscale.p99", &a.p99, ms(100), ms(1)));
    let window = duration("autoscale.window", &a.window, Duration::from_secs(30), Duration::from_secs(1));
    let scale_down_window =
        duration("autoscale.scale_down_window", &a.scale_down_window, Duration::from_secs(300), Duration::ZERO);
    let scale_to_zero_after = duration(
        "autoscale.scale_to_zero_after",
        &a.scale_to_zero_after,
        Duration::from_secs(900),
        Duration::from_secs(1),
    );
    let cold_start_timeout =
        duration("autoscale.cold_start_timeout", &a.cold_start_timeout, Duration::from_secs(30), ms(100));
    let mut targets = Vec::new();
    for (name, v) in [("in_flight", a.in_flight), ("rps", a.rps)] {
        match v {
            Some(v) if !(v > 0.0 && v.is_finite()) => {
                errors.push(SpecError {
                    field: format!("autoscale.{name}"),
                    message: format!("{v} is not accepted; a target is a number above 0 (per ready instance)"),
                });
            }
            Some(v) if name == "in_flight" => targets.push(Target::InFlight(v)),
            Some(v) => targets.push(Target::Rps(v)),
            None => {}
        }
    }
    targets.extend(p99.map(Target::P99));
    if a.in_flight.is_none() && a.rps.is_none() && a.p99.is_none() {
        errors.push(SpecError {
            field: "autoscale".into(),
            message: "needs a target per ready instance: in_flight = 8, rps = 100 or p99 = \"200ms\" (one or more)"
                .into(),
        });
    }
    let cold_start_queue = a.cold_start_queue.unwrap_or(1000);
    if cold_start_queue == 0 {
        errors.push(SpecError {
            field: "autoscale.cold_start_queue".into(),
            message: "must be at least 1 (requests a proxy holds while the first instance starts)".into(),
        });
    }
    if min > 0 && (a.scale_to_zero_after.is_some() || a.cold_start_timeout.is_some() || a.cold_start_queue.is_some()) {
        errors.push(SpecError {
            field: "autoscale.min".into(),
            message: "scale_to_zero_after and cold_start_* are for min = 0 (a service that may have no instance)"
                .into(),
        });
    }
    AutoscaleSpec {
        min,
        max: a.max.max(1),
        targets,
        window,
        scale_down_window,
        scale_to_zero_after,
        cold_start_timeout,
        cold_start_queue: cold_start_queue.max(1),
    }
}

/// Validates `[budget]` against the fewest replicas the service may have.
pub fn validate_budget(
    b: &BudgetSection,
    fewest: u32,
    autoscaled: bool,
    errors: &mut Vec<SpecError>,
) -> Option<Budget> {
    let mut err = |field: &str, message: String| errors.push(SpecError { field: field.into(), message });
    match (b.min_available, b.max_unavailable) {
        (Some(_), Some(_)) => {
            err("budget", "set min_available or max_unavailable, not both".into());
            None
        }
        (Some(n), None) if n > fewest => {
            let of = if autoscaled { "[autoscale] min" } else { "replicas" };
            err(
                "budget.min_available",
                format!("{n} is above {of} ({fewest}): no drain could ever proceed; accepted: 0 to {fewest}"),
            );
            None
        }
        (Some(n), None) => Some(Budget::MinAvailable(n)),
        (None, Some(0)) => {
            err("budget.max_unavailable", "must be at least 1 (use min_available to keep every replica)".into());
            None
        }
        (None, Some(n)) => Some(Budget::MaxUnavailable(n)),
        (None, None) => {
            err("budget", "give min_available = N or max_unavailable = N".into());
            None
        }
    }
}
