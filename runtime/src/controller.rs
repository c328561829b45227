//! Controller descriptions (TOML) for `attune sample`, and the hook values they give each
//! step, following google/prompt-to-prompt's schedules:
//!
//! ```toml
//! [p2p]
//! mapper = "mapper.npy"          # [P-1, T, T]: word swap (replace) or one-hot (refine); default identity
//! refine_alphas = "alphas.npy"   # [P-1, T]: 0 for words without a source (refine); default 1
//! cross_replace_steps = 0.8      # or [start, end]: fractions of the run
//! cross_replace_words = { lasagne = 0.2 }  # words with their own range (with the prompts)
//! self_replace_steps = 0.4       # or [start, end]
//! equalizer = { 5 = 2.0 }        # token index (or word) -> weight (reweight); default 1
//!
//! [local_blend]
//! words = [[3], [4]]             # token indices (or words) per prompt
//! threshold = 0.3
//! resolution = 16                # cross maps with resolution² query tokens
//!
//! [masactrl]
//! start_step = 4
//! start_layer = 10               # self-attention layers counted in call order
//! ```
//!
//! With the prompts (`attune generate`), words stand for token indices (`words = ["cat",
//! "dog"]`, `equalizer = { cat = 2.0 }`, resolved as P2P's `get_word_inds`) and
//! `edit = "replace" | "refine"` computes the mapper (and refine's alphas) from the prompts as
//! P2P's `seq_aligner` does (see `aligner`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::npy;
use crate::tensor::HostTensor;

pub mod aligner;

pub use aligner::{PromptTokens, Word};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    pub p2p: Option<P2p>,
    pub local_blend: Option<LocalBlendSpec>,
    pub masactrl: Option<MasaCtrl>,
    /// The run's prompts as tokenized (`attune generate`), for words and computed edits.
    #[serde(skip)]
    prompts: Option<Vec<PromptTokens>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2p {
    /// The mapper (and refine's alphas) computed from the prompts, instead of files.
    pub edit: Option<Edit>,
    pub mapper: Option<PathBuf>,
    pub refine_alphas: Option<PathBuf>,
    #[serde(default = "full_range")]
    pub cross_replace_steps: StepRange,
    /// Words of the edited prompts with their own range (P2P's `cross_replace_steps` dict
    /// beside `default_`), e.g. `{ lasagne = 0.2 }`.
    #[serde(default)]
    pub cross_replace_words: BTreeMap<String, StepRange>,
    #[serde(default = "no_range")]
    pub self_replace_steps: StepRange,
    #[serde(default)]
    pub equalizer: BTreeMap<String, f64>,
}

/// P2P's edits whose mapper follows from the prompts.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Edit {
    /// Words swapped (`AttentionReplace`): the same number of words in every prompt.
    Replace,
    /// Words added (`AttentionRefine`): the prompts aligned token by token.
    Refine,
}

/// A token index, or a word of the prompt (every token of each occurrence).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum TokenRef {
    Index(usize),
    Word(String),
}

/// One token reference or a list of them (a prompt's entry of `[local_blend] words`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum TokenRefs {
    One(TokenRef),
    Many(Vec<TokenRef>),
}

impl TokenRefs {
    fn refs(&self) -> &[TokenRef] {
        match self {
            TokenRefs::One(r) => std::slice::from_ref(r),
            TokenRefs::Many(v) => v,
        }
    }
}

/// A fraction of the run (`0.8` = the first 80%) or `[start, end]` fractions.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(untagged)]
pub enum StepRange {
    Until(f64),
    Between([f64; 2]),
}

fn full_range() -> StepRange {
    StepRange::Until(1.0)
}

fn no_range() -> StepRange {
    StepRange::Until(0.0)
}

impl StepRange {
    fn bounds(self) -> (f64, f64) {
        match self {
            StepRange::Until(e) => (0.0, e),
            StepRange::Between([s, e]) => (s, e),
        }
    }
}

/// `[local_blend]` as written: token indices or words per prompt.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalBlendSpec {
    pub words: Vec<TokenRefs>,
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    #[serde(default = "default_resolution")]
    pub resolution: usize,
}

/// `[local_blend]` resolved: token indices per prompt.
#[derive(Debug)]
pub struct LocalBlend {
    pub words: Vec<Vec<usize>>,
    pub threshold: f32,
    pub resolution: usize,
}

fn default_threshold() -> f32 {
    0.3
}

fn default_resolution() -> usize {
    16
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasaCtrl {
    #[serde(default = "default_start_step")]
    pub start_step: usize,
    #[serde(default = "default_start_layer")]
    pub start_layer: usize,
}

fn default_start_step() -> usize {
    4
}

fn default_start_layer() -> usize {
    10
}

/// What a controller needs resolved against a run: prompts, text tokens, steps, layers.
pub struct Plan {
    pub steps: usize,
    pub prompts: usize,
    pub words: usize,
    /// Per step: alpha of the edits [P-1, T] (P2P's `alpha_time_words`).
    cross_alpha: Vec<f32>,
    refine: Option<Vec<f32>>,
    self_range: (usize, usize),
    pub mapper: Option<HostTensor>,
    pub equalizer: Option<HostTensor>,
    pub local_blend: Option<LocalBlend>,
    pub masactrl: Option<MasaCtrl>,
}

impl Controller {
    pub fn read(path: &Path) -> Result<Controller> {
        let text = attune_compiler::files::read_text(path)?;
        let mut c: Controller = toml::from_str(&text)
            .map_err(|e| Error::file(path, format!("not a valid controller: {e}")))?;
        // Files are relative to the controller's folder.
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(p) = &mut c.p2p {
            for f in [&mut p.mapper, &mut p.refine_alphas].into_iter().flatten() {
                if f.is_relative() {
                    *f = dir.join(&*f);
                }
            }
        }
        Ok(c)
    }

    /// The run's prompts as the pipeline's tokenizer gives them (prompt 0 the source), so
    /// that words and `edit` resolve against them.
    pub fn with_prompts(mut self, prompts: Vec<PromptTokens>) -> Controller {
        self.prompts = Some(prompts);
        self
    }

    /// The prompts words resolve against, or an error saying where words work.
    fn texts(&self, prompts: usize, what: &str) -> Result<&[PromptTokens]> {
        match &self.prompts {
            Some(t) if t.len() == prompts => Ok(t),
            Some(t) => Err(Error::Inputs(format!(
                "controller: {what}: {} prompts were tokenized for a run of {prompts}",
                t.len()
            ))),
            None => Err(Error::Inputs(format!(
                "controller: {what} needs the prompts and their tokenizer, which only `attune generate` has: use it, or give token indices (and mapper/refine_alphas files) to `attune sample`"
            ))),
        }
    }

    /// Checks the controller against the run and resolves its schedules; every mistake is
    /// reported here, before anything runs.
    pub fn plan(
        mut self,
        steps: usize,
        prompts: usize,
        words: usize,
        self_layers: usize,
    ) -> Result<Plan> {
        let bad = |msg: String| Error::Inputs(format!("controller: {msg}"));
        let edits = prompts.saturating_sub(1);
        // P2P's alpha has a row per step and one more.
        let alpha_rows = steps
            .checked_add(1)
            .ok_or_else(|| bad(format!("{steps} steps are too many")))?;
        let mut plan = Plan {
            steps,
            prompts,
            words,
            cross_alpha: vec![0.0; alpha_rows * edits * words],
            refine: None,
            self_range: (0, 0),
            mapper: None,
            equalizer: None,
            local_blend: None,
            masactrl: None,
        };
        let fraction = |r: StepRange, what: &str| -> Result<(f64, f64)> {
            let (s, e) = r.bounds();
            if !(0.0..=1.0).contains(&s) || !(0.0..=1.0).contains(&e) || s > e {
                return Err(bad(format!(
                    "{what} {s}..{e} is not a range of fractions within [0, 1]"
                )));
            }
            Ok((s, e))
        };
        if let Some(p) = &self.p2p {
            if edits == 0 {
                return Err(bad(
                    "[p2p] needs at least two prompts (the source and an edit)".into(),
                ));
            }
            // P2P: alpha over steps + 1 rows, self replace over steps.
            let (s, e) = fraction(p.cross_replace_steps, "cross_replace_steps")?;
            let (start, end) = (
                (s * alpha_rows as f64) as usize,
                (e * alpha_rows as f64) as usize,
            );
            let row = edits * words;
            let mut set = |(start, end): (usize, usize), edit: usize, token: usize| {
                for i in 0..alpha_rows {
                    plan.cross_alpha[i * row + edit * words + token] =
                        if (start..end).contains(&i) { 1.0 } else { 0.0 };
                }
            };
            for edit in 0..edits {
                for token in 0..words {
                    set((start, end), edit, token);
                }
            }
            // Then each word's own range, in the edited prompts that have it (P2P's
            // get_time_words_attention_alpha).
            for (word, range) in &p.cross_replace_words {
                let (s, e) = fraction(*range, &format!("cross_replace_words '{word}'"))?;
                let bounds = (
                    (s * alpha_rows as f64) as usize,
                    (e * alpha_rows as f64) as usize,
                );
                let texts = self.texts(prompts, &format!("cross_replace_words '{word}'"))?;
                let mut found = false;
                for (edit, t) in texts[1..].iter().enumerate() {
                    for token in t.word_indices(Word::Text(word)) {
                        if token >= words {
                            return Err(bad(format!(
                                "cross_replace_words '{word}': token {token} is beyond the {words} text tokens"
                            )));
                        }
                        set(bounds, edit, token);
                        found = true;
                    }
                }
                if !found {
                    return Err(bad(format!(
                        "cross_replace_words: word '{word}' is in none of the edited prompts {:?}",
                        texts[1..]
                            .iter()
                            .map(|t| t.text.as_str())
                            .collect::<Vec<_>>()
                    )));
                }
            }
            let (s, e) = fraction(p.self_replace_steps, "self_replace_steps")?;
            plan.self_range = ((s * steps as f64) as usize, (e * steps as f64) as usize);
            if let Some(edit) = p.edit {
                let name = match edit {
                    Edit::Replace => "replace",
                    Edit::Refine => "refine",
                };
                if p.mapper.is_some() || p.refine_alphas.is_some() {
                    return Err(bad(format!(
                        "[p2p] edit = \"{name}\" computes the mapper from the prompts: give it or mapper/refine_alphas files, not both"
                    )));
                }
                let texts = self.texts(prompts, &format!("[p2p] edit = \"{name}\""))?;
                let mut mapper = Vec::with_capacity(edits * words * words);
                let mut alphas = Vec::with_capacity(edits * words);
                for t in &texts[1..] {
                    match edit {
                        Edit::Replace => {
                            mapper.extend(aligner::replacement_mapper(&texts[0], t, words)?)
                        }
                        Edit::Refine => {
                            let (m, a) = aligner::refinement_mapper(&texts[0], t, words)?;
                            mapper.extend(aligner::one_hot(&m, words));
                            alphas.extend(a);
                        }
                    }
                }
                plan.mapper = Some(HostTensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&[edits, words, words]), mapper).expect("sized"),
                ));
                if edit == Edit::Refine {
                    plan.refine = Some(alphas);
                }
            }
            if let Some(f) = &p.mapper {
                let m = npy::read(f)?;
                if m.shape() != [edits, words, words] || !matches!(m, HostTensor::F32(_)) {
                    return Err(bad(format!(
                        "mapper {} is {:?} {}, expected f32 [{edits}, {words}, {words}] ({edits} edited prompts, {words} text tokens)",
                        f.display(),
                        m.shape(),
                        m.dtype().name()
                    )));
                }
                if let HostTensor::F32(arr) = &m
                    && let Some(pos) = arr.iter().position(|v| !v.is_finite())
                {
                    return Err(bad(format!(
                        "mapper {} has a non-finite value ({}) at element {pos}",
                        f.display(),
                        arr.iter().nth(pos).copied().unwrap_or(f32::NAN)
                    )));
                }
                plan.mapper = Some(m);
            }
            if let Some(f) = &p.refine_alphas {
                let a = npy::read(f)?;
                match &a {
                    HostTensor::F32(arr) if a.shape() == [edits, words] => {
                        if let Some(pos) = arr.iter().position(|v| !v.is_finite()) {
                            return Err(bad(format!(
                                "refine_alphas {} has a non-finite value ({}) at element {pos}",
                                f.display(),
                                arr.iter().nth(pos).copied().unwrap_or(f32::NAN)
                            )));
                        }
                        plan.refine = Some(arr.iter().copied().collect())
                    }
                    _ => {
                        return Err(bad(format!(
                            "refine_alphas {} is {:?}, expected f32 [{edits}, {words}]",
                            f.display(),
                            a.shape()
                        )));
                    }
                }
            }
            if !p.equalizer.is_empty() {
                let mut eq = vec![1f32; words];
                for (k, v) in &p.equalizer {
                    if !v.is_finite() || v.abs() > f32::MAX as f64 {
                        return Err(bad(format!(
                            "equalizer token {k}: weight {v:e} is not a finite f32"
                        )));
                    }
                    // A number is a token index; anything else a word of the first edited
                    // prompt (P2P's examples: `get_equalizer(prompts[1], ...)`).
                    let indices = match k.parse::<usize>() {
                        Ok(i) => vec![i],
                        Err(_) => self.texts(prompts, &format!("equalizer word '{k}'"))?[1]
                            .require(k)
                            .map_err(|e| bad(format!("[p2p] equalizer: {e}")))?,
                    };
                    for i in indices {
                        if i >= words {
                            let of = if k.parse::<usize>().is_ok() {
                                String::new()
                            } else {
                                format!(" (word '{k}')")
                            };
                            return Err(bad(format!(
                                "equalizer token {i}{of} is beyond the {words} text tokens"
                            )));
                        }
                        eq[i] = *v as f32;
                    }
                }
                plan.equalizer = Some(HostTensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&[1, words]), eq).expect("sized"),
                ));
            }
        }
        if let Some(spec) = &self.local_blend {
            let mut resolved = Vec::with_capacity(spec.words.len());
            for (p, refs) in spec.words.iter().enumerate() {
                let mut ids = Vec::new();
                for r in refs.refs() {
                    match r {
                        TokenRef::Index(i) => ids.push(*i),
                        TokenRef::Word(w) => {
                            let texts =
                                self.texts(prompts, &format!("[local_blend] word '{w}'"))?;
                            let Some(t) = texts.get(p) else {
                                return Err(bad(format!(
                                    "[local_blend] words lists {} prompts, the run has {prompts}",
                                    spec.words.len()
                                )));
                            };
                            ids.extend(
                                t.require(w)
                                    .map_err(|e| bad(format!("[local_blend] words: {e}")))?,
                            );
                        }
                    }
                }
                resolved.push(ids);
            }
            let lb = LocalBlend {
                words: resolved,
                threshold: spec.threshold,
                resolution: spec.resolution,
            };
            if lb.words.len() != prompts {
                return Err(bad(format!(
                    "[local_blend] words lists {} prompts, the run has {prompts}",
                    lb.words.len()
                )));
            }
            if let Some(p) = lb.words.iter().position(Vec::is_empty) {
                return Err(bad(format!(
                    "[local_blend] words: the list of prompt {p} is empty (every prompt needs at least one token index, or its mask is empty)"
                )));
            }
            if lb.resolution == 0 {
                return Err(bad("[local_blend] resolution 0: must be at least 1".into()));
            }
            if let Some(w) = lb.words.iter().flatten().find(|w| **w >= words) {
                return Err(bad(format!(
                    "[local_blend] word index {w} is beyond the {words} text tokens"
                )));
            }
            if !(0.0..=1.0).contains(&lb.threshold) {
                return Err(bad(format!(
                    "[local_blend] threshold {} is not within [0, 1]",
                    lb.threshold
                )));
            }
            plan.local_blend = Some(lb);
        }
        if let Some(m) = self.masactrl.take() {
            if m.start_step >= steps {
                return Err(bad(format!(
                    "[masactrl] start_step {} is outside the {steps} steps",
                    m.start_step
                )));
            }
            if m.start_layer >= self_layers {
                return Err(bad(format!(
                    "[masactrl] start_layer {} is beyond the {self_layers} self-attention layers with a gate",
                    m.start_layer
                )));
            }
            plan.masactrl = Some(m);
        }
        Ok(plan)
    }
}

impl Plan {
    /// Cross-attention alpha of every edit for this step, [P-1, T].
    pub fn alpha(&self, step: usize) -> HostTensor {
        let edits = self.prompts.saturating_sub(1);
        let row = edits * self.words;
        let a = &self.cross_alpha[step * row..(step + 1) * row];
        let data: Vec<f32> = (0..row)
            .map(|i| a[i] * self.refine.as_ref().map_or(1.0, |r| r[i]))
            .collect();
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[edits, self.words]), data).expect("sized"))
    }

    pub fn self_gate(&self, step: usize) -> f32 {
        if (self.self_range.0..self.self_range.1).contains(&step) {
            1.0
        } else {
            0.0
        }
    }

    /// MasaCtrl gate of the `layer`-th self-attention (call order) at this step.
    pub fn masactrl_gate(&self, step: usize, layer: usize) -> f32 {
        match &self.masactrl {
            Some(m) if step >= m.start_step && layer >= m.start_layer => 1.0,
            _ => 0.0,
        }
    }
}
