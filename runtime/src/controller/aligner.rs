//! Prompt-to-Prompt's word positions and edit mappers from the prompts' tokens, computed as
//! google/prompt-to-prompt's `ptp_utils.get_word_inds` and `seq_aligner`
//! (`get_replacement_mapper`, `get_refinement_mapper`) compute them (Apache-2.0; the algorithm
//! is re-written here, checked against a transcription run in Python:
//! `models/export/p2p_aligner.py`).

use crate::error::{Error, Result};

/// One prompt as its tokenizer gives it: the ids with the start and end tokens (neither cut nor
/// padded), and each token decoded alone.
#[derive(Debug, Clone)]
pub struct PromptTokens {
    pub text: String,
    pub ids: Vec<i64>,
    pub pieces: Vec<String>,
}

/// A word of a prompt: its text (every occurrence) or its position among the prompt's
/// space-separated words.
#[derive(Debug, Clone, Copy)]
pub enum Word<'a> {
    Text(&'a str),
    Position(usize),
}

fn bad(msg: String) -> Error {
    Error::Inputs(format!("controller: {msg}"))
}

impl PromptTokens {
    /// `text` as `tokenizer` gives it (P2P's `tokenizer.encode` and `decode([id])`).
    pub fn encode(tokenizer: &crate::tokenizer::TextTokenizer, text: &str) -> Result<Self> {
        let (ids, pieces) = tokenizer.tokens(text)?.into_iter().unzip();
        Ok(PromptTokens {
            text: text.to_string(),
            ids,
            pieces,
        })
    }

    /// Token positions (1-based: after the start token) of `word`, as `get_word_inds`: the
    /// prompt split on single spaces, its text tokens (decoded) walked while their characters
    /// add up to each word's. Empty when the word is not there.
    pub fn word_indices(&self, word: Word) -> Vec<usize> {
        let split: Vec<&str> = self.text.split(' ').collect();
        let places: Vec<usize> = match word {
            Word::Text(w) => split
                .iter()
                .enumerate()
                .filter(|(_, s)| **s == w)
                .map(|(i, _)| i)
                .collect(),
            Word::Position(p) => vec![p],
        };
        let mut out = Vec::new();
        if places.is_empty() || self.pieces.len() < 2 {
            return out;
        }
        let (mut len, mut ptr) = (0usize, 0usize);
        // Without the start and end tokens; '#' stripped as P2P does (BERT's word pieces).
        for (i, piece) in self.pieces[1..self.pieces.len() - 1].iter().enumerate() {
            len += piece.trim_matches('#').chars().count();
            if places.contains(&ptr) {
                out.push(i + 1);
            }
            // Tokens beyond the words (P2P would fail indexing): nothing more to find.
            let Some(w) = split.get(ptr) else { break };
            if len >= w.chars().count() {
                ptr += 1;
                len = 0;
            }
        }
        out
    }

    /// `word_indices` of a word that must be there (else a message naming it and the prompt).
    pub fn require(&self, word: &str) -> std::result::Result<Vec<usize>, String> {
        let found = self.word_indices(Word::Text(word));
        if found.is_empty() {
            return Err(format!(
                "word '{word}' is not in the prompt {:?} (words are the prompt split on spaces, matched exactly)",
                self.text
            ));
        }
        Ok(found)
    }

    fn fits(&self, max_len: usize) -> Result<()> {
        if self.ids.len() > max_len {
            return Err(bad(format!(
                "the prompt {:?} has {} tokens, more than the {max_len} the edit maps",
                self.text,
                self.ids.len()
            )));
        }
        Ok(())
    }
}

/// Replace (P2P's `get_replacement_mapper_`): [max_len, max_len] row-major, source token ×
/// edited token. The prompts need the same number of words; a word that differs maps its
/// source tokens onto the edit's (one to one when the counts agree, else spread evenly).
pub fn replacement_mapper(
    source: &PromptTokens,
    edit: &PromptTokens,
    max_len: usize,
) -> Result<Vec<f32>> {
    source.fits(max_len)?;
    edit.fits(max_len)?;
    let (wx, wy): (Vec<&str>, Vec<&str>) = (
        source.text.split(' ').collect(),
        edit.text.split(' ').collect(),
    );
    if wx.len() != wy.len() {
        return Err(bad(format!(
            "edit = \"replace\" needs prompts with the same number of words, but {:?} has {} and {:?} has {} (use edit = \"refine\" to insert words)",
            source.text,
            wx.len(),
            edit.text,
            wy.len()
        )));
    }
    let replaced: Vec<usize> = (0..wy.len()).filter(|&i| wx[i] != wy[i]).collect();
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for &i in &replaced {
        let (s, t) = (
            source.word_indices(Word::Position(i)),
            edit.word_indices(Word::Position(i)),
        );
        if s.is_empty() || t.is_empty() {
            return Err(bad(format!(
                "edit = \"replace\": word {i} ({:?} -> {:?}) has no tokens in {:?} or {:?}",
                wx[i], wy[i], source.text, edit.text
            )));
        }
        src.push(s);
        dst.push(t);
    }
    let mut m = vec![0f32; max_len * max_len];
    let mut set = |r: usize, c: usize, v: f32| -> Result<()> {
        if r >= max_len || c >= max_len {
            return Err(bad(format!(
                "edit = \"replace\": token {r} -> {c} is beyond the {max_len} text tokens"
            )));
        }
        m[r * max_len + c] = v;
        Ok(())
    };
    let (mut i, mut j, mut k) = (0usize, 0usize, 0usize);
    while i < max_len && j < max_len {
        if k < src.len() && src[k][0] == i {
            let (s, t) = (&src[k], &dst[k]);
            if s.len() == t.len() {
                for (&r, &c) in s.iter().zip(t) {
                    set(r, c, 1.0)?;
                }
            } else {
                let ratio = 1.0 / t.len() as f32;
                for &c in t {
                    for &r in s {
                        set(r, c, ratio)?;
                    }
                }
            }
            k += 1;
            i += s.len();
            j += t.len();
        } else if k < src.len() {
            set(i, j, 1.0)?;
            i += 1;
            j += 1;
        } else {
            // After the last replaced word P2P continues on the diagonal of j.
            set(j, j, 1.0)?;
            i += 1;
            j += 1;
        }
    }
    Ok(m)
}

/// Refine (P2P's `get_mapper`): the global alignment (gap 0, match 1, mismatch −1) of the
/// two prompts' ids; per edited token its source token (−1 where inserted) and alpha (0 where
/// inserted, else 1), continued past the edit's tokens as P2P does.
pub fn refinement_mapper(
    source: &PromptTokens,
    edit: &PromptTokens,
    max_len: usize,
) -> Result<(Vec<i64>, Vec<f32>)> {
    source.fits(max_len)?;
    edit.fits(max_len)?;
    let (x, y) = (&source.ids, &edit.ids);
    let (n, m) = (x.len(), y.len());
    const LEFT: u8 = 1;
    const UP: u8 = 2;
    const DIAG: u8 = 3;
    let (gap, matched, mismatched) = (0i64, 1i64, -1i64);
    let w = m + 1;
    let mut score = vec![0i64; (n + 1) * w];
    let mut trace = vec![0u8; (n + 1) * w];
    for j in 1..=m {
        score[j] = j as i64 * gap;
        trace[j] = LEFT;
    }
    for i in 1..=n {
        score[i * w] = i as i64 * gap;
        trace[i * w] = UP;
    }
    for i in 1..=n {
        for j in 1..=m {
            let left = score[i * w + j - 1] + gap;
            let up = score[(i - 1) * w + j] + gap;
            let diag = score[(i - 1) * w + j - 1]
                + if x[i - 1] == y[j - 1] {
                    matched
                } else {
                    mismatched
                };
            let best = left.max(up).max(diag);
            score[i * w + j] = best;
            // Ties: left, then up, then the diagonal (P2P's order).
            trace[i * w + j] = if best == left {
                LEFT
            } else if best == up {
                UP
            } else {
                DIAG
            };
        }
    }
    let mut y_to_x = Vec::with_capacity(m);
    let (mut i, mut j) = (n, m);
    while i > 0 || j > 0 {
        match trace[i * w + j] {
            DIAG => {
                i -= 1;
                j -= 1;
                y_to_x.push(i as i64);
            }
            LEFT => {
                j -= 1;
                y_to_x.push(-1);
            }
            _ => i -= 1,
        }
    }
    y_to_x.reverse();
    let mut mapper = vec![0i64; max_len];
    let mut alphas = vec![1f32; max_len];
    for (k, &s) in y_to_x.iter().enumerate() {
        mapper[k] = s;
        alphas[k] = if s == -1 { 0.0 } else { 1.0 };
    }
    for (k, v) in mapper.iter_mut().enumerate().skip(y_to_x.len()) {
        *v = k as i64;
    }
    Ok((mapper, alphas))
}

/// A refine mapper as the one-hot [max_len, max_len] matrix the hooks take (source token ×
/// edited token; −1, an inserted token, indexes the last token as P2P's torch indexing does,
/// under alpha 0).
pub fn one_hot(mapper: &[i64], max_len: usize) -> Vec<f32> {
    let mut m = vec![0f32; max_len * max_len];
    for (n, &s) in mapper.iter().enumerate() {
        let row = if s < 0 { max_len as i64 + s } else { s };
        if let Ok(r) = usize::try_from(row)
            && r < max_len
        {
            m[r * max_len + n] = 1.0;
        }
    }
    m
}
