"""Token ids on disk (memory-mapped) and a deterministic, resumable order of training windows.

Each split is one flat array of token ids: documents joined with <|endoftext|>, stored as uint16
(vocab <= 65536) or uint32 in `<cache>/tokens/<corpus>-<tokenizer>/{train,val}.bin`. Epochs read the
array through np.memmap, never re-tokenizing.

Windows: the training array is cut into W = (n - 1) // S windows of S + 1 tokens (inputs and shifted
targets share S tokens). Sample i of the run is window perm_e[i mod W] with e = i // W and perm_e a
permutation seeded by (seed, e): every window is seen once per epoch, and the data position of a run
is one integer, the number of samples consumed, so resume is exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesaic.checkpoint.io import write_bytes_atomic, write_text_atomic
from moesaic.data.bpe import default_cache_dir, train_tokenizer
from moesaic.data.corpus import Corpus, read_corpus
from moesaic.tokenizer import Tokenizer

ENCODE_CHUNK = 512  # documents per encode_batch call


@dataclass
class TokenData:
    train: np.ndarray  # [N_train] memmap of token ids
    val: np.ndarray  # [N_val]
    vocab_size: int
    eos_id: int


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | Path | None = None) -> TokenData:
    """Token ids of both splits, from the cache when this corpus and tokenizer were seen before."""
    if not tokenizer.eos_token_ids:
        raise ValueError("the tokenizer has no end-of-text token; documents cannot be separated")
    eos = tokenizer.eos_token_ids[0]
    tok_hash = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:12]
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "tokens" / \
        f"{corpus.fingerprint()}-{tok_hash}"
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        for split in ("train", "val"):
            ids = _encode(getattr(corpus, split), tokenizer, eos).astype(dtype)
            write_bytes_atomic(folder / f"{split}.bin", ids.tobytes())
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "eos_id": eos}
        write_text_atomic(meta_path, json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    arrays = [np.memmap(folder / f"{s}.bin", dtype=meta["dtype"], mode="r") for s in ("train", "val")]
    return TokenData(arrays[0], arrays[1], int(meta["vocab_size"]), int(meta["eos_id"]))


def _encode(docs, tokenizer: Tokenizer, eos: int) -> np.ndarray:
    parts: list[np.ndarray] = []
    for i in range(0, len(docs), ENCODE_CHUNK):
        encs = tokenizer.backend.encode_batch([d.text for d in docs[i:i + ENCODE_CHUNK]],
                                              add_special_tokens=False)
        for e in encs:
            parts.append(np.asarray(e.ids + [eos], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def prepare_data(source: str = "builtin", vocab_size: int = 8192, val_fraction: float = 0.02,
                 cache_dir: str | Path | None = None, tokenizer: Tokenizer | None = None,
                 max_chars: int | None = None) -> tuple[Tokenizer, TokenData, Corpus]:
    """Read the corpus, train (or reuse) the tokenizer, tokenize (or reuse) both splits."""
    corpus = read_corpus(source, val_fraction, max_chars)
    tok = tokenizer if tokenizer is not None else train_tokenizer(corpus, vocab_size, cache_dir)
    return tok, tokenize_corpus(corpus, tok, cache_dir), corpus


class WindowSampler:
    """Deterministic order of [S + 1]-token windows over a token array (see the module docstring)."""

    def __init__(self, ids: np.ndarray, seq_len: int, seed: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.ids, self.seq_len, self.seed = ids, seq_len, seed
        self.num_windows = (len(ids) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"the data holds {len(ids)} tokens, fewer than one window of seq_len+1="
                             f"{seq_len + 1}; use more data or a shorter --seq-len")
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _window(self, i: int) -> int:
        epoch, j = divmod(i, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[j])

    def epoch_of(self, position: int) -> float:
        return position / self.num_windows

    def batch(self, position: int, batch_size: int) -> np.ndarray:
        """Samples position .. position+batch_size-1 as an int64 array [batch_size, seq_len + 1]."""
        rows = [self.window_at(self._window(position + b)) for b in range(batch_size)]
        return np.stack(rows)

    def window_at(self, w: int) -> np.ndarray:
        s = w * self.seq_len
        return np.asarray(self.ids[s:s + self.seq_len + 1], dtype=np.int64)


def eval_windows(ids: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """A fixed set of validation windows [n, seq_len + 1], evenly spread over the split."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the validation split holds {len(ids)} tokens, fewer than seq_len+1={seq_len + 1}")
    picks = np.unique(np.linspace(0, n - 1, num=min(n, max_windows)).round().astype(np.int64))
    return np.stack([np.asarray(ids[w * seq_len:w * seq_len + seq_len + 1], dtype=np.int64) for w in picks])
