//! The parking lot of a worker: idle keep-alive connections with no task,
//! no buffer and no timer of their own.
//!
//! A connection quiet after its exchange (the codec's buffers already
//! given back) is parked here: its socket, and what resumes it, in a slot.
//! The socket's read readiness wakes a waker that names the slot; one
//! watcher task per worker then hands the connection, as it was, to a new
//! task (`Wake::Readable`). Deadlines (the keep-alive limit) are kept in
//! one queue per lot, in the order connections were parked, each with the
//! same limit: an expired connection is resumed to close itself
//! (`Wake::Expired`, so a TLS one still says close_notify). A stop (drain)
//! resumes every parked connection (`Wake::Stop`), to answer a request
//! already on its way or close after a short wait, as an unparked one.
//!
//! What a parked connection costs: its socket (and the runtime's
//! registration of it), the slot, the resume closure and the waker.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake as StdWake, Waker};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::conn::Conn;
use halo_model::lock::LockExt;

/// Why a parked connection is handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Bytes (or an end) arrived: read the next request.
    Readable,
    /// The keep-alive limit passed with nothing read: close.
    Expired,
    /// The proxy is draining.
    Stop,
}

/// What takes a connection back (it spawns the task that serves it).
pub type Resume = Box<dyn FnOnce(Conn, Wake) + Send>;

/// One worker's parked connections.
pub struct Lot {
    slots: Mutex<Slots>,
    woken: Arc<Woken>,
}

#[derive(Default)]
struct Slots {
    parked: Vec<Option<Parked>>,
    free: Vec<usize>,
    /// Slot, its generation and when it expires, oldest first.
    deadlines: VecDeque<(Instant, usize, u32)>,
    /// Bumped every time a slot is taken, so a stale wake or deadline for
    /// an earlier tenant of the slot does nothing.
    generation: u32,
    stopping: bool,
}

struct Parked {
    conn: Conn,
    resume: Resume,
    generation: u32,
}

/// Slots whose sockets became readable, and the watcher's bell.
#[derive(Default)]
struct Woken {
    slots: Mutex<Vec<(usize, u32)>>,
    bell: Notify,
}

/// The waker a parked socket holds: rings for its slot.
struct SlotWaker {
    slot: usize,
    generation: u32,
    woken: Arc<Woken>,
}

impl StdWake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.slots.locked().push((self.slot, self.generation));
        self.woken.bell.notify_one();
    }
}

impl Lot {
    /// A lot and its watcher, spawned on the current runtime (the
    /// worker's); the watcher ends when `stop` flips, having handed every
    /// parked connection back (later parks are handed back at once).
    pub fn start(stop: watch::Receiver<bool>) -> Arc<Lot> {
        let lot = Arc::new(Lot { slots: Mutex::new(Slots::default()), woken: Arc::new(Woken::default()) });
        tokio::spawn(watch_lot(lot.clone(), stop));
        lot
    }

    /// Parks `conn` until it is readable, `idle` passes or the proxy stops;
    /// then `resume` gets it back (from the watcher, or at once when it is
    /// readable already or the proxy is stopping).
    pub fn park(&self, mut conn: Conn, idle: Duration, resume: Resume) {
        let mut slots = self.slots.locked();
        if slots.stopping {
            drop(slots);
            return resume(conn, Wake::Stop);
        }
        slots.generation = slots.generation.wrapping_add(1);
        let generation = slots.generation;
        let slot = slots.free.pop().unwrap_or(slots.parked.len());
        let waker = Waker::from(Arc::new(SlotWaker { slot, generation, woken: self.woken.clone() }));
        if conn.poll_readable(&mut Context::from_waker(&waker)).is_ready() {
            // Bytes already: no parking (a new slot number was only looked at).
            if slot < slots.parked.len() {
                slots.free.push(slot);
            }
            drop(slots);
            return resume(conn, Wake::Readable);
        }
        if slot == slots.parked.len() {
            slots.parked.push(None);
        }
        slots.parked[slot] = Some(Parked { conn, resume, generation });
        let first = slots.deadlines.is_empty();
        slots.deadlines.push_back((Instant::now() + idle, slot, generation));
        if first {
            // The watcher sleeps without a deadline: it has one now.
            self.woken.bell.notify_one();
        }
    }

    /// Takes a slot's connection if it is still the `generation` parked.
    fn take(slots: &mut Slots, slot: usize, generation: u32) -> Option<Parked> {
        let entry = slots.parked.get_mut(slot)?;
        if entry.as_ref().is_none_or(|p| p.generation != generation) {
            return None;
        }
        let parked = entry.take();
        slots.free.push(slot);
        parked
    }

    /// Hands back what woke, and what expired by `now`.
    fn sweep(&self, now: Instant) {
        let woken = std::mem::take(&mut *self.woken.slots.locked());
        let mut out = Vec::new();
        {
            let mut slots = self.slots.locked();
            for (slot, generation) in woken {
                if let Some(p) = Lot::take(&mut slots, slot, generation) {
                    out.push((p, Wake::Readable));
                }
            }
            while let Some(&(at, slot, generation)) = slots.deadlines.front() {
                if at > now {
                    break;
                }
                slots.deadlines.pop_front();
                if let Some(p) = Lot::take(&mut slots, slot, generation) {
                    out.push((p, Wake::Expired));
                }
            }
            // Deadlines of connections resumed meanwhile are dropped lazily;
            // keep the queue from growing past what is parked.
            if slots.deadlines.len() > 2 * (slots.parked.len() - slots.free.len()) + 64 {
                let Slots { deadlines, parked, .. } = &mut *slots;
                deadlines.retain(|&(_, s, g)| parked[s].as_ref().is_some_and(|p| p.generation == g));
            }
        }
        for (p, why) in out {
            (p.resume)(p.conn, why);
        }
    }

    /// Hands back everything, for a stop; later parks are handed back at once.
    fn stop_all(&self) {
        let all: Vec<Parked> = {
            let mut slots = self.slots.locked();
            slots.stopping = true;
            slots.deadlines.clear();
            slots.free.clear();
            slots.parked.drain(..).flatten().collect()
        };
        for p in all {
            (p.resume)(p.conn, Wake::Stop);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.slots.locked().deadlines.front().map(|d| d.0)
    }
}

/// The lot's watcher: resumes what woke or expired, and everything on stop.
async fn watch_lot(lot: Arc<Lot>, mut stop: watch::Receiver<bool>) {
    // Past a deadline by at most this much (the deadlines are the
    // keep-alive limit, seconds long): one timer for the whole lot.
    const TICK: Duration = Duration::from_millis(250);
    loop {
        let bell = lot.woken.bell.notified();
        let at =
            lot.next_deadline().map_or(Instant::now() + Duration::from_secs(3600), |d| d.max(Instant::now()) + TICK);
        tokio::select! {
            _ = bell => {}
            _ = tokio::time::sleep_until(at) => {}
            _ = stop.wait_for(|s| *s) => {
                lot.stop_all();
                return;
            }
        }
        lot.sweep(Instant::now());
    }
}
