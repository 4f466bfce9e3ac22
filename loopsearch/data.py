"""Corpora, the tokeniser and token caches.

A Corpus plugin yields text splits (through Hugging Face ``datasets``). ``prepare`` trains a
byte-level BPE tokeniser on the train split (cached by corpus hash and vocabulary size) and
tokenises each split once (cached on disk), so the second trial of a study loads arrays.
Cache directory: $LOOPSEARCH_CACHE, else ~/.cache/loopsearch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel

from .errors import LoopsearchError

SPLITS = ("train", "valid")
TOKENIZER_FORMAT = 1  # bump when the tokeniser recipe changes, to invalidate caches


class Corpus:
    """Base class of corpus plugins (register subclasses with ``register_corpora``)."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: BaseModel):
        self.params = params

    def load_splits(self) -> dict[str, str]:
        """Return {"train": text, "valid": text}."""
        raise NotImplementedError


def cache_dir() -> Path:
    path = Path(os.environ.get("LOOPSEARCH_CACHE", Path.home() / ".cache" / "loopsearch"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir(explicit: str | Path | None = None) -> Path | None:
    """Where the shared evaluation corpora live (PTB, WikiText-2, LAMBADA, ...): ``explicit``,
    else ``$LOOPSEARCH_DATA``, else the first ``shared/data`` found beside the current directory
    or one of its parents (the layout of the loopsearch workspace). None when there is none."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("LOOPSEARCH_DATA"):
        return Path(os.environ["LOOPSEARCH_DATA"])
    here = Path.cwd().resolve()
    for parent in (here, *here.parents):
        for candidate in (parent / "shared" / "data", parent / "data"):
            if (candidate / "ptb").is_dir() or (candidate / "wikitext-2").is_dir():
                return candidate
    return None


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def lines_to_text(lines) -> str:
    """``datasets``' text loader yields lines without their newline; put them back."""
    return "".join(line + "\n" for line in lines)


@dataclass
class PreparedData:
    train: torch.Tensor  # (N,) int64 token ids
    valid: torch.Tensor
    tokenizer_json: str
    vocab_size: int  # tokens of the tokeniser (MASK is added by the backbone)
    fingerprint: str  # corpus hash

    def decode(self, ids) -> str:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json).decode(list(ids))


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    chunks = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer=trainer)
    return tok


def _encode(tok, text: str) -> np.ndarray:
    # encode in line-aligned chunks so `tokenizers` can use several threads
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i : i + 2000]) for i in range(0, len(lines), 2000)]
    ids = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(chunks)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)


def prepare(corpus: Corpus, vocab_size: int) -> PreparedData:
    """Load, tokenise and cache a corpus; cheap on the second call."""
    from tokenizers import Tokenizer

    splits = corpus.load_splits()
    for s in SPLITS:
        if not splits.get(s, "").strip():
            raise LoopsearchError(f"corpus {corpus.name!r} has an empty {s!r} split; give it text for {s}")
    fp = _digest(*(splits[s] for s in SPLITS))
    root = cache_dir() / f"{corpus.name}-{fp}"
    root.mkdir(parents=True, exist_ok=True)
    tok_path = root / f"tokenizer-v{vocab_size}-f{TOKENIZER_FORMAT}.json"
    if tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer(splits["train"], vocab_size)
        _atomic_write(tok_path, tok.to_str().encode())
    arrays = {}
    for s in SPLITS:
        path = root / f"{s}-v{vocab_size}-f{TOKENIZER_FORMAT}.npy"
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, _encode(tok, splits[s]))
            os.replace(tmp, path)
        arrays[s] = torch.from_numpy(np.load(path).astype(np.int64))
    return PreparedData(arrays["train"], arrays["valid"], tok.to_str(), tok.get_vocab_size(), fp)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def random_batch(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size windows of seq_len tokens at random offsets (B, T)."""
    if len(ids) <= seq_len:
        raise LoopsearchError(f"training split has {len(ids)} tokens, fewer than seq_len={seq_len}; "
                              f"use a larger corpus or a smaller seq_len")
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def validation_windows(ids: torch.Tensor, seq_len: int, n_windows: int) -> tuple[torch.Tensor, list[int]]:
    """Up to ``n_windows`` non-overlapping windows of seq_len tokens of the validation split,
    evenly spaced over it (all of them when the split has no more), and their indices among the
    split's windows (the key of their masks: loopsearch/diffusion.py ``window_generator``).
    Returns ((W, T) token ids, [index])."""
    total = len(ids) // seq_len
    if total == 0:
        raise LoopsearchError(f"validation split has {len(ids)} tokens, fewer than seq_len={seq_len}")
    n = min(n_windows, total)
    keys = [i * total // n for i in range(n)]
    windows = ids[: total * seq_len].view(total, seq_len)
    return windows[keys], keys


def subsample(windows: torch.Tensor, keys: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """n of the windows, evenly spaced (the learning curve's cheaper validations: a window keeps
    its key, so its masks are the ones the full validation uses)."""
    if n >= len(keys):
        return windows, keys
    picks = [i * len(keys) // n for i in range(n)]
    return windows[picks], [keys[i] for i in picks]


def validation_batches(ids: torch.Tensor, seq_len: int, n_sequences: int, batch_size: int) -> list[torch.Tensor]:
    """The first n_sequences non-overlapping windows of the validation split, in batches (the
    reference causal LM's validation, loopsearch/eval/reference.py)."""
    n = min(n_sequences, len(ids) // seq_len)
    if n == 0:
        raise LoopsearchError(f"validation split has {len(ids)} tokens, fewer than seq_len={seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    return list(windows.split(batch_size))
