//! Prometheus metrics with vLLM's names (`vllm:` prefix), so existing
//! dashboards work: token counters, time-to-first-token, inter-token and
//! end-to-end latency histograms, running/waiting requests, and the
//! speculative decoding counters (drafts, accepted, per position, per exit).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::decode::SpecStats;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub requests_success: Family<Labels, Counter>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub step_seconds: Histogram,
    /// Time of one iteration's drafting: every sequence's proposer, before
    /// the forward (its share of a step: this over this plus forward).
    pub draft_seconds: Histogram,
    /// Time of one whole engine iteration (drafting, forward, commits).
    pub iteration_seconds: Histogram,
    /// Iterations where every sequence waited for its client to read.
    pub idle_waits: Counter,
    pub queue_time: Histogram,
    pub batch_rows: Histogram,
    pub batch_sequences: Histogram,
    /// Sequences dropped from the queue before any prefill (client gone,
    /// cancelled or past its deadline).
    pub abandoned_in_queue: Counter,
    /// Time to tokenize a request's prompts (off the async runtime).
    pub tokenize_seconds: Histogram,
    rows_by_kind: Family<Labels, Counter>,
    running: Gauge<i64, std::sync::atomic::AtomicI64>,
    waiting: Gauge<i64, std::sync::atomic::AtomicI64>,
    spec_draft_tokens: Counter,
    spec_accepted_tokens: Counter,
    spec_drafts: Counter,
    spec_no_draft_steps: Counter,
    spec_accepted_per_pos: Family<Labels, Counter>,
    spec_drafted_per_pos: Family<Labels, Counter>,
    spec_truncated_by_exit: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Metrics {
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            requests_success: Family::default(),
            ttft: latency(),
            itl: latency(),
            e2e: latency(),
            step_seconds: latency(),
            draft_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 20)),
            iteration_seconds: latency(),
            idle_waits: Counter::default(),
            queue_time: latency(),
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            batch_sequences: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            abandoned_in_queue: Counter::default(),
            tokenize_seconds: latency(),
            rows_by_kind: Family::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            spec_draft_tokens: Counter::default(),
            spec_accepted_tokens: Counter::default(),
            spec_drafts: Counter::default(),
            spec_no_draft_steps: Counter::default(),
            spec_accepted_per_pos: Family::default(),
            spec_drafted_per_pos: Family::default(),
            spec_truncated_by_exit: Family::default(),
            registry: Registry::default(),
        };
        let mut r = Registry::default();
        m.register_requests(&mut r);
        m.register_engine(&mut r);
        m.register_spec(&mut r);
        Metrics { registry: r, ..m }
    }

    /// Token counters and the per-request latencies (vLLM's names).
    fn register_requests(&self, r: &mut Registry) {
        r.register(
            "vllm:prompt_tokens",
            "Prompt tokens processed",
            self.prompt_tokens.clone(),
        );
        r.register(
            "vllm:generation_tokens",
            "Tokens generated",
            self.generation_tokens.clone(),
        );
        r.register(
            "vllm:request_success",
            "Finished requests by finish reason",
            self.requests_success.clone(),
        );
        r.register(
            "vllm:time_to_first_token_seconds",
            "Time to first token",
            self.ttft.clone(),
        );
        r.register(
            "vllm:time_per_output_token_seconds",
            "Inter-token latency",
            self.itl.clone(),
        );
        r.register(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency",
            self.e2e.clone(),
        );
    }

    /// The engine: forward time, the queue, batch sizes and row kinds,
    /// running and waiting sequences.
    fn register_engine(&self, r: &mut Registry) {
        r.register(
            "gpt_serve:forward_seconds",
            "Time of one engine forward (every sequence in the batch)",
            self.step_seconds.clone(),
        );
        r.register(
            "gpt_serve:draft_seconds",
            "Time of one engine iteration's drafting (every sequence's proposer)",
            self.draft_seconds.clone(),
        );
        r.register(
            "gpt_serve:iteration_seconds",
            "Time of one engine iteration (drafting, the forward, every sequence's commit)",
            self.iteration_seconds.clone(),
        );
        r.register(
            "gpt_serve:engine_idle_waits",
            "Engine iterations where every sequence waited for its client to read",
            self.idle_waits.clone(),
        );
        r.register(
            "gpt_serve:abandoned_in_queue",
            "Sequences dropped from the queue before prefill (client gone, cancelled or timed out)",
            self.abandoned_in_queue.clone(),
        );
        r.register(
            "gpt_serve:tokenize_seconds",
            "Time to tokenize one request's prompts",
            self.tokenize_seconds.clone(),
        );
        r.register(
            "vllm:request_queue_time_seconds",
            "Time a request waited before the engine took it",
            self.queue_time.clone(),
        );
        r.register(
            "vllm:iteration_tokens_total",
            "Rows per engine forward (prompt, pending and draft rows)",
            self.batch_rows.clone(),
        );
        r.register(
            "gpt_serve:iteration_sequences",
            "Sequences per engine forward",
            self.batch_sequences.clone(),
        );
        r.register(
            "gpt_serve:batch_rows",
            "Rows run by kind: prefill (prompt), decode (pending) or draft",
            self.rows_by_kind.clone(),
        );
        r.register(
            "vllm:num_requests_running",
            "Sequences decoding",
            self.running.clone(),
        );
        r.register(
            "vllm:num_requests_waiting",
            "Sequences queued",
            self.waiting.clone(),
        );
    }

    /// Speculative decoding: drafts, acceptances, per position and per exit.
    fn register_spec(&self, r: &mut Registry) {
        r.register(
            "vllm:spec_decode_num_draft_tokens",
            "Draft tokens proposed",
            self.spec_draft_tokens.clone(),
        );
        r.register(
            "vllm:spec_decode_num_accepted_tokens",
            "Draft tokens accepted",
            self.spec_accepted_tokens.clone(),
        );
        r.register(
            "vllm:spec_decode_num_drafts",
            "Verify steps",
            self.spec_drafts.clone(),
        );
        r.register(
            "gpt_serve:spec_decode_no_draft_steps",
            "Steps where the drafter said __MODEL__",
            self.spec_no_draft_steps.clone(),
        );
        r.register(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafts by position",
            self.spec_accepted_per_pos.clone(),
        );
        r.register(
            "gpt_serve:spec_decode_num_draft_tokens_per_pos",
            "Drafts by position",
            self.spec_drafted_per_pos.clone(),
        );
        r.register(
            "gpt_serve:spec_decode_truncated_by_exit",
            "Drafts dropped by each early exit",
            self.spec_truncated_by_exit.clone(),
        );
    }

    pub fn set_running(&self, running: usize, waiting: usize) {
        self.running.set(running as i64);
        self.waiting.set(waiting as i64);
    }

    pub fn record_spec(&self, s: &SpecStats) {
        self.spec_draft_tokens.inc_by(s.drafted);
        self.spec_accepted_tokens.inc_by(s.accepted);
        self.spec_drafts.inc_by(s.steps);
        self.spec_no_draft_steps.inc_by(s.no_draft_steps);
        let pos = |i: usize| vec![("position".to_string(), i.to_string())];
        for (i, n) in s.accepted_by_pos.iter().enumerate() {
            self.spec_accepted_per_pos.get_or_create(&pos(i)).inc_by(*n);
        }
        for (i, n) in s.drafted_by_pos.iter().enumerate() {
            self.spec_drafted_per_pos.get_or_create(&pos(i)).inc_by(*n);
        }
        for (i, n) in s.truncated_by_exit.iter().enumerate() {
            self.spec_truncated_by_exit
                .get_or_create(&vec![("exit".to_string(), i.to_string())])
                .inc_by(*n);
        }
    }

    /// One engine forward: its rows by kind and its sequences.
    pub fn record_batch(&self, prefill: usize, decode: usize, draft: usize, sequences: usize) {
        self.batch_rows.observe((prefill + decode + draft) as f64);
        self.batch_sequences.observe(sequences as f64);
        for (kind, n) in [("prefill", prefill), ("decode", decode), ("draft", draft)] {
            self.rows_by_kind
                .get_or_create(&vec![("kind".to_string(), kind.to_string())])
                .inc_by(n as u64);
        }
    }

    pub fn finished(&self, reason: &str) {
        self.requests_success
            .get_or_create(&vec![("finished_reason".to_string(), reason.to_string())])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
