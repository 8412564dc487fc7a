//! `Team`: a few threads kept alive across a decode step, for the few-row
//! matmuls that rayon's fork/join made pay a wake-up each (a one-row gpt2
//! step is 49 matmuls of 50-400 us with serial work between them; ~7% of
//! the step went to rayon's `sched_yield`, docs/benchmarks.md).
//!
//! As ggml's CPU thread pool does: `run` publishes a job by bumping an
//! epoch counter that the workers spin on, runs part 0 itself and spins
//! until the workers' pending count reaches zero (the barrier). Between
//! jobs a worker spins for `SPIN` (the serial work between a step's
//! matmuls and between steps is shorter), then parks, so an idle server's
//! team sleeps; the next `run` unparks it.
//!
//! Hand-written rather than rayon's `scope`/`join`: those are what this
//! replaces for one-row steps (measured in docs/benchmarks.md).
//!
//! One caller at a time: a `run` that finds the team busy (another thread
//! is in one, or a job calls `run` again) runs every part on its own
//! thread, in order. Jobs split work so that each part's result does not
//! depend on which thread runs it, so both give the same bits.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before it parks, and the
/// caller for the workers before it yields its core between checks.
const SPIN: Duration = Duration::from_millis(1);

/// Up to this many rows a step's parallel work runs on the team, above on
/// rayon's pool: with chunks claimed from a counter the team matched or
/// beat rayon on a gpt2 step's 49 q8_0 matmuls from 1 to 16 rows
/// (0.83-1.06x its time, and 1-1.18x from 24 to 64, one noisy run on
/// the shared 2-core EPYC; `examples/decode_profile.rs split`), and
/// between matmuls a team's workers spin where rayon's go to sleep.
pub const MAX_ROWS: usize = 16;

/// A job as the workers see it: a thin pointer to the caller's
/// `&dyn Fn(part)`, valid until every worker has counted itself done.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// A value alone on its cache line, so the caller's epoch writes and the
/// workers' pending writes do not bounce one line between cores.
#[repr(align(64))]
struct Line<T>(T);

/// What the caller and the workers share.
struct Shared {
    /// Bumped once per job; a worker runs the job when it sees a new value.
    epoch: Line<AtomicUsize>,
    /// The current job (`*const Job`).
    job: AtomicPtr<()>,
    /// Workers still running the current job.
    pending: Line<AtomicUsize>,
    /// Per worker: parked (or about to park) waiting for a job.
    sleeping: Vec<AtomicBool>,
    /// A worker's part panicked; the caller panics in turn.
    panicked: AtomicBool,
    stop: AtomicBool,
}

/// `n` threads (the caller and `n - 1` workers) that run jobs of `n`
/// parts; see the module doc.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: Mutex<()>,
}

impl Team {
    /// A team of `threads` (at least 1: the caller alone, no workers).
    pub fn new(threads: usize) -> Self {
        let n = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            epoch: Line(AtomicUsize::new(0)),
            job: AtomicPtr::new(std::ptr::null_mut()),
            pending: Line(AtomicUsize::new(0)),
            sleeping: (0..n).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let workers = (0..n)
            .filter_map(|i| {
                let s = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("gpt-serve-team-{}", i + 1))
                    .spawn(move || worker(&s, i))
                    .ok()
            })
            .collect::<Vec<_>>();
        if workers.len() < n {
            // A thread could not be spawned: a team of the caller alone.
            return Self::new(1);
        }
        Self {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// The process's team: one thread per core (rayon's thread count).
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(rayon::current_num_threads()))
    }

    /// The global team for work over `rows` rows: up to `MAX_ROWS`, on
    /// a machine of more than one core; None where rayon's pool (more
    /// rows) or the calling thread alone should run it.
    pub fn for_rows(rows: usize) -> Option<&'static Team> {
        (rows <= MAX_ROWS && rayon::current_num_threads() > 1).then(Team::global)
    }

    /// Parts a job is split into: the team's thread count.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(part)` for every part in `0..threads()`, part 0 on the
    /// calling thread, and returns when all are done.
    ///
    /// # Panics
    /// When a part panics (after every part has finished).
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        // A part that panicked earlier poisons the lock; the team is still
        // sound (every part had finished), so it takes the guard back.
        let _guard = match self.busy.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..self.threads()).for_each(f);
                return;
            }
        };
        if self.workers.is_empty() {
            return f(0);
        }
        let s = &*self.shared;
        let job: Job = f;
        s.job.store(&job as *const Job as *mut (), Relaxed);
        s.pending.0.store(self.workers.len(), Relaxed);
        s.epoch.0.fetch_add(1, SeqCst);
        self.wake();
        // Waits for the workers even when part 0 unwinds: they hold `job`.
        let _wait = WaitForWorkers(s);
        f(0);
    }

    /// Unparks the workers that went to sleep before this job's epoch.
    fn wake(&self) {
        for (flag, w) in self.shared.sleeping.iter().zip(&self.workers) {
            if flag.swap(false, SeqCst) {
                w.thread().unpark();
            }
        }
    }
}

/// On drop (part 0 done or unwinding): spins, then yields, until the
/// workers are done with the job; panics when one of their parts did.
struct WaitForWorkers<'a>(&'a Shared);

impl Drop for WaitForWorkers<'_> {
    fn drop(&mut self) {
        let s = self.0;
        let start = Instant::now();
        let mut spins = 0u32;
        while s.pending.0.load(Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if s.panicked.swap(false, Relaxed) && !thread::panicking() {
            panic!("a part of a team job panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.epoch.0.fetch_add(1, SeqCst);
        self.wake();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Worker `i` (part `i + 1`): waits for each new epoch and runs its part.
fn worker(s: &Shared, i: usize) {
    let mut seen = 0;
    loop {
        seen = next_epoch(s, i, seen);
        if s.stop.load(SeqCst) {
            return;
        }
        // SAFETY: `run` stored a pointer to its `Job` before bumping the
        // epoch (SeqCst, read by `next_epoch` with SeqCst) and does not
        // return, or unwind past the job, until `pending` is zero.
        let job: Job = unsafe { *(s.job.load(Relaxed) as *const Job) };
        if catch_unwind(AssertUnwindSafe(|| job(i + 1))).is_err() {
            s.panicked.store(true, Relaxed);
        }
        s.pending.0.fetch_sub(1, Release);
    }
}

/// Spins for `SPIN` until the epoch moves past `seen`, then parks until
/// `Team::wake`; returns the new epoch.
fn next_epoch(s: &Shared, i: usize, seen: usize) -> usize {
    loop {
        if let Some(e) = spin_for_epoch(s, seen) {
            return e;
        }
        // Park: announce it, then check the epoch once more (`wake` swaps
        // the flag after bumping the epoch, so one of the two sees the other).
        s.sleeping[i].store(true, SeqCst);
        if s.epoch.0.load(SeqCst) != seen {
            s.sleeping[i].store(false, SeqCst);
            continue;
        }
        while s.sleeping[i].load(SeqCst) {
            thread::park();
        }
    }
}

/// The epoch once it moves past `seen`, or None after spinning `SPIN`.
fn spin_for_epoch(s: &Shared, seen: usize) -> Option<usize> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let e = s.epoch.0.load(SeqCst);
        if e != seen {
            return Some(e);
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(256) && start.elapsed() > SPIN {
            return None;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_once_per_job_on_teams_of_one_to_four_threads() {
        for threads in 1..=4 {
            let team = Team::new(threads);
            let counts: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
            for _ in 0..1000 {
                team.run(&|p| {
                    counts[p].fetch_add(1, Relaxed);
                });
            }
            assert!(counts.iter().all(|c| c.load(Relaxed) == 1000), "{threads}");
        }
    }

    #[test]
    fn a_team_that_went_to_sleep_wakes_for_the_next_job() {
        let team = Team::new(2);
        let hits = AtomicU64::new(0);
        for _ in 0..3 {
            thread::sleep(SPIN * 5);
            team.run(&|_| {
                hits.fetch_add(1, Relaxed);
            });
        }
        assert_eq!(hits.load(Relaxed), 6);
    }

    #[test]
    fn a_job_that_runs_a_job_runs_the_inner_parts_on_its_own_thread() {
        let team = Team::new(2);
        let inner = AtomicU64::new(0);
        team.run(&|_| {
            team.run(&|p| {
                inner.fetch_add(1 << (8 * p), Relaxed);
            })
        });
        // Two outer parts, each running inner parts 0 and 1.
        assert_eq!(inner.load(Relaxed), 2 * (1 + (1 << 8)));
    }

    #[test]
    fn a_panicking_part_panics_the_caller_after_all_parts_finish() {
        let team = Team::new(2);
        let done = AtomicU64::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(&|p| {
                done.fetch_add(1, Relaxed);
                if p == 1 {
                    panic!("part 1");
                }
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Relaxed), 2);
        // The team still works afterwards, on both threads (the panic
        // poisoned its lock, which it takes back).
        let ids = Mutex::new(std::collections::HashSet::new());
        team.run(&|_| {
            done.fetch_add(1, Relaxed);
            ids.lock().unwrap().insert(thread::current().id());
        });
        assert_eq!(done.load(Relaxed), 4);
        assert_eq!(ids.lock().unwrap().len(), 2, "the parts ran on one thread");
    }
}
