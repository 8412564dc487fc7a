//! The engine owns the model and the drafter on a thread of its own, off
//! the async runtime, and decodes every admitted sequence in turn: each
//! active sequence takes one decode step per round (round-robin), so a new
//! client waits for at most one step of each of the others, not for whole
//! generations. Up to `max_active` sequences decode at once; the rest wait
//! in the queue (the server bounds the queue and answers 429 when full). A
//! sequence whose receiver is gone (client disconnected) is dropped at its
//! next turn, so no work runs for nobody.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::checkpoint::Loaded;
use crate::cpu::WeightDtype;
use crate::decode::{Finish, GenParams, Generator, Proposer, SpecStats, TokenOut};
use crate::drafter::Drafter;
use crate::forward::Forward;
use crate::metrics::Metrics;

/// What a sequence reports back, in order: `Started`, `Tokens`..., `Done`
/// (or `Error`).
#[derive(Debug)]
pub enum Event {
    /// Prefill finished; echo logprobs of the prompt when asked.
    Started {
        echo: Vec<Option<TokenOut>>,
    },
    Tokens(Vec<TokenOut>),
    Done {
        finish: Finish,
        stats: SpecStats,
    },
    Error(String),
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub echo_logprobs: Option<usize>,
    pub events: mpsc::UnboundedSender<Event>,
    /// Set by the server when the client no longer wants tokens (a stop
    /// string was hit, or the request timed out).
    pub cancel: Arc<AtomicBool>,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_active: usize,
    pub backend: Backend,
    /// Early exits truncate drafts before the final blocks.
    pub cascade: bool,
    pub exit_confidence: f32,
}

/// Which forward the engine decodes with.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU inference path (`crate::cpu`), weights stored as given.
    Cpu(WeightDtype),
    /// candle's model on a device (CUDA builds).
    Candle(candle_core::Device),
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Job>,
    waiting: Arc<AtomicUsize>,
    pub ready: Arc<AtomicBool>,
    pub has_drafter: Arc<AtomicBool>,
    pub config: EngineConfig,
}

impl Engine {
    /// Starts the engine thread; it builds the model from `loaded` and sets
    /// `ready` when it can take work.
    pub fn spawn(
        loaded: Loaded,
        drafter: Option<Drafter>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Engine> {
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Engine {
            tx,
            waiting: Arc::new(AtomicUsize::new(0)),
            ready: Arc::new(AtomicBool::new(false)),
            has_drafter: Arc::new(AtomicBool::new(drafter.is_some())),
            config: config.clone(),
        };
        let (ready, waiting) = (engine.ready.clone(), engine.waiting.clone());
        std::thread::Builder::new()
            .name("gpt-serve-engine".into())
            .spawn(move || {
                let eot = loaded.tokenizer.eot();
                let d = drafter.as_ref();
                let built = match &config.backend {
                    Backend::Cpu(dt) => loaded.cpu(*dt).map(|m| {
                        drop(loaded);
                        ready.store(true, Ordering::SeqCst);
                        crate::cpu::in_pool(|| run(&m, d, rx, &config, &metrics, &waiting, eot))
                    }),
                    Backend::Candle(device) => loaded.model(device).map(|m| {
                        ready.store(true, Ordering::SeqCst);
                        run(&m, d, rx, &config, &metrics, &waiting, eot)
                    }),
                };
                if let Err(e) = built {
                    tracing::error!("engine: cannot build the model: {e}");
                }
            })?;
        Ok(engine)
    }

    /// Queues a job (the server has admitted it).
    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx.send(job).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            "the engine has stopped".to_string()
        })
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

struct Active<'m, M: Forward> {
    gen: Generator<'m, M>,
    events: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

fn start<'m, M: Forward>(
    model: &'m M,
    drafter: Option<&'m Drafter>,
    job: Job,
    cfg: &EngineConfig,
    eot: u32,
) -> Option<Active<'m, M>> {
    let mut params = job.params;
    params.cascade = params.cascade || cfg.cascade;
    params.exit_confidence = cfg.exit_confidence;
    let proposer = drafter.map_or(Proposer::None, Proposer::Tree);
    match Generator::new(model, proposer, &job.prompt, params, eot, job.echo_logprobs) {
        Ok((gen, echo)) => {
            job.events.send(Event::Started { echo }).ok()?;
            Some(Active {
                gen,
                events: job.events,
                cancel: job.cancel,
            })
        }
        Err(e) => {
            let _ = job.events.send(Event::Error(e.to_string()));
            None
        }
    }
}

fn run<M: Forward>(
    model: &M,
    drafter: Option<&Drafter>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    cfg: &EngineConfig,
    metrics: &Metrics,
    waiting: &AtomicUsize,
    eot: u32,
) {
    let mut active: Vec<Active<M>> = Vec::new();
    loop {
        if active.is_empty() {
            metrics.set_running(0, waiting.load(Ordering::SeqCst));
            let Some(job) = rx.blocking_recv() else {
                return;
            };
            waiting.fetch_sub(1, Ordering::SeqCst);
            active.extend(start(model, drafter, job, cfg, eot));
        }
        while active.len() < cfg.max_active {
            match rx.try_recv() {
                Ok(job) => {
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    active.extend(start(model, drafter, job, cfg, eot));
                }
                Err(_) => break,
            }
        }
        metrics.set_running(active.len(), waiting.load(Ordering::SeqCst));
        // One step for each active sequence, in turn.
        active.retain_mut(|a| {
            if a.events.is_closed() || a.cancel.load(Ordering::Relaxed) {
                return false; // cancelled by the client
            }
            let t0 = Instant::now();
            match a.gen.step() {
                Ok(tokens) => {
                    metrics.step_seconds.observe(t0.elapsed().as_secs_f64());
                    if !tokens.is_empty() && a.events.send(Event::Tokens(tokens)).is_err() {
                        return false;
                    }
                    match a.gen.finished {
                        Some(finish) => {
                            metrics.record_spec(&a.gen.stats);
                            let _ = a.events.send(Event::Done {
                                finish,
                                stats: a.gen.stats.clone(),
                            });
                            false
                        }
                        None => true,
                    }
                }
                Err(e) => {
                    tracing::error!("decode step failed: {e}");
                    let _ = a.events.send(Event::Error(e.to_string()));
                    false
                }
            }
        });
    }
}
