//! The engine owns the model and the drafter on a thread of its own, off
//! the async runtime, and runs continuous batching: each iteration builds
//! one batch of rows from every active sequence (a prompt chunk for one in
//! prefill, `[pending, drafts..]` for one decoding; see `scheduler`), runs
//! one forward over all of them, then lets each sequence accept, commit and
//! roll back its own cache. Up to `max_active` sequences are active; the
//! rest wait in the queue (the server bounds the queue and answers 429 when
//! full). A sequence whose receiver is gone (client disconnected) or that
//! was cancelled is dropped before the next forward, freeing its rows and
//! its cache.
//!
//! The CPU backend runs a batch as one forward. candle's backend (CUDA)
//! takes the same batches but runs one forward per sequence. Sequences with
//! the exit cascade or LayerSkip drafting prefill in the batch and take
//! their decode steps alone (their rows stop at the exits).
//!
//! With a continuation cache (`decode::suffix_cache`), every sequence
//! drafts from it too, and each sequence that finishes puts its prompt and
//! output into it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::OwnedSemaphorePermit;

use crate::checkpoint::Loaded;
use crate::decode::proposer::{Costs, Drafters, RowPrice, SharedClock};
use crate::decode::{
    proposer, Finish, GenParams, Generator, Rows, SpecStats, SuffixCache, TokenOut,
};
use crate::model::cpu::WeightDtype;
use crate::model::forward::{Forward, Segment};
use crate::serving::metrics::Metrics;
use crate::serving::openai::Validated;
use crate::serving::scheduler::{self, Budget, DraftBackoff, Want};

/// What a sequence reports back, in order: `Started`, `Tokens`..., `Done`
/// (or `Error`).
#[derive(Debug)]
pub enum Event {
    /// Prefill finished; echo logprobs of the prompt when asked.
    Started {
        echo: Vec<Option<TokenOut>>,
    },
    /// New tokens, and the engine iteration (forward) that made them.
    Tokens {
        tokens: Vec<TokenOut>,
        iteration: usize,
    },
    Done {
        finish: Finish,
        stats: SpecStats,
    },
    Error(String),
}

/// One sequence of an admitted request: choice `choice` of prompt `prompt`.
pub struct Job {
    /// The request, shared by its sequences; the engine reads its
    /// sampling, stopping and output groups.
    pub request: Arc<Validated>,
    pub prompt: usize,
    pub choice: usize,
    /// Bounded ([`EVENT_BUFFER`]): a sequence whose client stops reading
    /// pauses instead of buffering without limit.
    pub events: mpsc::Sender<Event>,
    /// Set by the server when the client no longer wants tokens (a stop
    /// string was hit, or the request timed out).
    pub cancel: Arc<AtomicBool>,
    /// The admission slot: it travels with the sequence and is released
    /// when the engine drops it, so the server's capacity bound holds
    /// whatever the client does.
    pub permit: OwnedSemaphorePermit,
    /// Past this the engine drops the sequence, queued or active.
    pub deadline: Instant,
}

/// Whether a sequence's client no longer wants it: gone (its receiver
/// dropped), cancelled, or past the request's deadline.
fn abandoned(events: &mpsc::Sender<Event>, cancel: &AtomicBool, deadline: Instant) -> bool {
    events.is_closed() || cancel.load(Ordering::Relaxed) || Instant::now() > deadline
}

impl Job {
    fn abandoned(&self) -> bool {
        abandoned(&self.events, &self.cancel, self.deadline)
    }

    fn params(&self, cfg: &EngineConfig) -> GenParams {
        let v = &self.request;
        GenParams {
            max_tokens: v.stopping.max_tokens,
            sampling: v.sampling.clone(),
            choice: self.choice as u32,
            prompt: self.prompt as u32,
            logprobs: v.output.logprobs,
            speculate: v.speculate,
            cascade: cfg.cascade,
            draft_tree: cfg.draft_trees,
            sampled_trees: cfg.draft_trees,
            exit_margin: cfg.exit_margin,
            ..Default::default()
        }
    }
}

/// Top logprobs of the prompt's own tokens to compute (echo with
/// logprobs), for the first choice of each prompt only: the server copies
/// them to the prompt's other choices, so a prompt is scored once.
fn echo_logprobs(v: &Validated, choice: usize) -> Option<usize> {
    match (v.output.echo, v.output.logprobs) {
        (true, Some(k)) if choice == 0 => Some(k),
        _ => None,
    }
}

/// Events a sequence's channel holds. A sequence sends at most
/// [`EVENTS_PER_ITERATION`] events an iteration and takes part only while
/// its channel has room for them, so its output waiting for a slow client
/// is bounded by this many events.
pub const EVENT_BUFFER: usize = 16;

/// Events one iteration can send a sequence: `Started`, `Tokens` from the
/// batch, `Tokens` from a solo step, and `Done` (or `Error`).
const EVENTS_PER_ITERATION: usize = 4;

/// Default rows per forward. On the shipped model (6 x 384, f16) on this
/// project's 2-core machine, `gpt-serve bench --plain --no-gpt2` measured a
/// forward's cost nearly flat up to ~16 rows and then growing with rows as
/// compute demands; 64 rows keep one forward within a few one-row steps, so
/// a prompt chunk never holds the decoding sequences for long, while 32
/// sequences still get their pending rows plus drafts.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 64;

/// A fault injected into the engine thread, for tests of how the server
/// meets an engine failure (never set by `serve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Panic at this engine iteration.
    PanicAtIteration(usize),
    /// Sleep this many milliseconds every iteration (a slow model).
    SlowIterations(u64),
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_active: usize,
    /// Rows per forward, all sequences together (prompt chunks, pending
    /// rows and drafts).
    pub max_batch_rows: usize,
    pub backend: Backend,
    /// Early exits truncate drafts before the final blocks.
    pub cascade: bool,
    /// Draft trees: greedy, and sampled at temperature > 0
    /// (`GenParams::draft_tree`, `GenParams::sampled_trees`).
    pub draft_trees: bool,
    /// Seconds of a forward by row count, as `(rows, seconds)` from 1 row
    /// up; None (service): measured on this machine at start. A test sets
    /// it so that what the engine drafts does not depend on timing.
    pub row_costs: Option<Vec<(usize, f64)>>,
    pub exit_margin: f32,
    /// Storage of the CPU path's KV caches (`--kv-cache`).
    pub kv_cache: crate::model::cpu::KvDtype,
    /// The cross-request continuation cache sequences draft from and
    /// finished sequences go into (None: off).
    pub suffix_cache: Option<Arc<SuffixCache>>,
    /// Test hook: a fault to inject (None in service).
    pub fault: Option<Fault>,
}

/// Which forward the engine decodes with.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU inference path (`crate::model::cpu`), weights stored as given.
    Cpu(WeightDtype),
    /// candle's model on a device (CUDA builds).
    Candle(candle_core::Device),
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<(Job, Instant)>,
    waiting: Arc<AtomicUsize>,
    pub ready: Arc<AtomicBool>,
    /// Set when the engine cannot continue (its thread panicked, or the
    /// model failed to build): `/health` turns 503 and `serve` exits
    /// non-zero so an orchestrator restarts it.
    pub failed: Arc<AtomicBool>,
    pub config: EngineConfig,
}

impl Engine {
    /// Starts the engine thread; it builds the model from `loaded` and sets
    /// `ready` when it can take work.
    pub fn spawn(
        loaded: Loaded,
        drafters: impl Into<Drafters>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Engine> {
        let drafters: Drafters = drafters.into();
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Engine {
            tx,
            waiting: Arc::new(AtomicUsize::new(0)),
            ready: Arc::new(AtomicBool::new(false)),
            failed: Arc::new(AtomicBool::new(false)),
            config: config.clone(),
        };
        let (ready, waiting) = (engine.ready.clone(), engine.waiting.clone());
        let failed = engine.failed.clone();
        std::thread::Builder::new()
            .name("gpt-serve-engine".into())
            .spawn(move || {
                // A panic drops every active sequence (their clients see the
                // stream end without `Done`: an error) and marks the engine
                // failed, as does a model that cannot be built.
                let body = std::panic::AssertUnwindSafe(|| {
                    let eot = loaded.tokenizer.eot();
                    let d = &drafters;
                    match &config.backend {
                        Backend::Cpu(dt) => loaded.cpu(*dt).map(|m| {
                            let m = m.with_kv_cache(config.kv_cache);
                            drop(loaded);
                            ready.store(true, Ordering::SeqCst);
                            crate::model::cpu::in_pool(|| {
                                run(&m, d, rx, &config, &metrics, &waiting, &failed, eot)
                            })
                        }),
                        Backend::Candle(device) => loaded.model(device).map(|m| {
                            ready.store(true, Ordering::SeqCst);
                            run(&m, d, rx, &config, &metrics, &waiting, &failed, eot)
                        }),
                    }
                });
                match std::panic::catch_unwind(body) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!("engine: cannot build the model: {e}");
                        failed.store(true, Ordering::SeqCst);
                    }
                    Err(_) => {
                        tracing::error!("engine: the engine thread panicked; it cannot continue");
                        failed.store(true, Ordering::SeqCst);
                    }
                }
            })?;
        Ok(engine)
    }

    /// Queues a job (the server has admitted it).
    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx.send((job, Instant::now())).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            "the engine has stopped".to_string()
        })
    }
}

struct Active<'m, M: Forward> {
    gen: Generator<'m, M>,
    events: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    deadline: Instant,
    _permit: OwnedSemaphorePermit,
    /// `Started` was sent (the prompt is in the cache).
    started: bool,
    /// Takes its decode steps alone (exit cascade or LayerSkip drafting).
    solo: bool,
    /// Still wanted: false once finished, failed or abandoned.
    alive: bool,
    /// Where its prompt and output go when it finishes.
    cache: Option<Arc<SuffixCache>>,
    /// Whether its proposer is asked this iteration.
    backoff: DraftBackoff,
}

impl<M: Forward> Active<'_, M> {
    fn wanted(&self) -> bool {
        self.alive && !abandoned(&self.events, &self.cancel, self.deadline)
    }

    /// Whether its client has read enough of its output for this
    /// iteration's events to fit; a sequence that has not waits, paused.
    fn can_take_events(&self) -> bool {
        self.events.capacity() >= EVENTS_PER_ITERATION
    }

    fn send(&mut self, ev: Event) {
        match self.events.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Closed(_)) => self.alive = false,
            Err(TrySendError::Full(_)) => {
                // Never happens: a sequence runs only with room for an
                // iteration's events. Dropping it keeps the bound.
                tracing::error!("a sequence's event buffer overflowed; dropping it");
                self.alive = false;
            }
        }
    }

    /// Sends `Started` once the prompt is in, new tokens, and `Done` at the
    /// end; marks the sequence dead when its client is gone.
    fn report(&mut self, tokens: Vec<TokenOut>, iteration: usize, metrics: &Metrics) {
        if let Err(e) = self.gen.check_cache() {
            return self.fail(&e);
        }
        if !self.started && !self.gen.in_prefill() {
            self.started = true;
            let echo = self.gen.take_echo();
            self.send(Event::Started { echo });
        }
        if !tokens.is_empty() && self.alive {
            self.send(Event::Tokens { tokens, iteration });
        }
        if let Some(finish) = self.gen.finished.filter(|_| self.alive) {
            if let Some(c) = &self.cache {
                c.insert(self.gen.tokens());
            }
            metrics.record_spec(&self.gen.stats);
            let stats = self.gen.stats.clone();
            self.send(Event::Done { finish, stats });
            self.alive = false;
        }
    }

    fn fail(&mut self, e: &candle_core::Error) {
        tracing::error!("decode failed: {e}");
        let _ = self.events.try_send(Event::Error(e.to_string()));
        self.alive = false;
    }
}

#[allow(clippy::too_many_arguments)]
fn admit<'m, M: Forward>(
    model: &'m M,
    drafters: &'m Drafters,
    (job, queued): (Job, Instant),
    cfg: &EngineConfig,
    eot: u32,
    metrics: &Metrics,
    budget: &Budget,
    clock: &SharedClock,
) -> Option<Active<'m, M>> {
    metrics.queue_time.observe(queued.elapsed().as_secs_f64());
    let params = job.params(cfg);
    let costs = Costs {
        verify: budget.verify_costs(drafters.k_max()),
        head_draft: budget.head_draft,
    };
    let proposer = proposer::serving(drafters, costs, clock, cfg.suffix_cache.as_ref());
    let solo = params.cascade || params.self_draft.is_some();
    let prompt = &job.request.prompts[job.prompt];
    let echo = echo_logprobs(&job.request, job.choice);
    match Generator::start(model, proposer, prompt, params, eot, echo) {
        Ok(gen) => {
            let mut a = Active {
                gen,
                events: job.events,
                cancel: job.cancel,
                deadline: job.deadline,
                _permit: job.permit,
                started: false,
                solo,
                alive: true,
                cache: cfg.suffix_cache.clone(),
                backoff: DraftBackoff::default(),
            };
            a.report(vec![], 0, metrics);
            Some(a)
        }
        Err(e) => {
            let _ = job.events.try_send(Event::Error(e.to_string()));
            None
        }
    }
}

/// Jobs the engine has taken from the channel but not yet started.
struct Queue {
    rx: mpsc::UnboundedReceiver<(Job, Instant)>,
    jobs: std::collections::VecDeque<(Job, Instant)>,
}

impl Queue {
    /// Takes every job sent so far, then drops those whose client is gone,
    /// that were cancelled or that ran out of time: they cost no prefill,
    /// and their slots are free at once.
    fn refresh(&mut self, metrics: &Metrics, waiting: &AtomicUsize) {
        while let Ok(job) = self.rx.try_recv() {
            self.jobs.push_back(job);
        }
        let before = self.jobs.len();
        self.jobs.retain(|(job, _)| !job.abandoned());
        let dropped = before - self.jobs.len();
        metrics.abandoned_in_queue.inc_by(dropped as u64);
        waiting.fetch_sub(dropped, Ordering::SeqCst);
    }

    /// Blocks for the next job when there is nothing to do; false when the
    /// server is gone.
    fn wait(&mut self) -> bool {
        if !self.jobs.is_empty() {
            return true;
        }
        match self.rx.blocking_recv() {
            Some(job) => {
                self.jobs.push_back(job);
                true
            }
            None => false,
        }
    }
}

/// Marks the engine failed when dropped during a panic. Declared after
/// the active sequences, so it runs before they are dropped: a client whose
/// stream closes finds `/health` already at 503.
struct FailOnPanic<'a>(&'a AtomicBool);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run<M: Forward>(
    model: &M,
    drafters: &Drafters,
    rx: mpsc::UnboundedReceiver<(Job, Instant)>,
    cfg: &EngineConfig,
    metrics: &Metrics,
    waiting: &AtomicUsize,
    failed: &AtomicBool,
    eot: u32,
) {
    let costs = match &cfg.row_costs {
        Some(c) => c.clone(),
        None => cost_curve(model, cfg.max_batch_rows),
    };
    let mut budget = Budget::measured(cfg.max_batch_rows, &costs);
    if let Some(h) = &drafters.head {
        budget.head_draft = proposer::measure_draft_cost(model, h).unwrap_or_else(|e| {
            tracing::warn!("engine: cannot time the draft head ({e}); drafting priced as free");
            0.0
        });
        tracing::info!(
            "engine: one draft-head draft costs {:.3} of a one-row step",
            budget.head_draft
        );
    }
    tracing::info!(
        "engine: up to {} rows per forward; measured cost of 2/8/{} rows: {:.2}x/{:.2}x/{:.2}x one row",
        budget.max_rows,
        budget.max_rows,
        budget.cost(2),
        budget.cost(8),
        budget.cost(budget.max_rows)
    );
    // What lone steps and head drafts cost in this engine's loop, timed
    // by every sequence it decodes.
    let clock = SharedClock::default();
    let mut queue = Queue {
        rx,
        jobs: Default::default(),
    };
    let mut active: Vec<Active<M>> = Vec::new();
    let _guard = FailOnPanic(failed);
    for turn in 0usize.. {
        if active.is_empty() {
            metrics.set_running(0, waiting.load(Ordering::SeqCst));
            if !queue.wait() {
                return;
            }
        }
        queue.refresh(metrics, waiting);
        while active.len() < cfg.max_active {
            let Some(job) = queue.jobs.pop_front() else {
                break;
            };
            waiting.fetch_sub(1, Ordering::SeqCst);
            active.extend(admit(
                model, drafters, job, cfg, eot, metrics, &budget, &clock,
            ));
        }
        match cfg.fault {
            Some(Fault::PanicAtIteration(t)) if t == turn => {
                panic!("fault injected at engine iteration {turn}")
            }
            Some(Fault::SlowIterations(ms)) => {
                std::thread::sleep(std::time::Duration::from_millis(ms))
            }
            _ => {}
        }
        // Cancelled and abandoned sequences free their rows and caches now.
        active.retain(|a| a.wanted());
        metrics.set_running(active.len(), waiting.load(Ordering::SeqCst));
        let t0 = Instant::now();
        if iterate(model, &mut active, &budget, turn, metrics) {
            metrics
                .iteration_seconds
                .observe(t0.elapsed().as_secs_f64());
        } else {
            // Every sequence waits for its client to read: look again soon.
            metrics.idle_waits.inc();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        active.retain(|a| a.wanted());
    }
}

/// One engine iteration: the row batch, one forward, every sequence's
/// commit; then the solo sequences' own steps. A sequence whose client has
/// not read its earlier output sits out. Returns whether any sequence ran.
fn iterate<M: Forward>(
    model: &M,
    active: &mut [Active<M>],
    budget: &Budget,
    turn: usize,
    metrics: &Metrics,
) -> bool {
    let runs: Vec<bool> = active.iter().map(Active::can_take_events).collect();
    let price = draft_floor(active, budget);
    let drafting = Instant::now();
    // Sequences whose proposer is asked (the others take no drafts).
    let mut asked = vec![false; active.len()];
    let mut rows: Vec<Option<Rows>> = active
        .iter_mut()
        .zip(&runs)
        .zip(&mut asked)
        .map(
            |((a, &run), asked)| match !run || (a.solo && !a.gen.in_prefill()) {
                true => None,
                false => {
                    *asked = !a.gen.in_prefill() && a.backoff.ask();
                    let floor = if *asked { price } else { RowPrice::NEVER };
                    a.gen.next_rows_in_batch(budget.max_rows, floor)
                }
            },
        )
        .collect();
    let wants: Vec<Want> = rows
        .iter()
        .map(|r| match r {
            None => Want::Idle,
            Some(r) if r.is_prefill() => Want::Prefill { remaining: r.len() },
            Some(r) => Want::Decode {
                gains: r.draft_gains(),
            },
        })
        .collect();
    let alloc = scheduler::allocate(&wants, budget, turn);
    for ((a, &n), _) in active
        .iter_mut()
        .zip(&alloc)
        .zip(&asked)
        .filter(|(_, &x)| x)
    {
        a.backoff.taken(n.saturating_sub(1));
    }
    metrics
        .draft_seconds
        .observe(drafting.elapsed().as_secs_f64());
    let mut kinds = [0usize; 3]; // prefill, decode, draft rows
    for (r, &n) in rows.iter_mut().zip(&alloc) {
        match r {
            Some(_) if n == 0 => *r = None,
            Some(x) if x.is_prefill() => {
                x.keep_rows(n);
                kinds[0] += n;
            }
            Some(x) => {
                x.keep_rows(n);
                kinds[1] += 1;
                kinds[2] += n - 1;
            }
            None => {}
        }
    }
    let t0 = Instant::now();
    let (owners, result) = forward(model, active, &rows);
    if !owners.is_empty() {
        metrics.step_seconds.observe(t0.elapsed().as_secs_f64());
        metrics.record_batch(kinds[0], kinds[1], kinds[2], owners.len());
    }
    match result {
        Ok(logits) => {
            for (i, l) in owners.into_iter().zip(logits) {
                let r = rows[i].take().expect("an owner has rows");
                let tokens = active[i].gen.commit(r, &l);
                active[i].report(tokens, turn, metrics);
            }
        }
        Err(e) => owners.into_iter().for_each(|i| active[i].fail(&e)),
    }
    for (a, _) in active.iter_mut().zip(&runs).filter(|(_, &run)| run) {
        if a.solo && a.started && a.alive && a.gen.finished.is_none() {
            match a.gen.step() {
                Ok(tokens) => a.report(tokens, turn, metrics),
                Err(e) => a.fail(&e),
            }
        } else if a.alive && a.gen.finished.is_some() {
            a.report(vec![], turn, metrics); // finished without a forward (max_tokens)
        }
    }
    runs.iter().any(|&r| r)
}

/// The least expected gain a draft row can have and still pay for itself
/// in this iteration's batch (the rule of `scheduler::allocate`, before any
/// draft is added), so the drafter stops where the scheduler would cut; and
/// what a one-row step of time is worth in tokens in that batch.
fn draft_floor<M: Forward>(active: &[Active<M>], budget: &Budget) -> RowPrice {
    let decoding = active
        .iter()
        .filter(|a| !a.solo && !a.gen.in_prefill() && a.gen.finished.is_none())
        .count();
    let prefilling = active.iter().filter(|a| a.gen.in_prefill()).count();
    // Rows before drafts: pending rows, and at least one row per prompt.
    let rows = (decoding + prefilling).clamp(1, budget.max_rows);
    let time_value = decoding as f64 / budget.cost(rows);
    RowPrice {
        min_gain: (budget.marginal(rows) * time_value) as f32,
        time_value: time_value as f32,
    }
}

/// One forward over every sequence that has rows; returns which sequences
/// took part, in order, and their logits.
fn forward<M: Forward>(
    model: &M,
    active: &mut [Active<M>],
    rows: &[Option<Rows>],
) -> (
    Vec<usize>,
    candle_core::Result<Vec<crate::model::forward::Logits>>,
) {
    let mut owners = Vec::new();
    let mut segs = Vec::new();
    for (i, (a, r)) in active.iter_mut().zip(rows).enumerate() {
        if let Some(r) = r {
            owners.push(i);
            segs.push(Segment {
                tokens: r.tokens(),
                pos: r.pos(),
                cache: a.gen.cache_mut(),
                logits: r.logits(),
                tree: r.tree(),
            });
        }
    }
    if segs.is_empty() {
        return (owners, Ok(vec![]));
    }
    let result = model.forward_batch(&mut segs);
    (owners, result)
}

/// The time of a forward of 1, 2, 4, .. rows up to `max_rows` (one
/// sequence's rows after an empty cache, logits for every row), measured
/// on this machine at start: every size once per round, round after
/// round, each keeping its best (~0.15 s on the shipped model). Rounds
/// interleave so that load on a shared machine hits all sizes alike: with
/// 3 rounds size by size, separate starts measured 2 rows at 1.06-1.25x
/// one row and 3 rows at 1.26-1.63x, and chains were priced by whichever.
fn cost_curve<M: Forward>(model: &M, max_rows: usize) -> Vec<(usize, f64)> {
    const ROUNDS: usize = 7;
    let limit = max_rows.max(1).min(model.config().block_size);
    let sizes: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2))
        .take_while(|&n| n < limit)
        .chain([limit])
        .collect();
    let time = |n: usize| -> Option<f64> {
        let tokens = vec![0u32; n];
        let mut cache = model.new_cache().ok()?;
        let t = Instant::now();
        let mut seg = [Segment {
            tokens: &tokens,
            pos: 0,
            cache: &mut cache,
            logits: 0..n,
            tree: None,
        }];
        model.forward_batch(&mut seg).ok()?;
        Some(t.elapsed().as_secs_f64())
    };
    // None once a size has failed (the curve ends before it).
    let mut best: Vec<Option<f64>> = vec![Some(f64::MAX); sizes.len()];
    for _ in 0..ROUNDS {
        for (b, &n) in best.iter_mut().zip(&sizes) {
            *b = b.and_then(|b| time(n).map(|t| b.min(t)));
        }
    }
    sizes
        .into_iter()
        .zip(best)
        .map_while(|(n, t)| t.map(|t| (n, t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;
    use crate::serving::openai::{Output, Stopping};

    #[test]
    fn only_the_first_choice_of_a_prompt_scores_the_prompt() {
        let request = |echo, logprobs| {
            Validated::from_tokens(
                vec![vec![1, 2], vec![3]],
                3,
                SamplingParams::default(),
                Stopping {
                    max_tokens: 1,
                    stop: Arc::new([]),
                },
                Output {
                    echo,
                    logprobs,
                    ..Default::default()
                },
                true,
            )
        };
        let v = request(true, Some(2));
        let scored: Vec<Option<usize>> = (0..3).map(|c| echo_logprobs(&v, c)).collect();
        assert_eq!(scored, vec![Some(2), None, None]);
        assert_eq!(echo_logprobs(&request(true, None), 0), None);
        assert_eq!(echo_logprobs(&request(false, Some(2)), 0), None);
    }
}
