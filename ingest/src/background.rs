//! Background threads (the recorder, the ClickHouse shipper) share cores with the proxy's
//! workers. When one of them wakes with a batch, the kernel lets it run out its time slice
//! (EEVDF protects the running task's slice; CFS its wakeup granularity) while a worker that
//! just got a request waits: at 5,000 req/s the recorder's 10 ms batches held the worker
//! long enough to double the p99 of the whole proxy. `Yielder` bounds that hold: between
//! units of work it offers the core to any runnable thread once per `SLICE` of work.
//!
//! Offering the core is only right while the workers are idle most of the time. When a
//! yield comes back only after `CONTENDED`, the core is saturated: each further yield
//! would hand the workers a whole slice, the background thread would get a small fraction
//! of its fair share, and the recorder would fall behind and drop records (it did, at
//! 40,000 req/s in a closed loop). From then on the `Yielder` keeps its fair share and
//! stops yielding.
//!
//! Why not `SCHED_IDLE` for these threads: it measured the same at 5,000 req/s, but it is
//! that starvation made permanent, and an unprivileged thread cannot leave `SCHED_IDLE`.
//!
//! Work that is sampled and may fall behind without losing a record (the drift engine)
//! runs at the lowest priority instead (`background_priority`): one of its batches can
//! hold the core for milliseconds (a detector re-sorting a 5,000-call window), too long a
//! unit for `Yielder`, and after 100 ms asleep its deadline comes before a worker's, so a
//! worker woken meanwhile waited behind it (up to 0.49 ms in a scheduler trace at 5,000
//! req/s). At nice 19 a waking worker takes the core at once; when the core is saturated
//! the engine's bounded queue drops its sample, which the engine reports.

use std::time::{Duration, Instant};

/// Puts the calling thread at nice 19, the lowest priority an unprivileged thread may take,
/// for work that must never delay a call. Best effort: elsewhere than Linux, or when the
/// call fails, the thread keeps its priority and a debug line says why.
pub fn background_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), 19) {
            tracing::debug!(error = %e, "cannot lower this thread's priority");
        }
    }
}

/// Work a background thread does before it offers the core.
pub const SLICE: Duration = Duration::from_micros(20);

/// A yield that takes this long means the core is saturated. A worker serves a call in
/// tens of microseconds; a saturated one runs out its whole slice (about 1.5 ms on 2 cores).
pub const CONTENDED: Duration = Duration::from_micros(500);

/// Offers the core between units of a background thread's work; one per batch.
#[derive(Debug)]
pub struct Yielder {
    since: Instant,
    /// Yielding stopped: a yield found the core saturated, or the owner is behind.
    off: bool,
}

impl Yielder {
    pub fn new() -> Self {
        Self { since: Instant::now(), off: false }
    }

    /// A `Yielder` that never yields: for work that is already behind.
    pub fn off() -> Self {
        Self { since: Instant::now(), off: true }
    }

    /// Call between units of work. When `SLICE` has passed since the last yield (or since
    /// creation), yields: a no-op syscall when nothing else wants the core.
    pub fn tick(&mut self) {
        self.tick_with(std::thread::yield_now)
    }

    fn tick_with(&mut self, give: impl FnOnce()) {
        if self.off {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.since) < SLICE {
            return;
        }
        give();
        self.since = Instant::now();
        self.off = self.since.duration_since(now) >= CONTENDED;
    }

    /// Whether this `Yielder` still yields.
    pub fn yielding(&self) -> bool {
        !self.off
    }
}

impl Default for Yielder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after_slice(y: &mut Yielder) {
        y.since = Instant::now() - SLICE;
    }

    fn before_slice(y: &mut Yielder) {
        // In the future: a preempted test cannot make a slice pass by accident.
        y.since = Instant::now() + Duration::from_secs(60);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn background_priority_lowers_only_the_calling_thread() {
        let own = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let got = std::thread::spawn(|| {
            background_priority();
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(got, 19);
        assert_eq!(rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap(), own);
    }

    #[test]
    fn yields_once_per_slice_of_work() {
        let mut y = Yielder::new();
        let mut gave = 0;
        before_slice(&mut y);
        y.tick_with(|| gave += 1);
        assert_eq!(gave, 0, "no yield before a slice of work");
        after_slice(&mut y);
        y.tick_with(|| gave += 1);
        assert_eq!(gave, 1);
        before_slice(&mut y);
        y.tick_with(|| gave += 1);
        assert_eq!(gave, 1, "none again before the next slice");
    }

    #[test]
    fn a_saturated_core_stops_the_yielding() {
        let mut y = Yielder::new();
        after_slice(&mut y);
        // The core came back only after a worker's whole slice.
        y.tick_with(|| std::thread::sleep(CONTENDED * 2));
        assert!(!y.yielding());
        let mut gave = 0;
        for _ in 0..3 {
            after_slice(&mut y);
            y.tick_with(|| gave += 1);
        }
        assert_eq!(gave, 0, "no more yields once the core is saturated");
    }

    #[test]
    fn an_off_yielder_never_yields() {
        let mut y = Yielder::off();
        after_slice(&mut y);
        let mut gave = 0;
        y.tick_with(|| gave += 1);
        assert_eq!(gave, 0);
    }
}
