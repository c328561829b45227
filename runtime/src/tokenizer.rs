//! Text to token ids, as a pipeline folder's tokenizer gives them to its text encoder.
//!
//! CLIP (SD 1.x/2.x, SDXL, SD3, Flux): byte-level BPE from the `vocab.json` and `merges.txt`
//! diffusers ships, with the `tokenizers` crate. Ids follow transformers' `CLIPTokenizer`
//! as transformers 5 runs it (no ftfy): NFC, whitespace runs as one space, lower case, split
//! by CLIP's pattern (`<|startoftext|>`/`<|endoftext|>` written in a prompt are those tokens),
//! BPE with `</w>` closing each word; then `<|startoftext|>` ids `<|endoftext|>`, truncated
//! to `model_max_length` (the end token kept last) and padded with the folder's pad token.
//! The folder's special tokens written in a prompt are those tokens (SDXL's pad token "!").
//! A folder with a `tokenizer.json` (T5) is read as it is, with the same truncation and
//! padding.
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::error::{Error, Result};

/// CLIP's word pattern (its tokenizer lower-cases first, so no case-insensitive flag).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A pipeline's tokenizer with its length and special tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Prepended and appended (CLIP); `None` where `tokenizer.json` adds its own (T5's `</s>`).
    bos: Option<u32>,
    eos: Option<u32>,
    pad: u32,
    /// Ids per prompt, special tokens included.
    pub max_len: usize,
    dir: PathBuf,
}

/// One prompt's ids, and whether it was cut to fit.
pub struct Encoded {
    pub ids: Vec<i64>,
    pub truncated: bool,
}

impl TextTokenizer {
    /// The tokenizer in folder `dir` (a pipeline's `tokenizer/`, `tokenizer_2/`, ...).
    pub fn from_dir(dir: &Path) -> Result<TextTokenizer> {
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let specials = read_json(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str| {
            let v = specials.get(key).or_else(|| config.get(key))?;
            v.as_str()
                .or_else(|| v.get("content")?.as_str())
                .map(str::to_string)
        };
        let fast = dir.join("tokenizer.json");
        let (mut inner, clip) = if fast.is_file() {
            let t = Tokenizer::from_file(&fast)
                .map_err(|e| Error::file(&fast, format!("not a tokenizer: {e}")))?;
            (t, false)
        } else {
            (clip(dir)?, true)
        };
        if clip {
            // transformers matches every special token of the folder in the text before BPE:
            // SDXL's tokenizer_2 pads with "!", so "wow!!" gives "wow</w>" and twice
            // "!" (id 0), not "!!</w>".
            let named: Vec<AddedToken> = ["bos_token", "eos_token", "pad_token", "unk_token"]
                .into_iter()
                .filter_map(token)
                .filter(|t| inner.token_to_id(t).is_some())
                .map(|t| AddedToken::from(t, true))
                .collect();
            inner.add_special_tokens(&named);
        }
        let id = |name: &str, what: &str| -> Result<u32> {
            inner.token_to_id(name).ok_or_else(|| {
                Error::file(
                    dir,
                    format!("its {what} token '{name}' is not in the vocabulary"),
                )
            })
        };
        let max_len = config
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|n| *n >= 2.0 && *n <= 1e6)
            .map_or(77, |n| n as usize);
        let pad_name = token("pad_token")
            .or_else(|| token("eos_token"))
            .ok_or_else(|| Error::file(dir, "no pad_token or eos_token in its config"))?;
        let (bos, eos) = if clip {
            let bos = token("bos_token").unwrap_or_else(|| "<|startoftext|>".into());
            let eos = token("eos_token").unwrap_or_else(|| "<|endoftext|>".into());
            (Some(id(&bos, "start")?), Some(id(&eos, "end")?))
        } else {
            (None, None)
        };
        Ok(TextTokenizer {
            pad: id(&pad_name, "pad")?,
            inner,
            bos,
            eos,
            max_len,
            dir: dir.to_path_buf(),
        })
    }

    /// `text` as `max_len` ids: start token, the text's tokens (cut to fit), end token, pads.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let specials = self.bos.is_none();
        let enc = self
            .inner
            .encode(text, specials)
            .map_err(|e| Error::file(&self.dir, format!("cannot tokenize {text:?}: {e}")))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        let room = self.max_len - usize::from(self.bos.is_some()) - usize::from(self.eos.is_some());
        let mut truncated = false;
        if ids.len() > room {
            truncated = true;
            // A tokenizer.json that appends its own end token keeps it last.
            let last = if specials { ids.last().copied() } else { None };
            ids.truncate(room);
            if let (Some(last), Some(end)) = (last, ids.last_mut()) {
                *end = last;
            }
        }
        let mut out = Vec::with_capacity(self.max_len);
        out.extend(self.bos.map(i64::from));
        out.extend(ids);
        out.extend(self.eos.map(i64::from));
        out.resize(self.max_len, i64::from(self.pad));
        Ok(Encoded {
            ids: out,
            truncated,
        })
    }
}

impl TextTokenizer {
    /// `text`'s ids as the tokenizer gives them (start and end tokens included, neither cut
    /// nor padded), each with its token decoded alone as transformers' `decode([id])` does:
    /// what Prompt-to-Prompt's word positions and alignments read.
    pub fn tokens(&self, text: &str) -> Result<Vec<(i64, String)>> {
        let specials = self.bos.is_none();
        let enc = self
            .inner
            .encode(text, specials)
            .map_err(|e| Error::file(&self.dir, format!("cannot tokenize {text:?}: {e}")))?;
        let mut ids: Vec<u32> = Vec::with_capacity(enc.get_ids().len() + 2);
        ids.extend(self.bos);
        ids.extend(enc.get_ids());
        ids.extend(self.eos);
        ids.into_iter()
            .map(|id| Ok((i64::from(id), self.decode_one(id)?)))
            .collect()
    }

    fn decode_one(&self, id: u32) -> Result<String> {
        if self.bos.is_none() {
            return self
                .inner
                .decode(&[id], false)
                .map_err(|e| Error::file(&self.dir, format!("cannot decode token {id}: {e}")));
        }
        // CLIP: byte-level characters back to bytes, `</w>` a space, trimmed.
        let token = self.inner.id_to_token(id).unwrap_or_default();
        if Some(id) == self.bos || Some(id) == self.eos {
            return Ok(token);
        }
        let text = token.replace("</w>", " ");
        let bytes: Vec<u8> = text.chars().map(|c| byte_of(c).unwrap_or(b' ')).collect();
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }
}

/// The byte GPT-2/CLIP's byte-level alphabet writes as `c` (printable bytes as themselves,
/// the rest shifted to U+0100 onward).
fn byte_of(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let u = c as u32;
    if u < 256 && printable(u) {
        return u8::try_from(u).ok();
    }
    if c == ' ' {
        return Some(b' ');
    }
    // Non-printable bytes in order, from U+0100.
    let k = u.checked_sub(256)?;
    (0u32..256)
        .filter(|b| !printable(*b))
        .nth(k as usize)
        .and_then(|b| u8::try_from(b).ok())
}

fn read_json(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Ok(Value::Object(Default::default()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not JSON: {e}")))
}

/// CLIP's tokenizer from `vocab.json` and `merges.txt`.
fn clip(dir: &Path) -> Result<Tokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if !vocab.is_file() && dir.join("spiece.model").is_file() {
        // A sentencepiece model alone (T5's slow tokenizer as transformers saves it).
        return Err(Error::file(
            dir,
            "spiece.model but no tokenizer.json: T5's tokenizer is read from the tokenizer.json \
             transformers' fast tokenizer (T5TokenizerFast) saves",
        ));
    }
    for f in [&vocab, &merges] {
        if !f.is_file() {
            return Err(Error::file(
                dir,
                format!(
                    "no tokenizer.json and no {}: not a tokenizer folder",
                    f.file_name().unwrap_or_default().to_string_lossy()
                ),
            ));
        }
    }
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let bpe = BPE::from_file(&path(&vocab), &path(&merges))
        .end_of_word_suffix("</w>".into())
        .unk_token("<|endoftext|>".into())
        .build()
        .map_err(|e| Error::file(dir, format!("vocab.json/merges.txt do not parse: {e}")))?;
    let mut t = Tokenizer::new(bpe);
    // NFC, whitespace runs as one space, lower case: transformers' CLIPTokenizer.
    let spaces = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| Error::file(dir, format!("whitespace pattern: {e}")))?;
    t.with_normalizer(Some(NormalizerWrapper::Sequence(Sequence::new(vec![
        NormalizerWrapper::NFC(NFC),
        NormalizerWrapper::Replace(spaces),
        NormalizerWrapper::Lowercase(Lowercase),
    ]))));
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| Error::file(dir, format!("CLIP's pattern: {e}")))?;
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]))));
    // Written in a prompt, the start and end markers are those tokens.
    t.add_special_tokens(&[
        AddedToken::from("<|startoftext|>", true),
        AddedToken::from("<|endoftext|>", true),
    ]);
    Ok(t)
}
