"""Prompt-to-Prompt's word positions and edit mappers on prompt pairs, the reference for
`attune generate`'s controller words and `edit = "replace" | "refine"` (tests/p2p_words.rs).

The functions below transcribe google/prompt-to-prompt (Apache-2.0, Copyright 2022 Google LLC):
`ptp_utils.get_word_inds`, and `seq_aligner`'s `ScoreParams`, `get_matrix`,
`get_traceback_matrix`, `global_align`, `get_aligned_sequences`, `get_mapper` (refine),
`get_replacement_mapper_` (replace), and `ptp_utils.update_alpha_time_word` /
`get_time_words_attention_alpha`, with numpy in place of torch and otherwise unchanged, so
that they compute what P2P computes. The tokenizer is transformers' `CLIPTokenizer` on
`models/pipelines/sd15_tiny/tokenizer` (a real CLIP vocabulary; P2P calls `tokenizer.encode`
and `tokenizer.decode([id])`).

Writes `models/pipelines/sd15_tiny/reference/p2p/`: per case `.npy` files and `manifest.json`
(prompts, kind, files):
- replace: `<case>_mapper.npy` f32 [edits, 77, 77] (P2P's `get_replacement_mapper`);
- refine: `<case>_mapper.npy` i64 [edits, 77] (source token of each edited token, -1 where
  inserted) and `<case>_alphas.npy` f32 [edits, 77] (P2P's `get_refinement_mapper`);
- words: `<case>.npy` i64 [n] (`get_word_inds` of a word, by text or by position);
- alpha_words: `<case>.npy` f32 [steps + 1, edits, 77] (`get_time_words_attention_alpha`
  with a per-word `cross_replace_steps` dict).

Run: venv/bin/python models/export/p2p_aligner.py
"""
import json
from pathlib import Path

import numpy as np
import transformers
from transformers import CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "models/pipelines/sd15_tiny/tokenizer"
OUT = ROOT / "models/pipelines/sd15_tiny/reference/p2p"
MAX_LEN = 77


# --- transcribed from google/prompt-to-prompt (ptp_utils.py, seq_aligner.py) ---

def get_word_inds(text, word_place, tokenizer):
    split_text = text.split(" ")
    if type(word_place) is str:
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif type(word_place) is int:
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out, dtype=np.int64)


class ScoreParams:
    def __init__(self, gap, match, mismatch):
        self.gap = gap
        self.match = match
        self.mismatch = mismatch

    def mis_match_char(self, x, y):
        return self.mismatch if x != y else self.match


def get_matrix(size_x, size_y, gap):
    matrix = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(size_y) + 1) * gap
    matrix[1:, 0] = (np.arange(size_x) + 1) * gap
    return matrix


def get_traceback_matrix(size_x, size_y):
    matrix = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    matrix[0, 1:] = 1
    matrix[1:, 0] = 2
    matrix[0, 0] = 4
    return matrix


def global_align(x, y, score):
    matrix = get_matrix(len(x), len(y), score.gap)
    trace_back = get_traceback_matrix(len(x), len(y))
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + score.gap
            up = matrix[i - 1, j] + score.gap
            diag = matrix[i - 1, j - 1] + score.mis_match_char(x[i - 1], y[j - 1])
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    return matrix, trace_back


def get_aligned_sequences(x, y, trace_back):
    x_seq, y_seq = [], []
    i, j = len(x), len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            x_seq.append(x[i - 1])
            y_seq.append(y[j - 1])
            i, j = i - 1, j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            x_seq.append("-")
            y_seq.append(y[j - 1])
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            x_seq.append(x[i - 1])
            y_seq.append("-")
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return x_seq, y_seq, np.array(mapper_y_to_x, dtype=np.int64)


def get_mapper(x, y, tokenizer, max_len=MAX_LEN):
    x_seq = tokenizer.encode(x)
    y_seq = tokenizer.encode(y)
    score = ScoreParams(0, 1, -1)
    _, trace_back = global_align(x_seq, y_seq, score)
    mapper_base = get_aligned_sequences(x_seq, y_seq, trace_back)[-1]
    alphas = np.ones(max_len, dtype=np.float32)
    alphas[: mapper_base.shape[0]] = (mapper_base[:, 1] != -1).astype(np.float32)
    mapper = np.zeros(max_len, dtype=np.int64)
    mapper[: mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0]:] = len(y_seq) + np.arange(max_len - len(y_seq))
    return mapper, alphas


def get_refinement_mapper(prompts, tokenizer, max_len=MAX_LEN):
    pairs = [get_mapper(prompts[0], p, tokenizer, max_len) for p in prompts[1:]]
    return np.stack([m for m, _ in pairs]), np.stack([a for _, a in pairs])


def get_replacement_mapper_(x, y, tokenizer, max_len=MAX_LEN):
    words_x = x.split(" ")
    words_y = y.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError("attention replacement edit can only be applied on prompts with the same length")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [get_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [get_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur_inds = 0
    while i < max_len and j < max_len:
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            inds_source_, inds_target_ = inds_source[cur_inds], inds_target[cur_inds]
            if len(inds_source_) == len(inds_target_):
                mapper[inds_source_, inds_target_] = 1
            else:
                ratio = 1 / len(inds_target_)
                for i_t in inds_target_:
                    mapper[inds_source_, i_t] = ratio
            cur_inds += 1
            i += len(inds_source_)
            j += len(inds_target_)
        elif cur_inds < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return mapper.astype(np.float32)


def update_alpha_time_word(alpha, bounds, prompt_ind, word_inds=None):
    if type(bounds) is float:
        bounds = 0, bounds
    start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
    if word_inds is None:
        word_inds = np.arange(alpha.shape[2])
    alpha[: start, prompt_ind, word_inds] = 0
    alpha[start: end, prompt_ind, word_inds] = 1
    alpha[end:, prompt_ind, word_inds] = 0
    return alpha


def get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps, tokenizer, max_num_words=MAX_LEN):
    if type(cross_replace_steps) is not dict:
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0., 1.)
    alpha_time_words = np.zeros((num_steps + 1, len(prompts) - 1, max_num_words), dtype=np.float32)
    for i in range(len(prompts) - 1):
        alpha_time_words = update_alpha_time_word(alpha_time_words, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [get_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha_time_words = update_alpha_time_word(alpha_time_words, item, i, ind)
    # P2P reshapes to [steps + 1, P - 1, 1, 1, words] for broadcasting; kept 3-D here.
    return alpha_time_words


def get_replacement_mapper(prompts, tokenizer, max_len=MAX_LEN):
    return np.stack([get_replacement_mapper_(prompts[0], p, tokenizer, max_len) for p in prompts[1:]])


# --- the cases ---

REPLACE = {
    # 1 source token -> 2 edited tokens (spread 1/2), and a second edit with a 2-token word
    "replace_multi": ["a squirrel eating a burger", "a lemur eating a cheeseburger", "a lionfish eating a burger"],
    # 2 source tokens -> 1 edited token
    "replace_from_multi": ["a lionfish sitting on a sofa", "a cat sitting on a sofa"],
    # two words swapped, one of them multi-token on both sides
    "replace_two_words": ["a lionfish riding a bicycle", "a catfish riding a motorbike"],
}
REFINE = {
    "refine_insert": ["a cat sitting on a sofa", "a fluffy cat sitting on a red sofa"],
    "refine_two": [
        "a painting of a cat",
        "a photorealistic watercolor painting of a cat with a hat",
        "a painting of a lionfish",
    ],
    # words removed and one inserted
    "refine_delete": ["a fluffy cat sitting on a red sofa", "a cat on a big sofa"],
}
# P2P's per-word cross_replace_steps ({"default_": ..., word: ...}) over num_steps
ALPHA_WORDS = {
    "alpha_words": (
        ["a cat eating a burger", "a lionfish eating a burger", "a dog eating a lasagne"],
        10,
        {"default_": 0.8, "lionfish": 0.4, "lasagne": (0.2, 0.6)},
    ),
}
WORDS = {
    "words_repeated": ("a cat and a cat on a mat", "cat"),
    "words_article": ("a cat and a cat on a mat", "a"),
    "words_multi_token": ("a photorealistic tabby, next to a cat", "photorealistic"),
    "words_punctuation": ("a photorealistic tabby, next to a cat", "tabby,"),
    "words_absent": ("a cat sitting on a sofa", "dog"),
    "words_position": ("a photorealistic tabby, next to a cat", 1),
    # P2P's quirks kept: a double space is an empty word (the walk then lags a token behind)
    "words_double_space": ("a  cat with  two spaces", "cat"),
    "words_double_space_late": ("a  cat with  two spaces", "two"),
    "words_upper_case": ("A Photorealistic CAT", "CAT"),
    "words_hyphen": ("an ice-cream cone, melting", "ice-cream"),
    "words_after_punctuation": ("an ice-cream cone, melting", "melting"),
    # a character split across byte-level tokens (each decodes to U+FFFD)
    "words_split_bytes": ("a café in 東京 at night", "東京"),
    "words_after_split_bytes": ("a café in 東京 at night", "night"),
}


def main():
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, prompts in REPLACE.items():
        m = get_replacement_mapper(prompts, tok)
        np.save(OUT / f"{name}_mapper.npy", m)
        cases.append({"name": name, "kind": "replace", "prompts": prompts, "mapper": f"{name}_mapper.npy"})
    for name, prompts in REFINE.items():
        m, a = get_refinement_mapper(prompts, tok)
        np.save(OUT / f"{name}_mapper.npy", m)
        np.save(OUT / f"{name}_alphas.npy", a)
        cases.append({
            "name": name, "kind": "refine", "prompts": prompts,
            "mapper": f"{name}_mapper.npy", "alphas": f"{name}_alphas.npy",
        })
    for name, (prompts, steps, ranges) in ALPHA_WORDS.items():
        a = get_time_words_attention_alpha(prompts, steps, dict(ranges), tok)
        np.save(OUT / f"{name}.npy", a)
        ranges = {k: list(v) if isinstance(v, tuple) else v for k, v in ranges.items()}
        cases.append({
            "name": name, "kind": "alpha_words", "prompts": prompts, "steps": steps,
            "cross_replace_steps": ranges, "alpha": f"{name}.npy",
        })
    for name, (prompt, word) in WORDS.items():
        inds = get_word_inds(prompt, word, tok)
        np.save(OUT / f"{name}.npy", inds)
        cases.append({"name": name, "kind": "words", "prompt": prompt, "word": word, "indices": f"{name}.npy"})
        print(f"{name}: {prompt!r} {word!r} -> {inds.tolist()}")
    manifest = {
        "made_by": "models/export/p2p_aligner.py",
        "algorithm": "google/prompt-to-prompt ptp_utils.get_word_inds, seq_aligner.get_replacement_mapper / get_refinement_mapper (transcribed)",
        "tokenizer": "transformers CLIPTokenizer, models/pipelines/sd15_tiny/tokenizer",
        "transformers": transformers.__version__,
        "max_len": MAX_LEN,
        "cases": cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
