//! Continuous batching (`engine` + `scheduler`): a sequence decoded in a
//! batch with others gives token for token, logprob for logprob, what it
//! gives decoded alone; a long prompt does not stall the decoding streams;
//! a cancelled sequence leaves the batch at once; drafts from the
//! cross-request continuation cache change no output, batched or alone. The engine checks the
//! KV-cache invariant of every sequence after every iteration and fails
//! the sequence (an `Error` event) if it breaks, so every test here also
//! asserts that invariant.
//!
//! Runs the shipped model (models/default) and its drafter, with prompts
//! from the shipped prose fixture.

#[path = "common/skip.rs"]
mod skip;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use gpt_serve::checkpoint;
use gpt_serve::decode::proposer::{CacheOrFallback, Drafters, Plain, TreeDrafter};
use gpt_serve::decode::{GenParams, Generator, SuffixCache, TokenOut};
use gpt_serve::drafter::Drafter;
use gpt_serve::model::cpu::CpuGpt;
use gpt_serve::model::draft_head::DraftHead;
use gpt_serve::sampling::SamplingParams;
use gpt_serve::serving::engine::{Backend, Engine, EngineConfig, Event, Job, EVENT_BUFFER};
use gpt_serve::serving::metrics::Metrics;
use gpt_serve::serving::openai::{Output, Stopping, Validated};
use tokio::sync::{mpsc, Semaphore};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Shipped {
    model: CpuGpt,
    drafter: Drafter,
    eot: u32,
    text: Vec<u32>,
}

fn shipped() -> Option<Shipped> {
    let dir = root().join("models/default");
    if !dir.join("drafter.json").exists() {
        skip::skip("models/default (model and drafter) is absent");
        return None;
    }
    let loaded = checkpoint::load(&dir, &Device::Cpu).unwrap();
    let model = loaded.cpu(loaded.serving_dtype()).unwrap();
    let drafter = Drafter::load(&dir.join("drafter.json"), model.cfg.vocab_size).unwrap();
    let prose = std::fs::read_to_string(root().join("tests/fixtures/prose.txt")).unwrap();
    let text = loaded.tokenizer.encode(&prose).unwrap();
    Some(Shipped {
        model,
        drafter,
        eot: loaded.tokenizer.eot(),
        text,
    })
}

fn engine(max_active: usize, max_batch_rows: usize) -> Engine {
    engine_with(max_active, max_batch_rows, None)
}

fn engine_with(
    max_active: usize,
    max_batch_rows: usize,
    suffix_cache: Option<Arc<SuffixCache>>,
) -> Engine {
    let dir = root().join("models/default");
    let loaded = checkpoint::load(&dir, &Device::Cpu).unwrap();
    let dtype = loaded.serving_dtype();
    let vocab = loaded.config.model.vocab_size;
    let drafter = Drafter::load(&dir.join("drafter.json"), vocab).unwrap();
    // As served: the draft head drafts sampled requests, the trees greedy ones.
    let drafters = Drafters {
        tree: Some(drafter),
        head: DraftHead::load(&dir, &loaded.weights).unwrap(),
    };
    let engine = Engine::spawn(
        loaded,
        drafters,
        EngineConfig {
            max_active,
            max_batch_rows,
            backend: Backend::Cpu(dtype),
            cascade: false,
            draft_trees: true,
            row_costs: None,
            exit_margin: gpt_serve::decode::DEFAULT_EXIT_MARGIN,
            kv_cache: Default::default(),
            suffix_cache,
            fault: None,
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    while !engine.ready.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    engine
}

/// One request to the engine and what came back.
struct Run {
    prompt: Vec<u32>,
    params: GenParams,
    echo: Option<usize>,
    rx: mpsc::Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

/// Submits `prompt` as choice `params.choice` of a request; only a
/// prompt's first choice scores the prompt (echo), as the engine does.
fn submit(e: &Engine, prompt: Vec<u32>, params: GenParams, echo: Option<usize>) -> Run {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let cancel = Arc::new(AtomicBool::new(false));
    let choice = params.choice as usize;
    let mut params = params;
    let echo = echo.filter(|_| choice == 0);
    if let Some(k) = echo {
        params.logprobs = params.logprobs.or(Some(k));
    }
    let echo = echo.and(params.logprobs);
    let request = Validated::from_tokens(
        vec![prompt.clone()],
        choice + 1,
        params.sampling.clone(),
        Stopping {
            max_tokens: params.max_tokens,
            stop: Arc::new([]),
        },
        Output {
            logprobs: params.logprobs,
            echo: echo.is_some(),
            ..Default::default()
        },
        params.speculate,
    );
    let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
    e.submit(Job {
        request: Arc::new(request),
        prompt: 0,
        choice,
        events: tx,
        cancel: cancel.clone(),
        permit,
        deadline: Instant::now() + Duration::from_secs(600),
    })
    .unwrap();
    Run {
        prompt,
        params,
        echo,
        rx,
        cancel,
    }
}

/// Everything a run produced: echo, tokens with their iterations, and
/// whether it ended with `Done`.
#[derive(Default)]
struct Outcome {
    echo: Vec<Option<TokenOut>>,
    tokens: Vec<TokenOut>,
    iterations: Vec<usize>,
    done: bool,
}

fn collect(run: &mut Run) -> Outcome {
    let mut o = Outcome::default();
    while let Some(ev) = run.rx.blocking_recv() {
        match ev {
            Event::Started { echo } => o.echo = echo,
            Event::Tokens { tokens, iteration } => {
                o.iterations
                    .extend(std::iter::repeat_n(iteration, tokens.len()));
                o.tokens.extend(tokens);
            }
            Event::Done { .. } => o.done = true,
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    o
}

fn alone(s: &Shipped, run: &Run) -> (Vec<Option<TokenOut>>, Vec<TokenOut>) {
    let (mut g, echo) = Generator::new(
        &s.model,
        Box::new(TreeDrafter::new(&s.drafter)),
        &run.prompt,
        run.params.clone(),
        s.eot,
        run.echo,
    )
    .unwrap();
    (echo, g.run().unwrap())
}

fn params(max_tokens: usize, temperature: f32, seed: u64, choice: u32) -> GenParams {
    GenParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            seed,
            ..Default::default()
        },
        choice,
        logprobs: Some(2),
        ..Default::default()
    }
}

/// Sixteen requests of every shape: prompt lengths from 1 to the context
/// limit, several max_tokens, temperatures, seeds, choices (n) and echo.
fn sixteen(s: &Shipped) -> Vec<(Vec<u32>, GenParams, Option<usize>)> {
    let window = s.model.cfg.block_size;
    let lens = [
        1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 120, 150, 180, 200, 230, 0,
    ];
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let max_tokens = [8, 24, 40, 3][i % 4];
            let len = if len == 0 { window } else { len }.min(window - max_tokens);
            let at = (i * 29) % (s.text.len() - len);
            let temperature = [0.0, 0.8, 1.0, 0.0][(i / 2) % 4];
            let echo = (i % 5 == 0).then_some(2);
            let p = params(max_tokens, temperature, 7 + i as u64 % 3, (i % 2) as u32);
            (s.text[at..at + len].to_vec(), p, echo)
        })
        .collect()
}

fn assert_same(i: usize, got: &Outcome, want: &(Vec<Option<TokenOut>>, Vec<TokenOut>)) {
    assert!(got.done, "sequence {i} did not finish");
    assert_eq!(got.echo, want.0, "sequence {i}: echo logprobs differ");
    assert_eq!(
        got.tokens.len(),
        want.1.len(),
        "sequence {i}: token counts differ"
    );
    for (j, (a, b)) in got.tokens.iter().zip(&want.1).enumerate() {
        assert_eq!(a, b, "sequence {i}, token {j}: batched vs alone");
    }
}

#[test]
fn sixteen_staggered_sequences_in_a_batch_each_give_what_they_give_alone() {
    let Some(s) = shipped() else { return };
    let requests = sixteen(&s);
    // A roomy budget, then a tight one (chunked prompts, rotation, drafts
    // competing for rows).
    for (max_active, rows) in [(16, 64), (16, 8)] {
        let e = engine(max_active, rows);
        let mut runs: Vec<Run> = Vec::new();
        for (i, (prompt, p, echo)) in requests.iter().enumerate() {
            runs.push(submit(&e, prompt.clone(), p.clone(), *echo));
            if i % 4 == 3 {
                // Staggered: let the engine run a while before the next four.
                std::thread::sleep(Duration::from_millis(15));
            }
        }
        let got: Vec<Outcome> = runs.iter_mut().map(collect).collect();
        for (i, (run, o)) in runs.iter().zip(&got).enumerate() {
            assert_same(i, o, &alone(&s, run));
        }
        eprintln!("budget {rows} rows: 16 sequences as alone");
    }
}

#[test]
fn a_long_prompt_arriving_never_stalls_the_decoding_streams_for_more_than_two_iterations() {
    let Some(s) = shipped() else { return };
    let e = engine(16, 16);
    let streams: Vec<Run> = (0..8)
        .map(|i| {
            submit(
                &e,
                s.text[i * 7..i * 7 + 4].to_vec(),
                params(150, 0.8, i as u64, 0),
                None,
            )
        })
        .collect();
    // Wait until every stream decodes, then send a 220-token prompt.
    let mut first = Vec::new();
    let mut streams = streams;
    for r in streams.iter_mut() {
        loop {
            match r.rx.blocking_recv() {
                Some(Event::Tokens { iteration, .. }) => {
                    first.push(iteration);
                    break;
                }
                Some(Event::Started { .. }) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // Every stream's client keeps reading (a sequence whose client does
    // not read pauses, which is not what this test is about).
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut r| std::thread::spawn(move || collect(&mut r)))
        .collect();
    let mut long = submit(&e, s.text[100..320].to_vec(), params(4, 0.0, 0, 0), None);
    let long_out = collect(&mut long);
    assert!(long_out.done);
    let started = long_out.iterations[0];
    let mut checked = 0;
    for (i, reader) in readers.into_iter().enumerate() {
        let o = reader.join().unwrap();
        let mut last = first[i];
        for &it in o.iterations.iter().filter(|&&it| it <= started) {
            assert!(
                it <= last + 2,
                "stream {i} got no token from iteration {last} to {it} while the prompt was in"
            );
            last = it;
            checked += 1;
        }
    }
    // The prompt (220 rows at most 16 per forward, minus 8 pending rows)
    // took many iterations: the streams were checked across all of them.
    assert!(
        started >= first.iter().max().unwrap() + 220 / 8,
        "prefill took {started} iterations"
    );
    assert!(
        checked > 8 * 10,
        "only {checked} stream tokens during the prefill"
    );
}

#[test]
fn a_cancelled_or_abandoned_sequence_leaves_the_batch_at_the_next_iteration() {
    let Some(s) = shipped() else { return };
    let e = engine(8, 64);
    let mut runs: Vec<Run> = (0..4)
        .map(|i| {
            submit(
                &e,
                s.text[i * 11..i * 11 + 6].to_vec(),
                params(120, 0.0, 1, 0),
                None,
            )
        })
        .collect();
    // Run 0 is cancelled (stop string or timeout) after its first tokens;
    // run 1's client disconnects.
    let mut cancelled_at = None;
    while let Some(ev) = runs[0].rx.blocking_recv() {
        if let Event::Tokens { iteration, .. } = ev {
            runs[0]
                .cancel
                .store(true, std::sync::atomic::Ordering::SeqCst);
            cancelled_at = Some(iteration);
            break;
        }
    }
    // Iterations the engine had already sent when the flag was set (a
    // loaded machine lets it run ahead of this thread) are not late.
    let mut sent = cancelled_at.unwrap();
    while let Ok(ev) = runs[0].rx.try_recv() {
        match ev {
            Event::Tokens { iteration, .. } => sent = sent.max(iteration),
            Event::Done { .. } => panic!("a cancelled sequence ran to its end"),
            _ => {}
        }
    }
    let abandoned = runs.remove(1);
    drop(abandoned.rx);
    // Whatever run 0 still receives comes from at most the iteration that
    // was running when it was cancelled; then the engine drops it (the
    // channel closes without `Done`).
    let rest = collect(&mut runs[0]);
    assert!(!rest.done, "a cancelled sequence ran to its end");
    assert!(
        rest.iterations.iter().all(|&it| it <= sent + 1),
        "{:?} after {sent}",
        rest.iterations
    );
    // The others are unaffected.
    for (i, r) in runs.iter_mut().enumerate().skip(1) {
        let o = collect(r);
        assert_same(i, &o, &alone(&s, r));
    }
}

/// What plain decoding (no drafts) gives for `run`'s prompt and params.
fn plain_alone(s: &Shipped, prompt: &[u32], params: &GenParams) -> Vec<TokenOut> {
    let (mut g, _) = Generator::new(
        &s.model,
        Box::new(Plain),
        prompt,
        params.clone(),
        s.eot,
        None,
    )
    .unwrap();
    g.run().unwrap()
}

/// Four requests (greedy and t=0.8, two seeds) over four prompts of the
/// prose fixture.
fn four_repeatable(s: &Shipped) -> Vec<(Vec<u32>, GenParams)> {
    (0..4)
        .map(|i| {
            let at = 40 + i * 97;
            let temperature = [0.0, 0.8][i % 2];
            let mut p = params(40, temperature, 11 + i as u64, 0);
            p.stop_at_eot = false;
            (s.text[at..at + 32].to_vec(), p)
        })
        .collect()
}

#[test]
fn requests_repeated_through_the_engine_draft_from_the_continuation_cache_and_give_plain_output() {
    let Some(s) = shipped() else { return };
    let cache = Arc::new(SuffixCache::new(4096));
    let e = engine_with(8, 64, Some(cache.clone()));
    let requests = four_repeatable(&s);
    for round in 0..2 {
        let mut runs: Vec<Run> = requests
            .iter()
            .map(|(prompt, p)| submit(&e, prompt.clone(), p.clone(), None))
            .collect();
        for (i, r) in runs.iter_mut().enumerate() {
            let got = collect(r);
            assert!(got.done, "round {round}, sequence {i} did not finish");
            assert_eq!(
                got.tokens,
                plain_alone(&s, &r.prompt, &r.params),
                "round {round}, sequence {i}"
            );
        }
        if round == 0 {
            assert_eq!(cache.sequences(), 4, "every finished sequence is stored");
        }
    }
    let t = cache.totals();
    eprintln!(
        "cache drafts: {} verified, {} accepted",
        t.verified, t.accepted
    );
    // The second round repeats the first with the same seeds: the cache
    // holds each output, and its drafts are accepted.
    assert!(t.accepted > 0 && t.accepted * 2 > t.verified, "{t:?}");
}

#[test]
fn a_sequence_alone_drafting_from_the_continuation_cache_gives_plain_output() {
    let Some(s) = shipped() else { return };
    let cache = Arc::new(SuffixCache::new(4096));
    for (prompt, p) in four_repeatable(&s) {
        let want = plain_alone(&s, &prompt, &p);
        cache.insert(&[&prompt[..], &want.iter().map(|t| t.id).collect::<Vec<_>>()].concat());
        // The same request again, and with another seed (its own text:
        // the cache's drafts then fail where the samples part).
        for seed in [p.sampling.seed, p.sampling.seed + 100] {
            let mut p = p.clone();
            p.sampling.seed = seed;
            let tree = Box::new(TreeDrafter::new(&s.drafter));
            let proposer = Box::new(CacheOrFallback::new(cache.clone(), tree));
            let (mut g, _) =
                Generator::new(&s.model, proposer, &prompt, p.clone(), s.eot, None).unwrap();
            assert_eq!(
                g.run().unwrap(),
                plain_alone(&s, &prompt, &p),
                "seed {seed}"
            );
        }
    }
    let t = cache.totals();
    eprintln!(
        "cache drafts: {} verified, {} accepted",
        t.verified, t.accepted
    );
    assert!(t.accepted > 0 && t.accepted * 2 > t.verified, "{t:?}");
}
