//! The rollout's decisions in memory: table cases and a property test,
//! as the scheduler's.

use std::sync::Arc;

use super::*;
use crate::keys::NodeStats;
use crate::state::Revisioned;

const RELEASE: &str = "[release]\nstrategy = \"canary\"\n\
    steps = [{ weight = 10, pause = \"1m\" }, { weight = 50, pause = \"1m\" }]\n\
    progress_deadline = \"5m\"\n\
    analysis = { interval = \"10s\", min_requests = 10, max_error_rate = 0.05, failure_limit = 2 }\n";

fn svc(release: &str) -> Svc {
    let text = |cmd: &str| format!("name = \"web\"\nreplicas = 4\n[run]\ncommand = \"{cmd}\"\n{release}");
    let (sf, ss) = halo_model::parse_service("stable", &text("v1")).unwrap();
    let (cf, cs) = halo_model::parse_service("canary", &text("v2")).unwrap();
    let record = ServiceRecord {
        spec: cf.to_toml(),
        restart_generation: 0,
        stable: Some(StableRecord { spec: sf.to_toml(), restart_generation: 0 }),
    };
    Svc {
        revision: 7,
        template: ServiceRecord::template(&cf, 0),
        record,
        file: cf,
        spec: Arc::new(cs),
        stable: Some(Revisioned { template: ServiceRecord::template(&sf, 0), spec: Arc::new(ss) }),
    }
}

/// Every node's counters: canary and stable requests and failures so far.
fn stats(canary: (u64, u64), stable: (u64, u64)) -> BTreeMap<String, NodeStats> {
    let c = |(requests, failed)| Counters { requests, failed, ..Counters::default() };
    let upstreams = BTreeMap::from([("web.canary".to_string(), c(canary)), ("web".to_string(), c(stable))]);
    BTreeMap::from([("n1".to_string(), NodeStats { upstreams })])
}

/// A clock that starts at a fixed point and moves only when told.
struct Clock {
    start: Instant,
    elapsed: Duration,
}

impl Clock {
    fn new() -> Clock {
        Clock { start: Instant::now(), elapsed: Duration::ZERO }
    }
    fn now(&self) -> Now {
        Now { ms: 1_000_000 + self.elapsed.as_millis() as u64, at: self.start + self.elapsed }
    }
    fn pass(&mut self, d: Duration) {
        self.elapsed += d;
    }
}

/// One rollout driven pass by pass, its record kept as the store would.
struct Run {
    svc: Svc,
    record: Option<RolloutRecord>,
    window: Option<Window>,
    clock: Clock,
    /// The service record written by a finish.
    finished: Option<ServiceRecord>,
    events: Vec<(Level, EventKind, String)>,
}

impl Run {
    fn new(release: &str) -> Run {
        Run { svc: svc(release), record: None, window: None, clock: Clock::new(), finished: None, events: Vec::new() }
    }

    fn pass(&mut self, command: Option<RolloutCommand>, ready: usize, stats: &BTreeMap<String, NodeStats>) -> Write {
        let c = Canary { name: "web", svc: &self.svc, record: self.record.as_ref(), command, ready, stats, token: 5 };
        let d = decide(&c, &mut self.window, self.clock.now());
        self.events.extend(d.events.clone());
        match &d.write {
            Write::Nothing => {}
            Write::Record { next, .. } => self.record = Some(next.clone()),
            Write::Finish { next, service } => {
                self.record = Some(next.clone());
                self.finished = Some(service.clone());
            }
        }
        d.write
    }

    fn rec(&self) -> &RolloutRecord {
        self.record.as_ref().expect("a rollout record")
    }
}

#[test]
fn a_canary_begins_waits_for_a_ready_instance_and_rolls_back_past_the_deadline() {
    let mut r = Run::new(RELEASE);
    let s = stats((0, 0), (0, 0));
    assert!(matches!(r.pass(None, 0, &s), Write::Record { consume_command: false, .. }));
    assert_eq!((r.rec().state, r.rec().step, r.rec().token), (RolloutState::Progressing, 0, 5));
    assert_eq!(r.rec().stable_template, r.svc.stable.as_ref().unwrap().template);
    // Not ready, within the deadline: nothing to write.
    r.clock.pass(Duration::from_secs(299));
    assert_eq!(r.pass(None, 0, &s), Write::Nothing);
    r.clock.pass(Duration::from_secs(2));
    assert!(matches!(r.pass(None, 0, &s), Write::Finish { .. }));
    assert_eq!(r.rec().state, RolloutState::RolledBack);
    assert!(r.rec().reason.contains("progress_deadline"), "{}", r.rec().reason);
    let back = r.finished.as_ref().unwrap();
    assert_eq!(back.spec, r.svc.record.stable.as_ref().unwrap().spec, "the stable revision is the spec again");
    assert!(back.stable.is_none());
    assert!(matches!(r.events.last(), Some((Level::Warning, EventKind::RolledBack, _))));
}

#[test]
fn passing_windows_step_through_and_promote_after_each_pause() {
    let mut r = Run::new(RELEASE);
    let mut served = (0, 0);
    r.pass(None, 1, &stats(served, served));
    // Each pass 10 s later, 100 more canary requests, none failed.
    for _ in 0..40 {
        r.clock.pass(Duration::from_secs(10));
        served.0 += 100;
        if let Write::Finish { .. } = r.pass(None, 1, &stats(served, (served.0 * 9, 0))) {
            break;
        }
    }
    assert_eq!(r.rec().state, RolloutState::Promoted, "{}", r.rec().reason);
    assert_eq!(r.rec().step, 1);
    assert_eq!(r.rec().failed_windows, 0);
    let promoted = r.finished.as_ref().unwrap();
    assert_eq!(promoted.spec, r.svc.record.spec, "the canary's spec stays");
    assert!(promoted.stable.is_none());
    // Two steps of a 1m pause each, judged every 10 s.
    let took = Duration::from_millis(r.rec().step_started_ms - r.rec().started_ms);
    assert!(took >= Duration::from_secs(60), "{took:?}");
}

#[test]
fn failing_windows_up_to_the_limit_roll_back_and_too_few_requests_hold() {
    let mut r = Run::new(RELEASE);
    r.pass(None, 1, &stats((0, 0), (0, 0)));
    // A window of 5 requests: too few, held.
    r.clock.pass(Duration::from_secs(1));
    r.pass(None, 1, &stats((0, 0), (0, 0)));
    r.clock.pass(Duration::from_secs(10));
    r.pass(None, 1, &stats((5, 0), (50, 0)));
    assert_eq!(r.rec().windows.last().unwrap().verdict, Verdict::Hold);
    assert!(r.rec().reason.starts_with("holding"), "{}", r.rec().reason);
    // 20% failed: above 5%, twice.
    r.clock.pass(Duration::from_secs(10));
    r.pass(None, 1, &stats((105, 20), (150, 0)));
    assert_eq!((r.rec().state, r.rec().failed_windows), (RolloutState::Progressing, 1));
    r.clock.pass(Duration::from_secs(10));
    assert!(matches!(r.pass(None, 1, &stats((205, 40), (250, 0))), Write::Finish { .. }));
    assert_eq!((r.rec().state, r.rec().failed_windows), (RolloutState::RolledBack, 2));
    assert!(r.rec().reason.contains("failure_limit 2"), "{}", r.rec().reason);
    let warnings = r.events.iter().filter(|(l, k, _)| *l == Level::Warning && *k == EventKind::Rollout).count();
    assert_eq!(warnings, 2, "{:?}", r.events);
}

#[test]
fn operators_pause_resume_promote_and_abort() {
    let s = stats((0, 0), (0, 0));
    let mut r = Run::new(RELEASE);
    r.pass(None, 1, &s);
    assert!(matches!(r.pass(Some(RolloutCommand::Pause), 1, &s), Write::Record { consume_command: true, .. }));
    assert_eq!(r.rec().state, RolloutState::Paused);
    // Paused: time passes, nothing moves, even past the deadline.
    r.clock.pass(Duration::from_secs(3600));
    assert_eq!(r.pass(None, 0, &s), Write::Nothing);
    r.pass(Some(RolloutCommand::Resume), 1, &s);
    assert_eq!(r.rec().state, RolloutState::Progressing);
    assert_eq!(r.rec().step_started_ms, r.clock.now().ms, "the pause counts again from the resume");
    assert!(matches!(r.pass(Some(RolloutCommand::Promote), 1, &s), Write::Finish { .. }));
    assert_eq!(r.rec().state, RolloutState::Promoted);

    let mut r = Run::new(RELEASE);
    r.pass(None, 1, &s);
    r.pass(Some(RolloutCommand::Abort), 1, &s);
    assert_eq!(r.rec().state, RolloutState::Aborted);
    assert_eq!(r.finished.as_ref().unwrap().spec, r.svc.record.stable.as_ref().unwrap().spec);
}

#[test]
fn blue_green_switches_once_the_whole_new_set_is_ready_then_drops_the_old_after_the_delay() {
    let release = "[release]\nstrategy = \"blue_green\"\nscale_down_delay = \"30s\"\n";
    let s = stats((0, 0), (0, 0));
    let mut r = Run::new(release);
    r.pass(None, 0, &s);
    r.pass(None, 3, &s);
    assert_eq!(r.rec().step, 0);
    assert!(r.rec().reason.contains("3 of 4 ready"), "{}", r.rec().reason);
    r.pass(None, 4, &s);
    assert_eq!(r.rec().step, 1, "{}", r.rec().reason);
    r.clock.pass(Duration::from_secs(29));
    assert!(!matches!(r.pass(None, 4, &s), Write::Finish { .. }));
    r.clock.pass(Duration::from_secs(1));
    assert!(matches!(r.pass(None, 4, &s), Write::Finish { .. }));
    assert_eq!(r.rec().state, RolloutState::Promoted);
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Whatever the traffic, readiness, commands and timing: a rollout ends
/// once and stays ended, its step stays within the release's steps, its
/// failures never pass the limit while it runs, every record carries the
/// leader's token, windows kept are bounded, and a promotion keeps the
/// canary's spec while every rollback restores the stable one.
#[test]
fn property_a_rollout_ends_once_within_its_steps_and_limits() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut ends: BTreeMap<String, u32> = BTreeMap::new();
    for case in 0..300 {
        let mut r = Run::new(RELEASE);
        let (mut canary, mut stable) = ((0u64, 0u64), (0u64, 0u64));
        for _ in 0..200 {
            r.clock.pass(Duration::from_millis(rng.below(20_000)));
            let n = rng.below(200);
            canary.0 += n;
            canary.1 += if rng.below(10) == 0 { n / 2 } else { 0 };
            stable.0 += rng.below(500);
            let command = match rng.below(40) {
                0 => Some(RolloutCommand::Pause),
                1 => Some(RolloutCommand::Resume),
                2 if rng.below(4) == 0 => Some(RolloutCommand::Abort),
                3 if rng.below(4) == 0 => Some(RolloutCommand::Promote),
                _ => None,
            };
            let ready = rng.below(3) as usize;
            let write = r.pass(command, ready, &stats(canary, stable));
            let rec = r.rec().clone();
            assert_eq!(rec.token, 5);
            assert!(rec.step < 2, "case {case}: step {}", rec.step);
            assert!(rec.windows.len() <= KEEP_WINDOWS);
            match write {
                Write::Finish { service, .. } => {
                    assert!(!rec.state.active());
                    let stable_spec = &r.svc.record.stable.as_ref().unwrap().spec;
                    match rec.state {
                        RolloutState::Promoted => assert_eq!(&service.spec, &r.svc.record.spec),
                        _ => assert_eq!(&service.spec, stable_spec, "case {case}: {:?}", rec.state),
                    }
                    *ends.entry(format!("{:?}", rec.state)).or_insert(0) += 1;
                    break;
                }
                _ => {
                    assert!(rec.state.active(), "case {case}");
                    assert!(
                        rec.failed_windows < 2,
                        "case {case}: {} failed windows, still running",
                        rec.failed_windows
                    );
                }
            }
        }
    }
    // Every ending was reached: the cases explore the rollout.
    for state in ["Promoted", "RolledBack", "Aborted"] {
        assert!(ends.get(state).is_some_and(|n| *n > 0), "no case ended {state}: {ends:?}");
    }
}
