//! The request path's threads: one single-threaded tokio runtime per worker, each with an
//! upstream connection pool of its own. The listener hands every accepted connection to the
//! worker with the fewest open connections, and the connection stays there: its requests,
//! their upstream connections and the tap bodies all run on one thread.
//!
//! Design notes
//! - Why not tokio's multi-thread scheduler, which the rest of llmtap uses: a call there is
//!   three tasks (the client connection, hyper's upstream connection, the timer), and every
//!   time one of them is scheduled while another worker is parked, the scheduler wakes that
//!   worker to steal it. `strace` counted 15 syscalls per proxied request, 6 of them futex
//!   and eventfd wake-ups between workers; a forwarding proxy needs about 6 in all.
//! - Balance comes from the hand-off, not from stealing: least open connections first, ties
//!   round-robin. One cross-thread hand-off per connection, none per request.
//! - A timer that becomes the runtime's earliest makes tokio wake its own driver through an
//!   eventfd write, so each call's first-byte and idle timers cost a syscall or two when no
//!   earlier timer exists. Each worker keeps one: a sleep that is re-armed every `anchor`,
//!   shorter than the call timeouts.
//! - The recorder shares the core: a worker's calls wake it when the worker parks, not as
//!   they end, so it never runs ahead of a response the worker has yet to write.
//! - Each worker's pool holds up to `client.pool_max_idle_per_host` idle connections per
//!   upstream, so the process may keep that many times the worker count. The pool's
//!   HTTP/1.1 connections run in the calls' own tasks (`pool`), not in tasks of their own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use llmtap_ingest::export::prometheus::prom::{self, core::Collector, core::Desc, IntGaugeVec, Opts};
use tokio::sync::mpsc;

use crate::forward::Proxy;

/// A connection on its way to a worker: the socket leaves the acceptor's reactor and joins
/// the worker's.
type Handoff = (std::net::TcpStream, std::net::SocketAddr);

/// The running workers. Dropping the senders (`close`) makes each worker stop taking
/// connections and finish what it has within the grace period.
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Handoff>>,
    open: Arc<[AtomicUsize]>,
    next: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts one thread per proxy; each proxy's client pool lives on its thread only.
    pub fn spawn(proxies: Vec<Arc<Proxy>>, grace: Duration, anchor: Duration) -> std::io::Result<Workers> {
        let open: Arc<[AtomicUsize]> = proxies.iter().map(|_| AtomicUsize::new(0)).collect();
        let mut senders = Vec::with_capacity(proxies.len());
        let mut threads = Vec::with_capacity(proxies.len());
        for (i, proxy) in proxies.into_iter().enumerate() {
            // Calls queued to the recorder wake it when the worker goes idle, after the
            // responses are written (`llmtap_ingest::recorder` explains why).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(llmtap_ingest::recorder::wake_deferred)
                .build()?;
            let (tx, rx) = mpsc::unbounded_channel();
            let open = open.clone();
            let thread = std::thread::Builder::new()
                .name(format!("llmtap-w{i}"))
                .spawn(move || rt.block_on(run_worker(proxy, rx, grace, anchor, open, i)))?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(Workers { senders, open, next: 0, threads })
    }

    /// Hands a connection to the least busy worker.
    pub fn dispatch(&mut self, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        let n = self.senders.len();
        let mut best = self.next % n;
        let mut best_open = usize::MAX;
        for k in 0..n {
            let i = (self.next + k) % n;
            let o = self.open[i].load(Ordering::Relaxed);
            if o < best_open {
                best = i;
                best_open = o;
            }
        }
        self.next = best + 1;
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand the connection to a worker");
                return;
            }
        };
        // Counted here, not on arrival, so a burst of accepts spreads over the workers.
        self.open[best].fetch_add(1, Ordering::Relaxed);
        if self.senders[best].send((stream, peer)).is_err() {
            self.open[best].fetch_sub(1, Ordering::Relaxed);
            tracing::error!(worker = best, "worker thread is gone; connection dropped");
        }
    }

    /// `llmtap_worker_connections{worker}`, read from the workers' counters at each scrape.
    pub fn gauge(&self) -> prom::Result<WorkerGauge> {
        let gauge = IntGaugeVec::new(
            Opts::new("llmtap_worker_connections", "Open client connections by proxy worker thread."),
            &["worker"],
        )?;
        Ok(WorkerGauge { open: self.open.clone(), gauge })
    }

    /// Stops handing out connections and waits for every worker to finish its calls (each
    /// within the grace period).
    pub fn close(self) {
        drop(self.senders);
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

pub struct WorkerGauge {
    open: Arc<[AtomicUsize]>,
    gauge: IntGaugeVec,
}

impl Collector for WorkerGauge {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prom::proto::MetricFamily> {
        for (i, n) in self.open.iter().enumerate() {
            self.gauge.with_label_values(&[i.to_string()]).set(n.load(Ordering::Relaxed) as i64);
        }
        self.gauge.collect()
    }
}

/// Decrements the worker's open-connection count when the connection task ends, however.
struct OpenGuard(Arc<[AtomicUsize]>, usize);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_worker(
    proxy: Arc<Proxy>,
    mut rx: mpsc::UnboundedReceiver<Handoff>,
    grace: Duration,
    anchor: Duration,
    open: Arc<[AtomicUsize]>,
    index: usize,
) {
    // Ends when the runtime is dropped. Also closes the pool's stale idle connections, at
    // most once a second.
    let pool = proxy.clone();
    tokio::spawn(async move {
        let mut swept = std::time::Instant::now();
        loop {
            tokio::time::sleep(anchor).await;
            if swept.elapsed() >= Duration::from_secs(1) {
                pool.client.sweep();
                swept = std::time::Instant::now();
            }
        }
    });
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    while let Some((stream, peer)) = rx.recv().await {
        let guard = OpenGuard(open.clone(), index);
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot register the connection");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let svc = service_fn(move |req| proxy.clone().handle(req));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(worker = index, "grace period over; calls still open are cut");
        }
    }
    // Dropping the runtime after this drops the calls still open; each tap body records
    // its call as it goes.
}
