//! The scheduling of one generation (what [`generate_in_flight`](crate::generate::generate_in_flight)
//! runs): continuous batching over `max_batch` slots, one prefill per distinct prompt shared by
//! its samples, whole blocks shared between prompts that begin alike, admission within the KV
//! budget, preemption when a sequence cannot grow.
//!
//! Each loop: [`Scheduler::admit`] fills free slots (samples of a prompt already prefilled fork
//! its cache and draw their first token from its logits; a new prompt gets a prefix to prefill in
//! this step, over the blocks prompts prefilled before published for its first positions, or
//! waits a step for a prompt being prefilled that begins like it; preempted sequences come back
//! first), then [`Scheduler::step`] reserves room for
//! every sequence's new tokens (preempting the youngest sequence while the pool is short) and
//! runs one forward call over the prefixes' prompts and everyone's pending tokens.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use grail_core::model::{CausalLm, PagedKvCache};
use grail_protocol::PolicyVersion;
use grail_protocol::proof::SketchCoefficients;
use rand::rngs::StdRng;

use crate::error::RolloutError;
use crate::generate::{
    Decoder, Generated, GenerationConfig, GenerationRequest, GenerationStats, Policy, finish_reason,
};
use crate::sampling::{sample_rng, sample_token};
use crate::sequence_kv::{KvStore, SequenceKv};

/// A sequence being generated.
struct Active {
    request: GenerationRequest,
    kv: SequenceKv,
    /// Tokens to feed in the next forward call (the prompt and tokens so far after a
    /// preemption or weight switch, else the last sampled token).
    pending: Vec<u32>,
    ids: Vec<u32>,
    logps: Vec<f32>,
    versions: Vec<PolicyVersion>,
    /// The GRAIL sketch of the hidden state each token was sampled from (when asked for).
    sketches: Vec<u32>,
    rng: StdRng,
    /// Admission order: the youngest sequence is preempted first.
    admitted: u64,
}

/// A prompt prefilled once for all its samples.
struct Prefix {
    kv: SequenceKv,
    /// Leading positions read from blocks other prompts published: its prefill computes the rest.
    shared: usize,
    /// Logits after the prompt's last token; `None` until the step that prefills it.
    logits: Option<Vec<f32>>,
    /// The GRAIL sketch of the hidden state they come from, when asked for (set with them).
    sketch: Option<u32>,
    /// Whether a sample has forked it yet (later ones count as shared prompt tokens).
    forked: bool,
    /// Whether its last queued sample has forked it: it goes at the end of the admission, so
    /// the prompts admitted after its samples can still share its published blocks.
    spent: bool,
}

/// The state of one generation.
pub(crate) struct Scheduler<'a> {
    cfg: &'a GenerationConfig,
    decode: Option<Decoder<'a>>,
    store: KvStore,
    slots: Vec<Option<Active>>,
    /// Requests not admitted yet, in order, and how many of them each prompt has.
    queue: VecDeque<GenerationRequest>,
    queued: HashMap<Arc<Vec<u32>>, usize>,
    /// Preempted sequences, oldest first: they return before any new request.
    preempted: VecDeque<Active>,
    /// Prompts prefilled for their samples (ordered: each step's batch is the same every run).
    prefixes: BTreeMap<Arc<Vec<u32>>, Prefix>,
    admissions: u64,
    occupancy: usize,
    stats: GenerationStats,
}

impl<'a> Scheduler<'a> {
    /// A scheduler for `requests` with `model`'s cache layout, its KV pool sized from
    /// `cfg.kv_cache_bytes` (checked to hold at least one full sequence).
    pub(crate) fn new(
        model: &CausalLm,
        cfg: &'a GenerationConfig,
        decode: Option<Decoder<'a>>,
        queue: VecDeque<GenerationRequest>,
    ) -> Result<Self, RolloutError> {
        if let Some(r) = queue.iter().find(|r| r.prompt.is_empty()) {
            return Err(RolloutError::prompt(r.prompt_id, "empty"));
        }
        let longest = queue.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let block_size = cfg.kv_block_size;
        let blocks = |positions: usize| positions.div_ceil(block_size);
        // One full sequence, plus a copy of the shared partial block it writes into.
        let one_sequence = blocks(longest + cfg.max_completion_length) + 1;
        let per_block = PagedKvCache::bytes_per_block(&model.config, block_size);
        let num_blocks = match cfg.kv_cache_bytes {
            Some(bytes) => bytes / per_block,
            // Every slot's sequence and a prompt prefix per slot.
            None => cfg.max_batch * (one_sequence + blocks(longest)),
        };
        // Checked before the pool is allocated (in device memory on a GPU backend).
        if model.supports_paged_kv() && num_blocks < one_sequence {
            return Err(RolloutError::config(
                "kv_cache_bytes",
                format!("{}", cfg.kv_cache_bytes.unwrap_or(0)),
                format!(
                    "holds {num_blocks} blocks of {block_size} positions; one sequence (longest \
                     prompt {longest} + max_completion_length {}) needs {one_sequence}, {} bytes",
                    cfg.max_completion_length,
                    one_sequence * per_block
                ),
            ));
        }
        let store = KvStore::for_model(model, num_blocks, block_size);
        let mut queued = HashMap::new();
        for r in &queue {
            *queued.entry(r.prompt.clone()).or_insert(0) += 1;
        }
        let (kv_blocks, _) = store.usage();
        Ok(Self {
            cfg,
            decode,
            store,
            slots: (0..cfg.max_batch).map(|_| None).collect(),
            queue,
            queued,
            preempted: VecDeque::new(),
            prefixes: BTreeMap::new(),
            admissions: 0,
            occupancy: 0,
            stats: GenerationStats {
                kv_blocks,
                ..GenerationStats::default()
            },
        })
    }

    /// Fills free slots: preempted sequences first (re-prefilled), then queued requests in order
    /// (forking a prefilled prompt, or opening its prefix for this step's forward). A request
    /// waits while the pool lacks room for it and a block per running sequence; a prompt that
    /// waits holds back the new prompts behind it, not samples of prompts prefilled. Returns whether
    /// there is work for a forward call.
    pub(crate) fn admit(
        &mut self,
        version: PolicyVersion,
        on_done: &mut impl FnMut(Generated),
    ) -> Result<bool, RolloutError> {
        let mut open = self.slots.iter().filter(|s| s.is_none()).count();
        while open > 0 && !self.preempted.is_empty() {
            let a = &self.preempted[0];
            let positions = a.request.prompt.len() + a.ids.len();
            if !self.room_for(self.store.blocks_for(positions)) {
                return Ok(self.has_work());
            }
            let mut a = self.preempted.pop_front().expect("checked");
            a.pending = a.request.prompt.iter().chain(&a.ids).copied().collect();
            self.stats.reprefill_tokens += positions;
            self.place(a);
            open -= 1;
        }
        // A new prompt that does not fit stops the new prompts behind it (they keep their order),
        // not the samples of prompts already prefilled: those only need a block each.
        let mut prompts_blocked = false;
        let mut i = 0;
        while open > 0 && i < self.queue.len() {
            let prompt = self.queue[i].prompt.clone();
            match self.prefixes.get(&prompt) {
                Some(p) if p.logits.is_some() => {
                    // The block its first token goes to is the one the prefix is owed.
                    if !self.room_for(0) {
                        break;
                    }
                    let request = self.queue.remove(i).expect("in range");
                    if self.fork(request, version, on_done) {
                        open -= 1;
                    }
                }
                // Prefilled in this step: the request waits one step for it.
                Some(_) => {
                    open -= 1;
                    i += 1;
                }
                None => {
                    // A prompt that begins like one prefilled in this step waits a step to read
                    // that prompt's blocks instead of computing them again.
                    let shares_pending = self.cfg.enable_prefix_caching
                        && self.prefixes.iter().any(|(p, x)| {
                            x.logits.is_none() && self.store.would_share_more(p, &prompt)
                        });
                    if shares_pending {
                        i += 1;
                        continue;
                    }
                    // The prompt's blocks and the one its first sample will be owed.
                    if prompts_blocked || !self.room_for(self.store.blocks_for(prompt.len()) + 1) {
                        prompts_blocked = true;
                        i += 1;
                        continue;
                    }
                    let (mut kv, shared) = self.store.share_published(&prompt);
                    self.store
                        .reserve(&mut kv, prompt.len() - shared)
                        .expect("room was checked");
                    let prefix = Prefix {
                        kv,
                        shared,
                        logits: None,
                        sketch: None,
                        forked: false,
                        spent: false,
                    };
                    self.prefixes.insert(prompt, prefix);
                    open -= 1;
                    i += 1;
                }
            }
        }
        let spent = self.drop_prefixes(|p| p.spent);
        let waiting = !(self.queue.is_empty() && self.preempted.is_empty());
        if waiting && !self.has_work() {
            // Nothing runs and nothing was admitted: only idle prefixes (the spent ones just
            // dropped included) can be holding the pool (one sequence always fits, checked at
            // the start).
            if spent == 0 && self.drop_prefixes(|_| true) == 0 {
                return Err(RolloutError::config(
                    "kv_cache_bytes",
                    format!("{:?}", self.cfg.kv_cache_bytes),
                    "no waiting sequence fits the empty KV cache",
                ));
            }
            return self.admit(version, on_done);
        }
        Ok(self.has_work())
    }

    /// New weights: cached keys/values are stale. Published blocks are forgotten, prefilled
    /// prefixes are dropped (their samples still queued prefill again), a prefix that would read
    /// shared blocks prefills its whole prompt, and every sequence with tokens re-prefills
    /// prompt + tokens.
    pub(crate) fn switch_weights(&mut self) {
        self.stats.weight_switches += 1;
        self.store.unpublish_all();
        self.drop_prefixes(|p| p.logits.is_some());
        // A prefix about to prefill over shared blocks would read stale keys: it prefills its
        // whole prompt instead, in blocks of its own (dropped if the pool has none to give).
        let mut stale = Vec::new();
        for (prompt, p) in self.prefixes.iter_mut().filter(|(_, p)| p.shared > 0) {
            self.store.free(&mut p.kv);
            p.shared = 0;
            if self.store.reserve(&mut p.kv, prompt.len()).is_err() {
                stale.push(prompt.clone());
            }
        }
        for prompt in stale {
            self.prefixes.remove(&prompt);
        }
        for a in self.slots.iter_mut().flatten() {
            // Nothing cached yet (a fresh sample or a returning preempted sequence): what it
            // feeds next is already prompt + tokens, to be computed with the new weights.
            if a.ids.is_empty() || a.kv.is_empty() {
                continue;
            }
            self.store.free(&mut a.kv);
            a.pending = a.request.prompt.iter().chain(&a.ids).copied().collect();
            self.stats.reprefill_tokens += a.pending.len();
        }
    }

    /// One forward call: room for every pending token (preempting while short), then the
    /// prefixes' prompts and the sequences' pending tokens together; prefixes keep their logits,
    /// sequences sample their next token.
    pub(crate) fn step(
        &mut self,
        policy: &Policy,
        on_done: &mut impl FnMut(Generated),
    ) -> Result<(), RolloutError> {
        self.reserve_pending();
        // Each prompt to prefill, and how many of its positions published blocks already hold.
        let prompts: Vec<(Arc<Vec<u32>>, usize)> = self
            .prefixes
            .iter()
            .filter(|(_, p)| p.logits.is_none())
            .map(|(prompt, p)| (prompt.clone(), p.shared))
            .collect();
        let rows: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .collect();
        let mut inputs: Vec<&[u32]> = prompts.iter().map(|(p, shared)| &p[*shared..]).collect();
        // The same walk of the unchanged map as `prompts`: the same order.
        let mut kvs: Vec<&mut SequenceKv> = Vec::with_capacity(prompts.len() + rows.len());
        for prefix in self.prefixes.values_mut() {
            if prefix.logits.is_none() {
                kvs.push(&mut prefix.kv);
            }
        }
        for slot in self.slots.iter_mut().flatten() {
            inputs.push(&slot.pending);
            kvs.push(&mut slot.kv);
        }
        if inputs.is_empty() {
            return Ok(());
        }
        self.stats.prefill_tokens += prompts.iter().map(|(p, s)| p.len() - s).sum::<usize>();
        self.stats.shared_prompt_tokens += prompts.iter().map(|(_, s)| s).sum::<usize>();
        let coefficients = (self.cfg.sketch_seed)
            .map(|seed| SketchCoefficients::for_version(&seed, policy.version));
        let (logits, sketches) =
            self.store
                .forward(&policy.model, &inputs, &mut kvs, coefficients.as_ref())?;
        let vocab = logits.len() / inputs.len();
        self.stats.steps += 1;
        self.occupancy += inputs.len();
        let mut row = logits.chunks_exact(vocab);
        // One per row when asked for, else none.
        let mut sketches = sketches.into_iter();
        for (prompt, _) in &prompts {
            let prefix = self.prefixes.get_mut(prompt).expect("prefilled now");
            prefix.logits = Some(row.next().expect("a row per input").to_vec());
            prefix.sketch = sketches.next();
            if self.cfg.enable_prefix_caching {
                self.store.publish(&prefix.kv, prompt);
            }
        }
        for i in rows {
            let logits = row.next().expect("a row per input");
            let mut a = self.slots[i].take().expect("active");
            a.pending.clear();
            let sketch = sketches.next();
            if let Some(a) = self.push_token(a, logits, sketch, policy.version, on_done) {
                self.slots[i] = Some(a);
            }
        }
        Ok(())
    }

    /// The counters, once nothing is left.
    pub(crate) fn finish(mut self) -> GenerationStats {
        self.drop_prefixes(|_| true);
        self.stats.mean_batch = self.occupancy as f64 / self.stats.steps.max(1) as f64;
        self.stats.kv_blocks_peak = self.store.usage().1;
        self.stats
    }

    /// Admits `request` as a sample of its prefilled prompt: shares the prompt's cache and draws
    /// its first token from the prompt's logits. Returns whether it took a slot (it may finish at
    /// once). The prefix is spent when its last queued sample has forked it.
    fn fork(
        &mut self,
        request: GenerationRequest,
        version: PolicyVersion,
        on_done: &mut impl FnMut(Generated),
    ) -> bool {
        let prompt = request.prompt.clone();
        let prefix = self.prefixes.get_mut(&prompt).expect("prefilled");
        if prefix.forked {
            self.stats.shared_prompt_tokens += prompt.len();
        }
        prefix.forked = true;
        let kv = self.store.fork(&prefix.kv);
        let logits = prefix.logits.clone().expect("prefilled");
        let sketch = prefix.sketch;
        let left = self.queued.get_mut(&prompt).expect("counted");
        *left -= 1;
        if *left == 0 {
            self.queued.remove(&prompt);
            self.prefixes.get_mut(&prompt).expect("present").spent = true;
        }
        self.admissions += 1;
        let a = Active {
            rng: sample_rng(self.cfg.seed, request.prompt_id, request.sample_index),
            kv,
            pending: Vec::new(),
            ids: Vec::new(),
            logps: Vec::new(),
            versions: Vec::new(),
            sketches: Vec::new(),
            admitted: self.admissions,
            request,
        };
        match self.push_token(a, &logits, sketch, version, on_done) {
            Some(a) => {
                self.place(a);
                true
            }
            None => false,
        }
    }

    /// Samples `a`'s next token from `logits` (recording `sketch`, that of the hidden state they
    /// come from, if there is one); hands it to `on_done` (freeing its cache) if that ends it,
    /// else returns it with the token pending.
    fn push_token(
        &mut self,
        mut a: Active,
        logits: &[f32],
        sketch: Option<u32>,
        version: PolicyVersion,
        on_done: &mut impl FnMut(Generated),
    ) -> Option<Active> {
        let cfg = self.cfg;
        let (token, logp) = sample_token(logits, &a.ids, &cfg.sampling, &mut a.rng);
        a.ids.push(token);
        a.logps.push(logp);
        a.versions.push(version);
        a.sketches.extend(sketch);
        self.stats.generated_tokens += 1;
        let finish = finish_reason(&a.ids, cfg, self.decode);
        let Some(finish) = finish else {
            a.pending = vec![token];
            return Some(a);
        };
        self.store.free(&mut a.kv);
        on_done(Generated {
            request: a.request,
            ids: a.ids,
            logps: a.logps,
            versions: a.versions,
            sketches: a.sketches,
            finish,
        });
        None
    }

    /// Reserves every running sequence's pending positions, oldest first; while the pool is
    /// short, idle prefixes go first, then the youngest sequence is preempted (possibly the one
    /// growing: it comes back when there is room).
    fn reserve_pending(&mut self) {
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .collect();
        order.sort_by_key(|&i| self.slots[i].as_ref().expect("active").admitted);
        for i in order {
            // The slot empties if its sequence is preempted for an older one.
            while let Some(a) = self.slots[i].as_mut() {
                if self.store.reserve(&mut a.kv, a.pending.len()).is_ok() {
                    break;
                }
                // Prompts already prefilled first, then those about to be.
                if self.drop_prefixes(|p| p.logits.is_some()) > 0
                    || self.drop_prefixes(|_| true) > 0
                {
                    continue;
                }
                let youngest = (0..self.slots.len())
                    .filter(|&j| self.slots[j].is_some())
                    .max_by_key(|&j| self.slots[j].as_ref().expect("active").admitted)
                    .expect("one is running");
                self.preempt(youngest);
            }
        }
    }

    /// Frees slot `i`'s cache and queues its sequence to re-prefill prompt + tokens later.
    fn preempt(&mut self, i: usize) {
        let mut a = self.slots[i].take().expect("active");
        self.store.free(&mut a.kv);
        a.pending.clear();
        self.stats.preemptions += 1;
        // Victims are the youngest first, so the oldest ends up in front.
        self.preempted.push_front(a);
    }

    /// Frees the prefixes `which` selects; their queued samples will prefill the prompt again.
    fn drop_prefixes(&mut self, which: impl Fn(&Prefix) -> bool) -> usize {
        let gone: Vec<Arc<Vec<u32>>> = self
            .prefixes
            .iter()
            .filter(|(_, p)| which(p))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            let mut p = self.prefixes.remove(k).expect("listed");
            self.store.free(&mut p.kv);
        }
        gone.len()
    }

    /// Whether the pool has `blocks` free beside what is owed to what is already placed: a block
    /// for each running sequence's next token, all of its positions for one that re-prefills
    /// (its cache is empty until then), and a block for each prefix's next sample (its copy of
    /// the shared partial block, or its first block of its own; a spent prefix has none left).
    /// Without the prefixes' blocks, two prefixes could fill the pool so that neither could ever
    /// be forked.
    fn room_for(&self, blocks: usize) -> bool {
        let Some(free) = self.store.free_blocks() else {
            return true;
        };
        let running: usize = self
            .slots
            .iter()
            .flatten()
            .map(|a| match a.kv.is_empty() {
                true => self.store.blocks_for(a.pending.len()),
                false => 1,
            })
            .sum();
        let owed = self.prefixes.values().filter(|p| !p.spent).count();
        free >= blocks + running + owed
    }

    fn place(&mut self, a: Active) {
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.is_none())
            .expect("a free slot");
        *slot = Some(a);
    }

    fn has_work(&self) -> bool {
        self.slots.iter().any(Option::is_some) || self.prefixes.values().any(|p| p.logits.is_none())
    }
}
