//! One completion request's choices, built from their sequences' engine
//! events: text through the streaming decoder and stop strings, logprobs,
//! finish reasons, usage. [`Completion::apply`] turns each event into
//! [`Delta`]s; the JSON response concatenates them and the event stream
//! sends them as chunks, so both read the events the same way.
//!
//! With echo and logprobs, only a prompt's first choice has its prompt
//! scored by the engine; its siblings take that score here, holding their
//! events back until it arrives.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::decode::{Finish, SpecStats, TokenOut};
use crate::serving::engine::Event;
use crate::serving::metrics::Metrics;
use crate::serving::openai::{ApiError, Choice, Logprobs, Usage, Validated};
use crate::serving::stop::{Piece, StopText};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What one event adds to one choice.
#[derive(Debug, Default)]
pub struct Delta {
    pub index: usize,
    pub text: String,
    /// New logprobs entries (None: logprobs were not asked for).
    pub logprobs: Option<Logprobs>,
    /// Set once, on the choice's last delta.
    pub finish: Option<&'static str>,
}

impl Delta {
    /// Nothing yet for choice `index` (an empty logprobs record when the
    /// request asked for logprobs).
    pub fn new(index: usize, v: &Validated) -> Self {
        Delta {
            index,
            logprobs: v.output.logprobs.map(|_| Logprobs::default()),
            ..Default::default()
        }
    }

    /// Nothing to tell the client.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
            && self.finish.is_none()
            && self.logprobs.as_ref().is_none_or(|l| l.tokens.is_empty())
    }

    pub fn into_choice(self) -> Choice {
        Choice {
            text: self.text,
            index: self.index,
            logprobs: self.logprobs,
            finish_reason: self.finish.map(str::to_string),
        }
    }

    /// Appends a later delta of the same choice.
    pub fn absorb(&mut self, d: Delta) {
        self.text.push_str(&d.text);
        match (&mut self.logprobs, d.logprobs) {
            (Some(all), Some(new)) => {
                all.tokens.extend(new.tokens);
                all.token_logprobs.extend(new.token_logprobs);
                all.top_logprobs.extend(new.top_logprobs);
                all.text_offset.extend(new.text_offset);
            }
            (all, new) => *all = all.take().or(new),
        }
        self.finish = self.finish.or(d.finish);
    }
}

/// Text, logprobs and finish state of one choice.
pub struct ChoiceState {
    index: usize,
    prompt: usize,
    decoder: StreamDecoder,
    stop: StopText,
    /// Text bytes so far (logprobs' `text_offset`).
    offset: usize,
    completion_tokens: usize,
    finish: Option<&'static str>,
    cancel: Arc<AtomicBool>,
    stats: SpecStats,
}

impl ChoiceState {
    pub fn new(index: usize, prompt: usize, stop: Arc<[String]>, cancel: Arc<AtomicBool>) -> Self {
        Self {
            index,
            prompt,
            decoder: StreamDecoder::new(),
            stop: StopText::new(stop),
            offset: 0,
            completion_tokens: 0,
            finish: None,
            cancel,
            stats: SpecStats::default(),
        }
    }

    fn delta(&self, v: &Validated) -> Delta {
        Delta::new(self.index, v)
    }

    fn push_logprob(
        &mut self,
        tok: &Tokenizer,
        d: &mut Delta,
        t: Option<&TokenOut>,
        id: u32,
        len: usize,
    ) {
        if let Some(lp) = &mut d.logprobs {
            lp.tokens.push(tok.token_text(id));
            lp.token_logprobs.push(t.and_then(|t| t.logprob));
            lp.top_logprobs.push(t.map(|t| top_map(tok, &t.top)));
            lp.text_offset.push(self.offset);
        }
        self.offset += len;
    }

    /// The prompt's own tokens (echo), with their scores when known.
    fn started(&mut self, tok: &Tokenizer, v: &Validated, scores: &[Option<TokenOut>]) -> Delta {
        let mut d = self.delta(v);
        if v.output.echo {
            let prompt = &v.prompts[self.prompt];
            for (i, (id, text)) in prompt.iter().zip(tok.token_texts(prompt)).enumerate() {
                let score = scores.get(i).and_then(Option::as_ref);
                self.push_logprob(tok, &mut d, score, *id, text.len());
                d.text.push_str(&text);
            }
        }
        d
    }

    fn tokens(&mut self, tok: &Tokenizer, v: &Validated, tokens: Vec<TokenOut>) -> Delta {
        let mut d = self.delta(v);
        for t in tokens {
            if self.finish.is_some() {
                break;
            }
            self.completion_tokens += 1;
            // End-of-text ends the choice; like OpenAI and vLLM, it is not
            // part of the text (finish_reason says "stop").
            let piece = match t.id == tok.eot() {
                true => String::new(),
                false => self.decoder.push(tok, t.id),
            };
            let (text, stopped) = match self.stop.push(&piece) {
                Piece::Text(s) => (s, false),
                Piece::Stopped(s) => (s, true),
            };
            self.push_logprob(tok, &mut d, Some(&t), t.id, piece.len());
            d.text.push_str(&text);
            if stopped {
                self.finish = Some("stop");
                d.finish = self.finish;
                self.cancel.store(true, Ordering::Relaxed);
            }
        }
        d
    }

    fn done(&mut self, tok: &Tokenizer, v: &Validated, finish: Finish, stats: SpecStats) -> Delta {
        let mut d = self.delta(v);
        self.stats = stats;
        if self.finish.is_some() {
            return d;
        }
        let rest = self.decoder.flush(tok);
        self.finish = Some(match self.stop.push(&rest) {
            Piece::Text(s) => {
                d.text = s + &self.stop.flush();
                match finish {
                    Finish::Eot => "stop",
                    Finish::Length => "length",
                }
            }
            Piece::Stopped(s) => {
                d.text = s;
                "stop"
            }
        });
        d.finish = self.finish;
        d
    }
}

fn top_map(tok: &Tokenizer, top: &[(u32, f32)]) -> BTreeMap<String, f32> {
    top.iter()
        .map(|(id, lp)| (tok.token_text(*id), *lp))
        .collect()
}

/// Every choice of one request, and the events that build them.
pub struct Completion {
    pub request: Arc<Validated>,
    choices: Vec<ChoiceState>,
    receivers: Vec<mpsc::Receiver<Event>>,
    /// Each prompt's scored tokens, from its first choice (echo with
    /// logprobs only).
    scores: Vec<Option<Vec<Option<TokenOut>>>>,
    /// Events of choices waiting for their prompt's scores.
    held: Vec<VecDeque<Event>>,
    started: Instant,
    last_tokens: Option<Instant>,
}

impl Completion {
    pub fn new(
        request: Arc<Validated>,
        choices: Vec<ChoiceState>,
        receivers: Vec<mpsc::Receiver<Event>>,
    ) -> Self {
        let held = choices.iter().map(|_| VecDeque::new()).collect();
        Self {
            scores: vec![None; request.prompts.len()],
            request,
            choices,
            receivers,
            held,
            started: Instant::now(),
            last_tokens: None,
        }
    }

    /// The sequences' events, merged, each with its choice's index.
    pub fn events(&mut self) -> impl Stream<Item = (usize, Event)> + Unpin + use<> {
        futures::stream::select_all(
            std::mem::take(&mut self.receivers)
                .into_iter()
                .enumerate()
                .map(|(i, rx)| ReceiverStream::new(rx).map(move |e| (i, e))),
        )
    }

    /// Stops every sequence of this request (client gone, timeout).
    pub fn cancel(&self) {
        for c in &self.choices {
            c.cancel.store(true, Ordering::Relaxed);
        }
    }

    fn needs_scores(&self) -> bool {
        self.request.output.echo && self.request.output.logprobs.is_some()
    }

    /// What an event of choice `i` adds (and, for a prompt's first choice
    /// starting, what its held-back siblings add). Metrics of tokens and
    /// finishes are recorded here.
    pub fn apply(
        &mut self,
        tok: &Tokenizer,
        m: &Metrics,
        i: usize,
        ev: Event,
    ) -> Result<Vec<Delta>, ApiError> {
        let n = self.request.n;
        let (prompt, first) = (i / n, i.is_multiple_of(n));
        if self.needs_scores() && !first && self.scores[prompt].is_none() {
            self.held[i].push_back(ev);
            return Ok(vec![]);
        }
        if let (Event::Started { echo }, true) = (&ev, self.needs_scores() && first) {
            self.scores[prompt] = Some(echo.clone());
        }
        let mut out = vec![self.apply_one(tok, m, i, ev)?];
        if self.needs_scores() && first {
            for sibling in i + 1..i + n {
                while let Some(ev) = self.held[sibling].pop_front() {
                    out.push(self.apply_one(tok, m, sibling, ev)?);
                }
            }
        }
        Ok(out)
    }

    fn apply_one(
        &mut self,
        tok: &Tokenizer,
        m: &Metrics,
        i: usize,
        ev: Event,
    ) -> Result<Delta, ApiError> {
        let v = self.request.clone();
        let c = &mut self.choices[i];
        let d = match ev {
            Event::Started { echo } => match &self.scores[c.prompt] {
                Some(scores) => c.started(tok, &v, scores),
                None => c.started(tok, &v, &echo),
            },
            Event::Tokens { tokens, .. } => {
                self.record_tokens(m, tokens.len());
                self.choices[i].tokens(tok, &v, tokens)
            }
            Event::Done { finish, stats } => c.done(tok, &v, finish, stats),
            Event::Error(e) => {
                tracing::error!("generation failed: {e}");
                return Err(ApiError::Internal {
                    message: "generation failed".into(),
                });
            }
        };
        if let Some(f) = d.finish {
            m.finished(f);
        }
        Ok(d)
    }

    fn record_tokens(&mut self, m: &Metrics, n: usize) {
        let now = Instant::now();
        match self.last_tokens {
            None => m
                .ttft
                .observe(now.duration_since(self.started).as_secs_f64()),
            Some(prev) => {
                let per = now.duration_since(prev).as_secs_f64() / n.max(1) as f64;
                for _ in 0..n {
                    m.itl.observe(per);
                }
            }
        }
        self.last_tokens = Some(now);
        m.generation_tokens.inc_by(n as u64);
    }

    /// The events ended: every choice must have finished, or the engine
    /// stopped before it did (never a truncated success).
    pub fn finish(&self, m: &Metrics) -> Result<(), ApiError> {
        if self.choices.iter().any(|c| c.finish.is_none()) {
            tracing::error!("a sequence ended without finishing: the engine stopped");
            return Err(ApiError::Internal {
                message: "the engine stopped before finishing this completion".into(),
            });
        }
        m.e2e.observe(self.started.elapsed().as_secs_f64());
        Ok(())
    }

    pub fn usage(&self) -> Usage {
        let prompt_tokens =
            self.request.prompts.iter().map(Vec::len).sum::<usize>() * self.request.n;
        let completion_tokens = self.choices.iter().map(|c| c.completion_tokens).sum();
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }

    /// Speculative decoding counters over every choice (`spec_stats`).
    pub fn spec_stats(&self) -> Option<serde_json::Value> {
        if !self.request.output.spec_stats {
            return None;
        }
        let mut total = SpecStats::default();
        for c in &self.choices {
            total.add(&c.stats);
        }
        let mut v = serde_json::to_value(&total).unwrap_or_default();
        v["mean_accepted_per_step"] =
            serde_json::json!(total.accepted as f64 / total.steps.max(1) as f64);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;
    use crate::serving::openai::{Output, Stopping};

    fn shipped_tokenizer() -> Option<Tokenizer> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).ok();
        if tok.is_none() {
            eprintln!("skipping: models/default/tokenizer.json is absent");
        }
        tok
    }

    fn token(id: u32, logprob: f32) -> TokenOut {
        TokenOut {
            id,
            logprob: Some(logprob),
            top: vec![],
            gap: 1.0,
        }
    }

    /// A completion of one prompt with `n` choices; echo with logprobs
    /// when `echo`.
    fn completion(prompt: Vec<u32>, n: usize, echo: bool) -> Completion {
        let v = Validated::from_tokens(
            vec![prompt],
            n,
            SamplingParams::default(),
            Stopping {
                max_tokens: 16,
                stop: Arc::new([]),
            },
            Output {
                logprobs: Some(1),
                echo,
                ..Default::default()
            },
            true,
        );
        let choices = (0..n)
            .map(|i| ChoiceState::new(i, 0, Arc::new([]), Arc::new(AtomicBool::new(false))))
            .collect();
        Completion::new(Arc::new(v), choices, vec![])
    }

    fn text(deltas: &[Delta]) -> String {
        deltas.iter().map(|d| d.text.as_str()).collect()
    }

    #[test]
    fn a_choice_that_ends_on_end_of_text_leaves_it_out_of_the_text() {
        let Some(tok) = shipped_tokenizer() else {
            return;
        };
        let ids = tok.encode("The house").unwrap();
        let mut c = completion(vec![1], 1, false);
        let m = Metrics::new();
        let mut tokens: Vec<TokenOut> = ids.iter().map(|&id| token(id, -1.0)).collect();
        tokens.push(token(tok.eot(), -1.0));
        let mut out = c
            .apply(
                &tok,
                &m,
                0,
                Event::Tokens {
                    tokens,
                    iteration: 0,
                },
            )
            .unwrap();
        let done = Event::Done {
            finish: Finish::Eot,
            stats: SpecStats::default(),
        };
        out.extend(c.apply(&tok, &m, 0, done).unwrap());
        assert_eq!(text(&out), "The house");
        assert_eq!(out.last().unwrap().finish, Some("stop"));
        assert_eq!(c.usage().completion_tokens, ids.len() + 1);
    }

    #[test]
    fn a_prompts_other_choices_take_its_first_choices_scores_even_when_they_start_first() {
        let Some(tok) = shipped_tokenizer() else {
            return;
        };
        let prompt = tok.encode("It was a dark night").unwrap();
        let m = Metrics::new();
        let mut c = completion(prompt.clone(), 3, true);
        let scores: Vec<Option<TokenOut>> = std::iter::once(None)
            .chain(prompt[1..].iter().map(|&id| Some(token(id, -0.5))))
            .collect();
        // Choice 2 starts and decodes before choice 0: it waits.
        let early = Event::Tokens {
            tokens: vec![token(prompt[0], -2.0)],
            iteration: 1,
        };
        assert!(c
            .apply(&tok, &m, 2, Event::Started { echo: vec![] })
            .unwrap()
            .is_empty());
        assert!(c.apply(&tok, &m, 2, early).unwrap().is_empty());
        // Choice 0 starts with the scores: it and choice 2 come out, in order.
        let out = c
            .apply(&tok, &m, 0, Event::Started { echo: scores })
            .unwrap();
        let echoed: Vec<&Delta> = out.iter().filter(|d| !d.text.is_empty()).collect();
        assert_eq!(
            out.iter().map(|d| d.index).collect::<Vec<_>>(),
            vec![0, 2, 2]
        );
        assert_eq!(echoed[0].text, "It was a dark night");
        assert_eq!(
            echoed[0].logprobs, echoed[1].logprobs,
            "choice 2 got other scores"
        );
        let lp = echoed[1].logprobs.as_ref().unwrap();
        assert_eq!(lp.token_logprobs[0], None);
        assert_eq!(lp.token_logprobs[1], Some(-0.5));
        // Choice 1, starting later, takes the scores at once.
        let late = c
            .apply(&tok, &m, 1, Event::Started { echo: vec![] })
            .unwrap();
        assert_eq!(late[0].logprobs, echoed[0].logprobs);
    }
}
