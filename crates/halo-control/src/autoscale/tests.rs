//! The autoscaler's decisions over recorded and generated series.

use super::*;

fn spec(min: u32, max: u32, targets: Vec<Target>) -> AutoscaleSpec {
    AutoscaleSpec {
        min,
        max,
        targets,
        window: Duration::from_secs(30),
        scale_down_window: Duration::from_secs(60),
        scale_to_zero_after: Duration::from_secs(120),
        cold_start_timeout: Duration::from_secs(30),
        cold_start_queue: 100,
    }
}

/// Runs passes every `every` over `load(t)` (total requests in flight),
/// measured as the mean over the window and over the burst window, new
/// instances ready `start` after they are asked for; the count after each
/// pass.
fn run(
    s: &AutoscaleSpec,
    from: u32,
    every: Duration,
    passes: usize,
    start: Duration,
    load: impl Fn(Duration) -> f64,
) -> Vec<u32> {
    let mut current = from;
    let mut asked: Vec<(Duration, u32)> = Vec::new(); // when each count was set
    let mut past: VecDeque<(Duration, u32)> = VecDeque::new();
    let mut counts = Vec::new();
    let mut seen: VecDeque<(Duration, f64)> = VecDeque::new();
    let mut last_burst: Option<Duration> = None;
    for i in 0..passes {
        let now = every * i as u32;
        // Ready: the count set at least `start` ago, never more than asked.
        let ready = asked.iter().rev().find(|(at, _)| now >= *at + start).map_or(from, |(_, n)| *n).min(current);
        seen.push_back((now, load(now)));
        let mean = |span: Duration| {
            let xs: Vec<f64> = seen.iter().filter(|(at, _)| now - *at <= span).map(|(_, l)| *l).collect();
            let l = xs.iter().sum::<f64>() / xs.len() as f64;
            Load { in_flight: l, rps: l * 100.0, p99: Some(0.01) }
        };
        let sig = Signals {
            ready,
            load: mean(s.window),
            burst: mean(burst_window(s.window)),
            bursting: last_burst.is_some_and(|at| now - at < s.window),
            waiting: 0,
            idle_for: Duration::ZERO,
        };
        let rec = recommend(s, current, &sig);
        if rec.burst {
            last_burst = Some(now);
        }
        past.retain(|(at, _)| now - *at <= s.scale_down_window);
        let p: Vec<(Duration, u32)> = past.iter().map(|(at, n)| (now - *at, *n)).collect();
        if let Some(c) = decide(s, current, &rec, &p, now + s.scale_down_window) {
            assert!(c.to <= current.max(1) * 2, "more than doubled: {current} -> {}", c.to);
            current = c.to;
            asked.push((now, current));
        }
        past.push_back((now, rec.replicas));
        counts.push(current);
    }
    counts
}

fn changes(counts: &[u32]) -> usize {
    counts.windows(2).filter(|w| w[0] != w[1]).count()
}

#[test]
fn a_step_up_doubles_per_pass_to_what_the_load_needs_and_a_drop_waits_for_the_window() {
    let s = spec(1, 20, vec![Target::InFlight(8.0)]);
    let step = Duration::from_secs(10);
    let drop = Duration::from_secs(40);
    let every = Duration::from_millis(500);
    // 8 in flight (one instance's worth), 40 from 10 s, 8 again from 40 s.
    let load = |t: Duration| if t >= step && t < drop { 40.0 } else { 8.0 };
    let counts = run(&s, 1, every, 400, Duration::from_secs(3), load);
    let at = |t: Duration| counts[(t.as_millis() / every.as_millis()) as usize];
    assert_eq!(at(Duration::from_millis(9500)), 1);
    // The burst: 5 within 3 s of the step (demand, not the ready count,
    // decides), and no further.
    assert_eq!(at(Duration::from_secs(13)), 5, "{counts:?}");
    assert!(counts.iter().all(|n| *n <= 5), "{counts:?}");
    assert_eq!(at(Duration::from_secs(39)), 5);
    // The drop: held for the whole scale_down_window, then down.
    assert_eq!(at(Duration::from_secs(99)), 5, "{counts:?}");
    assert_eq!(at(Duration::from_secs(135)), 1, "{counts:?}");
}

#[test]
fn a_load_swinging_twenty_percent_around_the_target_scales_once_for_ten_minutes() {
    let s = spec(1, 50, vec![Target::InFlight(10.0)]);
    let every = Duration::from_millis(500);
    // 4 instances' worth, +-20% over a 30 s period, for 10 minutes.
    let load = |t: Duration| 40.0 * (1.0 + 0.2 * (t.as_secs_f64() * std::f64::consts::TAU / 30.0).sin());
    let counts = run(&s, 4, every, 1200, Duration::from_secs(2), load);
    assert!(changes(&counts) <= 1, "{} changes: {counts:?}", changes(&counts));
    // The same swing in a square wave with short stalls: 200 ms of three
    // times the load twice a minute (what a paused process makes of the
    // mean), in the half-second pass that holds them.
    let stalls = |t: Duration| {
        let swing = if t.as_secs() % 30 < 15 { 48.0 } else { 32.0 };
        if t.as_millis() % 30_000 == 20_000 {
            swing * (1.0 + 2.0 * 0.2 / 0.5)
        } else {
            swing
        }
    };
    let counts = run(&s, 4, every, 1200, Duration::from_secs(2), stalls);
    assert!(changes(&counts) <= 1, "{} changes: {counts:?}", changes(&counts));
}

#[test]
fn within_the_tolerance_nothing_changes() {
    let s = spec(1, 10, vec![Target::Rps(100.0)]);
    for rps in [1850.0, 2000.0, 2150.0] {
        let sig = Signals { ready: 20, load: Load { rps, ..Load::default() }, ..Signals::default() };
        let rec = recommend(&AutoscaleSpec { max: 40, ..s.clone() }, 20, &sig);
        assert_eq!(rec.replicas, 20, "at {rps}: {}", rec.reason);
    }
}

#[test]
fn the_highest_target_wins_and_the_reason_names_it() {
    let s = spec(1, 10, vec![Target::InFlight(8.0), Target::Rps(100.0), Target::P99(Duration::from_millis(50))]);
    let load = Load { in_flight: 10.0, rps: 600.0, p99: Some(0.04) };
    let sig = Signals { ready: 2, load: load.clone(), burst: load, ..Signals::default() };
    let rec = recommend(&s, 2, &sig);
    assert_eq!(rec.replicas, 6);
    assert_eq!(rec.reason, "rps 300.0 per instance > 100");
    let c = decide(&s, 2, &rec, &[], Duration::ZERO).unwrap();
    assert_eq!(c, Change { to: 4, reason: "rps 300.0 per instance > 100".into() }, "at most doubled");
    let p99 = Signals { ready: 3, load: Load { in_flight: 3.0, rps: 30.0, p99: Some(0.1) }, ..Signals::default() };
    let rec = recommend(&s, 3, &p99);
    assert_eq!((rec.replicas, rec.reason.as_str()), (6, "p99 100.0ms per instance > 50ms"));
    assert_eq!(rec.measured.len(), 3);
    assert_eq!(rec.measured[2].value, Some(100.0));
}

#[test]
fn a_new_leader_measures_a_whole_window_before_it_scales_down() {
    let s = spec(1, 10, vec![Target::InFlight(8.0)]);
    let sig = Signals { ready: 6, load: Load { in_flight: 8.0, ..Load::default() }, ..Signals::default() };
    let rec = recommend(&s, 6, &sig);
    assert_eq!(rec.replicas, 1);
    assert_eq!(decide(&s, 6, &rec, &[], Duration::from_secs(30)), None);
    let c = decide(&s, 6, &rec, &[(Duration::from_secs(50), 3)], Duration::from_secs(60)).unwrap();
    assert_eq!(c.to, 3, "the highest ask of the window");
    assert!(c.reason.ends_with("for 60s (scale_down_window)"), "{}", c.reason);
}

#[test]
fn from_zero_on_a_held_request_and_back_to_zero_when_idle() {
    let s = spec(0, 4, vec![Target::InFlight(8.0)]);
    let idle = Signals { ready: 0, idle_for: Duration::from_secs(5), ..Signals::default() };
    // At zero and quiet (not yet scale_to_zero_after): stays at zero.
    assert_eq!(decide(&s, 0, &recommend(&s, 0, &idle), &[], Duration::ZERO), None);
    let held = Signals { waiting: 3, ..idle.clone() };
    let rec = recommend(&s, 0, &held);
    assert_eq!(rec.reason, "3 requests waiting for a first instance");
    assert_eq!(decide(&s, 0, &rec, &[], Duration::ZERO).map(|c| c.to), Some(1));
    // One instance, its first requests answered, then quiet: kept until
    // scale_to_zero_after, whatever the scale-down window says.
    let quiet = Signals { ready: 1, idle_for: Duration::from_secs(119), ..Signals::default() };
    assert_eq!(recommend(&s, 1, &quiet).replicas, 1);
    // (The window still holds the last requests: they ask for nothing.)
    let gone = Signals {
        idle_for: Duration::from_secs(120),
        load: Load { in_flight: 0.001, rps: 0.05, p99: Some(0.02) },
        ..quiet
    };
    let rec = recommend(&s, 1, &gone);
    assert_eq!(rec.replicas, 0);
    assert_eq!(decide(&s, 1, &rec, &[(Duration::from_secs(1), 1)], Duration::ZERO).map(|c| c.to), Some(0));
}

#[test]
fn counts_outside_new_bounds_move_into_them() {
    let s = spec(2, 5, vec![Target::InFlight(8.0)]);
    let rec = Recommendation { replicas: 5, reason: String::new(), measured: Vec::new(), burst: false };
    assert_eq!(decide(&s, 9, &rec, &[], Duration::ZERO).unwrap(), Change { to: 5, reason: "bounds are 2 to 5".into() });
    assert_eq!(decide(&s, 1, &rec, &[], Duration::ZERO).unwrap().to, 2);
}

#[test]
fn a_tally_keeps_growing_through_a_node_restart() {
    let c = |requests, waiting| Counters { requests, waiting, ..Counters::default() };
    let mut t = Tally::default();
    t.update(&BTreeMap::from([("a".to_string(), c(100, 0)), ("b".to_string(), c(50, 2))]));
    assert_eq!((t.total.requests, t.total.waiting), (150, 2));
    t.update(&BTreeMap::from([("a".to_string(), c(130, 0)), ("b".to_string(), c(5, 0))]));
    assert_eq!((t.total.requests, t.total.waiting), (185, 0), "b restarted: its 5 count from zero");
}

#[test]
fn rates_follow_publications_not_the_leaders_passes() {
    // One node publishes once a second: 100 requests a second, 20 ms each
    // (2 in flight). The leader looks when a publication arrives (its view
    // changed) and every 300 ms. Every pass measures the same, not one
    // publication too many or too few over the burst window.
    let t0 = Instant::now();
    let mut f = Follow::new(t0);
    let window = Duration::from_secs(10);
    let published = |secs: u64| Counters {
        requests: secs * 100,
        latency_sum_us: secs * 100 * 20_000,
        latency: vec![0, 0, 0, 0, 0, secs * 100],
        ..Counters::default()
    };
    let mut rates = Vec::new();
    // Passes (ms): every 300, and 2 ms after each publication.
    let mut passes: Vec<u64> = (0..60).map(|p| p * 300).chain((1..18).map(|s| s * 1000 + 2)).collect();
    passes.sort();
    for ms in passes {
        let now = t0 + Duration::from_millis(ms);
        let secs = ms / 1000;
        f.tally.update(&BTreeMap::from([("n1".to_string(), published(secs))]));
        let s = f.signals(window, 1, now);
        if ms >= 3000 {
            rates.push((ms, s.burst.rps, s.burst.in_flight, s.load.rps));
        }
    }
    for (pass, burst, in_flight, load) in &rates {
        assert!((99.0..=101.0).contains(burst), "pass {pass}: {burst} requests/s over the burst window");
        assert!((1.98..=2.02).contains(in_flight), "pass {pass}: {in_flight} in flight");
        assert!((99.0..=101.0).contains(load), "pass {pass}: {load} requests/s over the window");
    }
    // Publications stop (no traffic): the rates decay to nothing.
    let stopped = t0 + Duration::from_millis(17_700);
    let s = f.signals(window, 1, stopped + Duration::from_secs(5));
    assert!(s.burst.rps == 0.0 || s.burst.rps < 5.0, "{:?}", s.burst);
    assert!(s.load.rps < 70.0, "{:?}", s.load);
}
