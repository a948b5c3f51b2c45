"""Byte-level BPE tokenizer training with the `tokenizers` library, cached by corpus and settings.

Byte-level: every string round-trips exactly (any byte is a token), so no text is ever lost to <unk>.
The one special token `<|endoftext|>` (id 0) separates documents and ends generation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from moesaic.checkpoint.io import write_text_atomic
from moesaic.data.corpus import Corpus
from moesaic.tokenizer import Tokenizer

EOS = "<|endoftext|>"
BPE_VERSION = 1  # bump when the training recipe changes so stale caches are not reused
MAX_TRAIN_CHARS = 64_000_000  # BPE merges stop improving long before this; bounds time and memory


def default_cache_dir() -> Path:
    """$MOESAIC_CACHE, else ~/.cache/moesaic."""
    env = os.environ.get("MOESAIC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moesaic"


def train_tokenizer(corpus: Corpus, vocab_size: int = 8192, cache_dir: str | Path | None = None,
                    min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE trained on corpus.train (reused from the cache when corpus and settings match)."""
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be an integer >= 257 (256 bytes + <|endoftext|>), got {vocab_size!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{corpus.fingerprint()}|{vocab_size}|{min_frequency}|{BPE_VERSION}".encode())
    path = cache / "tokenizers" / f"bpe-{key.hexdigest()[:20]}.json"
    if path.exists():
        return _wrap(path.read_text())
    tok = _train(corpus, vocab_size, min_frequency)
    text = tok.to_str()
    write_text_atomic(path, text)
    return _wrap(text)


def _train(corpus: Corpus, vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_limited(corpus), trainer=trainer)
    return tok


def _limited(corpus: Corpus):
    n = 0
    for d in corpus.train:
        if n >= MAX_TRAIN_CHARS:
            return
        n += len(d.text)
        yield d.text


def _wrap(json_text: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(json_text)
    eos = tok.token_to_id(EOS)
    return Tokenizer(tok, eos_token_ids=[eos] if eos is not None else [])
