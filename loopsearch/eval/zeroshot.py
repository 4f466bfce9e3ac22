"""Zero-shot perplexity bounds of a trained checkpoint on a held-out text file.

The text (WikiText-2 raw, LAMBADA jsonl, PTB, or any UTF-8 text file) is tokenised with the
checkpoint's own tokeniser, cut into non-overlapping windows of ``seq_len`` tokens (the tail
shorter than a window is dropped), and scored with the validation ELBO
(``loopsearch.diffusion.validation_elbo``: masks keyed by window, with a standard error). The
ELBO is an upper bound on the NLL, so exp(nats/token) is an upper bound on the perplexity.

Per-token numbers depend on the tokeniser; bits per byte do not:
bits/byte = total nats / ln 2 / UTF-8 bytes of the evaluated windows. The byte count is exact:
with the byte-level BPE every token is a run of bytes, counted one by one (a window may start
or end inside a multi-byte character). Inference FLOPs per token are what the forward passes
executed (``ExecutionRecorder``), in the one FLOP accounting; ``eval_flops`` is their total
over every window and every mask draw.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from .. import checkpoint
from ..data import _encode, validation_windows
from ..diffusion import validation_elbo
from ..errors import LoopsearchError
from ..looping import ExecutionRecorder
from ..train import resolve_device

JSONL_SUFFIXES = (".jsonl", ".json")


def _read_jsonl(path: Path, text: str) -> str:
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            docs.append(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LoopsearchError(f"{path}:{i} is not a JSON object with a `text` field; give a jsonl file of "
                                  f'{{"text": ...}} records (like LAMBADA) or a plain text file') from None
        if not isinstance(docs[-1], str):
            raise LoopsearchError(f"{path}:{i}: `text` is a {type(docs[-1]).__name__}, not a string")
    return "\n\n".join(docs)


def _looks_like_jsonl(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict) and "text" in json.loads(first)
    except json.JSONDecodeError:
        return False


def read_eval_text(path: str | Path) -> str:
    """The text of an evaluation file: a ``.jsonl`` (or any file whose first line is a JSON
    object with a ``text`` field, like LAMBADA) gives its documents joined by a blank line;
    anything else (WikiText ``.raw``, PTB ``.txt``, ...) is read as UTF-8 text as it is."""
    path = Path(path)
    if not path.is_file():
        raise LoopsearchError(f"evaluation text not found: {path}; pass an existing .txt, .raw or .jsonl file "
                              f"(e.g. ../shared/data/wikitext-2/wiki.test.raw)")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LoopsearchError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8 first") from None
    text = _read_jsonl(path, raw) if path.suffix.lower() in JSONL_SUFFIXES or _looks_like_jsonl(raw) else raw
    if not text.strip():
        raise LoopsearchError(f"evaluation text {path} is empty; pass a file with text in it")
    return text


def token_byte_lengths(tokenizer_json: str) -> np.ndarray | None:
    """UTF-8 bytes of every token id of a byte-level BPE tokeniser (each character of a
    byte-level token stands for one byte); None for any other tokeniser."""
    spec = json.loads(tokenizer_json)
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("added_tokens"):
        return None
    tok = Tokenizer.from_str(tokenizer_json)
    return np.array([len(tok.id_to_token(i) or "") for i in range(tok.get_vocab_size())], dtype=np.int64)


def _window_bytes(tokenizer_json: str, windows: torch.Tensor) -> int:
    lengths = token_byte_lengths(tokenizer_json)
    if lengths is not None:
        return int(lengths[windows.reshape(-1).numpy()].sum())
    tok = Tokenizer.from_str(tokenizer_json)  # not byte-level: decode each window (approximate at the seams)
    return sum(len(tok.decode(w.tolist()).encode("utf-8")) for w in windows)


def tokenize(tokenizer_json: str, text: str) -> torch.Tensor:
    """Token ids (N,) int64 of ``text``, encoded as the corpus was (loopsearch.data)."""
    return torch.from_numpy(_encode(Tokenizer.from_str(tokenizer_json), text).astype(np.int64))


@torch.no_grad()
def zeroshot_nll(model, tokenizer_json: str, text: str, *, seq_len: int, n_sequences: int | None = None,
                 batch_size: int = 64, draws: int = 2, seed: int = 1234, device: str | None = None,
                 n_loops: int | None = None) -> dict:
    """ELBO bound of ``model`` (a LoopedMDM) on ``text``, over ``n_sequences`` non-overlapping
    windows of ``seq_len`` tokens evenly spaced over it (None: every whole window), with ``draws``
    mask draws per window (loopsearch/diffusion.py: validation_elbo).

    Returns nll (nats/token, the ELBO), nll_se (its Monte-Carlo standard error), perplexity_bound
    (exp of nll), bits_per_byte, total_nats,
    tokens and bytes evaluated, windows, tokens_available (the whole text), mean_loops (loop-block
    applications per forward pass), inference_flops_per_token (one forward pass, what ran) and
    eval_flops (all the forward passes). ``n_loops``: the loop count (None: the model's own);
    ``device``: where to run (None: where the model is).
    """
    if seq_len < 1 or batch_size < 1 or draws < 2:
        raise LoopsearchError(f"seq_len and batch_size must be >= 1 and draws >= 2, "
                              f"got {seq_len}, {batch_size}, {draws}")
    if n_sequences is not None and n_sequences < 1:
        raise LoopsearchError(f"n_sequences must be >= 1 (or None for every window), got {n_sequences}")
    if not text.strip():
        raise LoopsearchError("the evaluation text is empty; pass a file with text in it")
    ids = tokenize(tokenizer_json, text)
    n = len(ids) // seq_len
    if n == 0:
        raise LoopsearchError(f"the evaluation text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
                              f"use a longer text or a smaller seq_len")
    windows, keys = validation_windows(ids, seq_len, n_sequences or n)
    n = len(keys)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(dev).eval()
    rec = ExecutionRecorder(model)
    try:
        val = validation_elbo(rec, windows.to(dev), keys, model.backbone.mask_id, draws, seed=seed,
                              batch_size=batch_size, n_loops=n_loops)
    finally:
        model.train(was_training)
    apps, extra = rec.means()
    flops_tok = model.inference_flops_per_token(seq_len, apps, extra)
    tokens = n * seq_len
    n_bytes = _window_bytes(tokenizer_json, windows)
    nll = val.nll
    total = nll * tokens
    return {"nll": nll, "nll_se": val.se, "perplexity_bound": math.exp(min(nll, 700.0)),
            "bits_per_byte": total / math.log(2) / n_bytes,
            "total_nats": total, "tokens": tokens, "bytes": n_bytes, "windows": n, "seq_len": seq_len,
            "tokens_available": len(ids), "draws": draws, "seed": seed,
            "mean_loops": apps if model.strategy.loops_block else 1.0,
            "inference_flops_per_token": flops_tok, "eval_flops": flops_tok * tokens * draws}


def zeroshot_checkpoint(directory: str | Path, path: str | Path, *, seq_len: int | None = None,
                        n_sequences: int | None = None, batch_size: int | None = None, draws: int | None = None,
                        seed: int = 1234, device: str = "auto", n_loops: int | None = None) -> dict:
    """``zeroshot_nll`` of a trial checkpoint on the text file ``path``; defaults come from the
    trial's config (seq_len: its training length, at most; eval_batch_size, eval_draws)."""
    text = read_eval_text(path)
    model, config, tokenizer_json = checkpoint.load(directory)
    trained = config.train.seq_len
    seq_len = seq_len or trained
    if not 1 <= seq_len <= trained:
        raise LoopsearchError(f"seq_len {seq_len} must be between 1 and {trained}, the length the trial was trained at")
    out = zeroshot_nll(model, tokenizer_json, text, seq_len=seq_len, n_sequences=n_sequences,
                       batch_size=batch_size or config.train.eval_batch_size, draws=draws or config.train.eval_draws,
                       seed=seed, device=device, n_loops=n_loops)
    return {"path": str(path), "checkpoint": str(directory), **out}
