//! Background threads (the recorder, the ClickHouse shipper) share cores with the proxy's
//! workers. When one of them wakes with a batch, the kernel lets it run out its time slice
//! (EEVDF protects the running task's slice; CFS its wakeup granularity) while a worker that
//! just got a request waits: at 5,000 req/s the recorder's 10 ms batches held the worker
//! long enough to double the p99 of the whole proxy. `Yielder` bounds that hold: between
//! units of work it offers the core to any runnable thread once per `SLICE` of work.
//!
//! Why not `SCHED_IDLE` for these threads: it measured the same, but an unprivileged thread
//! cannot leave `SCHED_IDLE` again, so a saturated proxy would starve its own recorder and
//! drop the very records that show the overload. A yield keeps the thread's fair share.

use std::time::{Duration, Instant};

/// Work a background thread does before it offers the core.
pub const SLICE: Duration = Duration::from_micros(20);

#[derive(Debug)]
pub struct Yielder {
    since: Instant,
}

impl Yielder {
    pub fn new() -> Self {
        Self { since: Instant::now() }
    }

    /// Call between units of work. When `SLICE` has passed since the last yield (or since
    /// creation), yields: a no-op syscall when nothing else wants the core.
    pub fn tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.since) >= SLICE {
            std::thread::yield_now();
            self.since = Instant::now();
        }
    }
}

impl Default for Yielder {
    fn default() -> Self {
        Self::new()
    }
}
