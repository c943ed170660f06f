//! A small persistent thread pool for the kernels' data-parallel loops: one worker per
//! core besides the calling thread, which takes part; one entry point,
//! [`Pool::parallel_for`] (`f(0)`, ..., `f(n - 1)` on all threads, returning when all
//! have run).
//!
//! Built for many short calls (a decode step makes ~211 matmul calls of 10-200 µs): a
//! call publishes its job with one atomic store and the threads claim task indices with
//! a compare-and-swap; between calls the workers spin for [`SPIN`] (pausing for a few
//! microseconds, then yielding to the OS at each step), then park on a condition
//! variable (a call wakes them only when one sleeps). The caller, its own tasks done,
//! pauses for a few microseconds, then sleeps until the last task ends. A call made while the
//! pool is busy (from another thread, or from inside a task) runs its tasks on the
//! calling thread, in order; results never depend on which thread ran a task.
//!
//! [`global()`] is the process-wide pool the quantized matmul uses (threads: the
//! `QAQ_KERNELS_THREADS` variable, else the available parallelism, or
//! [`init_global`] before first use); other loops of the worker may share it. Decode
//! attention takes the thread's current pool ([`with_current`]): the global one, or
//! one that a benchmark or a test installs for a call ([`with_pool`]).

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
pub const SPIN: Duration = Duration::from_micros(200);

/// Tasks one job can hold (the job word packs them into 16 bits); longer loops are cut
/// into consecutive jobs.
const MAX_TASKS: usize = u16::MAX as usize;

/// The job word: epoch (32 bits) | number of tasks (16) | next unclaimed task (16).
fn pack(epoch: u32, n: usize, next: usize) -> u64 {
    ((epoch as u64) << 32) | ((n as u64) << 16) | next as u64
}

fn epoch_of(w: u64) -> u32 {
    (w >> 32) as u32
}

/// The task function of the current job: a pointer to a `&dyn Fn(usize)` on the caller's
/// stack, valid while the caller waits in [`Pool::parallel_for`].
type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// The current job ([`pack`]).
    job: AtomicU64,
    /// Points to the current job's [`Task`].
    func: AtomicPtr<()>,
    /// Tasks of the current job not yet finished.
    pending: AtomicUsize,
    /// Workers parked (or about to park) on `cv`.
    sleepers: AtomicUsize,
    /// Set when a task of the current job panicked.
    panicked: AtomicBool,
    /// Set while the caller sleeps on `done`, waiting for the job's last task.
    caller_parked: AtomicBool,
    done: Condvar,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Shared {
    /// Claims and runs tasks of job `epoch` until none is left.
    fn run(&self, epoch: u32) {
        loop {
            let w = self.job.load(Ordering::Acquire);
            let (n, next) = ((w >> 16) as u16 as usize, w as u16 as usize);
            if epoch_of(w) != epoch || next >= n {
                return;
            }
            if self.job.compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            // SAFETY: the claim succeeded on the job word of a live job (its epoch and an
            // unclaimed index), so its caller is still inside `parallel_for`, waiting for
            // `pending` to reach 0, which cannot happen before this task is counted
            // below: the `Task` it published (before the job word, read after it with
            // Acquire) is alive.
            let f: Task<'_> = unsafe { *(self.func.load(Ordering::Acquire) as *const Task<'_>) };
            if catch_unwind(AssertUnwindSafe(|| f(next))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 && self.caller_parked.load(Ordering::SeqCst) {
                let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.done.notify_all();
            }
        }
    }
}

/// What the kernels need of a thread pool: run `f(0)`, ..., `f(n - 1)`, each once, on
/// some threads, and return when all have returned. [`Pool`] is the kernels' own; a
/// caller may bring another (e.g. a rayon adapter) to [`crate::qmat::linear_in`].
pub trait ParallelFor: Sync {
    /// Threads that run tasks (the caller's included).
    fn threads(&self) -> usize;
    /// Runs the tasks; returns when every one has returned.
    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync));
}

impl ParallelFor for Pool {
    fn threads(&self) -> usize {
        Pool::threads(self)
    }
    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        Pool::parallel_for(self, n, f)
    }
}

/// A persistent pool of `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// Held by the call in progress.
    call: Mutex<u32>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads).finish()
    }
}

impl Pool {
    /// A pool running tasks on `threads` threads (the caller and `threads - 1` workers;
    /// 0 is taken as 1).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            job: AtomicU64::new(pack(0, 0, 0)),
            func: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            caller_parked: AtomicBool::new(false),
            done: Condvar::new(),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("qaq-kernels-{i}"))
                    .spawn(move || worker(&s))
                    .expect("spawning a kernels pool thread")
            })
            .collect();
        Pool { shared, threads, call: Mutex::new(0), workers }
    }

    /// Threads that run tasks (the caller included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0)`, ..., `f(n - 1)` on the pool's threads and the calling thread, each
    /// exactly once, in no particular order, and returns when all have returned. Runs
    /// them on the calling thread alone when the pool has one thread, when `n` is 1, or
    /// when the pool is busy (a concurrent or nested call). A panicking task panics
    /// here once every task has finished.
    pub fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        let guard = if self.threads > 1 && n > 1 { self.call.try_lock().ok() } else { None };
        let Some(mut epoch) = guard else {
            (0..n).for_each(f);
            return;
        };
        let mut start = 0;
        while start < n {
            let len = (n - start).min(MAX_TASKS);
            let g = |i: usize| f(start + i);
            *epoch = epoch.wrapping_add(1);
            self.job(*epoch, len, &g);
            start += len;
        }
    }

    /// One job of `n <= MAX_TASKS` tasks under the call lock.
    fn job(&self, epoch: u32, n: usize, f: Task<'_>) {
        let s = &*self.shared;
        s.func.store(&f as *const Task<'_> as *mut (), Ordering::Relaxed);
        s.pending.store(n, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.job.store(pack(epoch, n, 0), Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        // The caller's own tasks: a panic must not leave this frame (the workers still
        // use `f`) before every task is done.
        s.run(epoch);
        // The workers' last tasks: a short spin, then sleep until the last one ends (a
        // waiting thread that stays runnable would take CPU time from them on a busy
        // machine).
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_PAUSES {
                std::hint::spin_loop();
                continue;
            }
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.caller_parked.store(true, Ordering::SeqCst);
            while s.pending.load(Ordering::SeqCst) != 0 {
                g = s.done.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.caller_parked.store(false, Ordering::SeqCst);
        }
        if s.panicked.load(Ordering::Relaxed) {
            resume_unwind(Box::new("a task of qaq_kernels::pool::Pool::parallel_for panicked"));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.cv.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A worker: waits for a job with a new epoch (spinning for [`SPIN`], then parked), runs
/// its tasks, repeats until shutdown.
fn worker(s: &Shared) {
    let mut seen = epoch_of(s.job.load(Ordering::Acquire));
    loop {
        let mut idle_since: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            let e = epoch_of(s.job.load(Ordering::Acquire));
            if e != seen {
                seen = e;
                break;
            }
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.saturating_add(1);
            if spins.is_multiple_of(64) && idle_since.get_or_insert_with(Instant::now).elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while epoch_of(s.job.load(Ordering::SeqCst)) == seen && !s.shutdown.load(Ordering::SeqCst) {
                    g = s.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                idle_since = None;
                spins = 0;
                continue;
            }
            pause(spins);
        }
        s.run(seen);
    }
}

/// Busy-waiting step `spins`: a pause instruction for the first [`SPIN_PAUSES`] steps,
/// then a yield to the OS each step (on a machine with more runnable threads than cores
/// a waiting thread then gives its core to the one it waits for).
#[inline]
fn pause(spins: u32) {
    if spins < SPIN_PAUSES {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Pause instructions before a busy wait starts yielding (a few microseconds).
const SPIN_PAUSES: u32 = 1 << 10;

static GLOBAL: OnceLock<Pool> = OnceLock::new();

/// The threads the global pool gets: `QAQ_KERNELS_THREADS` when set to a positive
/// number, else the available parallelism.
fn default_threads() -> usize {
    std::env::var("QAQ_KERNELS_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The process-wide pool (created on first use).
pub fn global() -> &'static Pool {
    GLOBAL.get_or_init(|| Pool::new(default_threads()))
}

/// Creates the global pool with `threads` threads (before its first use); an error when
/// it already exists with another count.
pub fn init_global(threads: usize) -> crate::Result<&'static Pool> {
    let p = GLOBAL.get_or_init(|| Pool::new(threads));
    if p.threads == threads.max(1) {
        Ok(p)
    } else {
        Err(crate::KernelError::Config(format!(
            "the kernels' global pool already runs {} threads; {threads} asked",
            p.threads
        )))
    }
}

/// [`Pool::parallel_for`] on the [`global()`] pool.
pub fn parallel_for(n: usize, f: &(dyn Fn(usize) + Sync)) {
    global().parallel_for(n, f)
}

thread_local! {
    /// The pool [`with_pool`] installed on this thread, or null.
    static INSTALLED: std::cell::Cell<*const Pool> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// Runs `f` with `pool` as this thread's current pool ([`with_current`]): for a
/// benchmark or a test that runs the loops that take the current pool (decode
/// attention) on a given number of threads.
pub fn with_pool<R>(pool: &Pool, f: impl FnOnce() -> R) -> R {
    struct Restore(*const Pool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INSTALLED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(INSTALLED.with(|c| c.replace(pool)));
    f()
}

/// Runs `f` with this thread's current pool: the one [`with_pool`] installed, else
/// [`global()`].
pub fn with_current<R>(f: impl FnOnce(&Pool) -> R) -> R {
    let p = INSTALLED.with(|c| c.get());
    if p.is_null() {
        f(global())
    } else {
        // SAFETY: `with_pool` installed `p` from a borrow that lasts until it returns,
        // and it restores the previous value then (also when unwinding); this call
        // runs inside it.
        f(unsafe { &*p })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_pool_is_the_installed_one_inside_with_pool_only() {
        let three = Pool::new(3);
        let threads = || with_current(|p| p.threads());
        let outside = threads();
        assert_eq!(outside, global().threads());
        assert_eq!(with_pool(&three, threads), 3);
        assert_eq!(with_pool(&three, || with_pool(&Pool::new(1), threads)), 1);
        assert_eq!(threads(), outside);
        // Restored when `f` panics, too.
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| with_pool(&three, || panic!("in f"))));
        assert!(r.is_err());
        assert_eq!(threads(), outside);
    }

    #[test]
    fn every_task_runs_once() {
        for threads in [1, 2, 3] {
            let p = Pool::new(threads);
            for n in [0, 1, 2, 5, 100, 70_000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                p.parallel_for(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads {threads} n {n}");
            }
        }
    }

    #[test]
    fn nested_and_concurrent_calls_complete() {
        let p = Arc::new(Pool::new(2));
        let total = AtomicUsize::new(0);
        p.parallel_for(4, &|_| {
            p.parallel_for(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let p = Arc::clone(&p);
                std::thread::spawn(move || {
                    let c = AtomicUsize::new(0);
                    for _ in 0..200 {
                        p.parallel_for(8, &|_| {
                            c.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    c.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 1600);
        }
    }

    #[test]
    fn parked_workers_wake_up() {
        let p = Pool::new(2);
        for _ in 0..3 {
            std::thread::sleep(SPIN * 3);
            let c = AtomicUsize::new(0);
            p.parallel_for(64, &|_| {
                c.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(c.load(Ordering::Relaxed), 64);
        }
    }

    #[test]
    fn a_panicking_task_panics_the_call_and_the_pool_survives() {
        let p = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            p.parallel_for(16, &|i| {
                if i == 7 {
                    panic!("task 7");
                }
            })
        }));
        assert!(r.is_err());
        let c = AtomicUsize::new(0);
        p.parallel_for(16, &|_| {
            c.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(c.load(Ordering::Relaxed), 16);
    }
}
