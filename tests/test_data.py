"""Data: corpus split, readers, bad input, BPE round-trip and cache, memory-mapped ids, window order."""

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from moesaic.data.bpe import train_tokenizer
from moesaic.data.corpus import builtin_files, is_validation, read_corpus
from moesaic.data.tokens import WindowSampler, eval_windows, tokenize_corpus


def small_corpus_dir(tmp_path: Path, n: int = 25) -> Path:
    """A folder of real stdlib files (the smallest n above 2 KB) plus nothing else."""
    files = sorted((p for p in builtin_files() if 2000 < p.stat().st_size < 12000), key=lambda p: p.name)[:n]
    d = tmp_path / "corpus"
    d.mkdir()
    for i, p in enumerate(files):
        shutil.copy(p, d / f"{i:03d}_{p.name}")
    return d


def test_builtin_corpus_excludes_tests_and_site_packages_and_splits_two_percent():
    files = builtin_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    for p in files:
        parts = p.relative_to(stdlib).parts
        assert p.suffix == ".py"
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), p
    c = read_corpus("builtin")
    frac = len(c.val) / (len(c.train) + len(c.val))
    assert 0.005 < frac < 0.06
    c2 = read_corpus("builtin")  # deterministic
    assert [d.key for d in c.val] == [d.key for d in c2.val] and c.fingerprint() == c2.fingerprint()


def test_split_is_a_pure_function_of_the_key():
    keys = [f"pkg/mod{i}.py" for i in range(20000)]
    val = [k for k in keys if is_validation(k, 0.02)]
    assert 300 < len(val) < 500  # ~2%
    assert val == [k for k in reversed(keys) if is_validation(k, 0.02)][::-1]


def test_folder_reader_skips_undecodable_files_with_a_warning(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(40):
        (d / f"f{i}.txt").write_text(f"document {i}\n" * 5)
    (d / "binary.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (d / ".hidden").write_text("never read")
    with pytest.warns(UserWarning, match="1 file"):
        c = read_corpus(str(d))
    assert c.skipped == [str(d / "binary.bin")]
    texts = {x.text for x in c.train + c.val}
    assert len(texts) == 40 and "never read" not in texts


def test_empty_folder_and_missing_path_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        read_corpus(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no such file"):
        read_corpus(str(tmp_path / "nope"))


def test_jsonl_reader_and_bad_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(60)) + "\n")
    c = read_corpus(str(p))
    assert sorted(d.text for d in c.train + c.val) == sorted(f"row {i}" for i in range(60))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        read_corpus(str(bad))


def test_single_text_file_is_split_in_blocks(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("".join(f"line {i}\n" for i in range(200 * 60)))
    c = read_corpus(str(p))
    assert len(c.train) + len(c.val) == 60 and c.val
    assert "".join(d.text for d in sorted(c.train + c.val, key=lambda d: int(d.key.split("#")[1]))) == \
        p.read_text()


def test_bpe_round_trips_the_corpus_and_is_cached(tmp_path):
    corpus = read_corpus(str(small_corpus_dir(tmp_path)))
    tok = train_tokenizer(corpus, vocab_size=700, cache_dir=tmp_path / "cache")
    assert tok.vocab_size == 700 and tok.eos_token_ids == [0]
    for d in corpus.train + corpus.val:
        ids = tok.encode(d.text)
        assert tok.decode(ids) == d.text
    assert len(tok.encode(corpus.train[0].text)) < len(corpus.train[0].text.encode()) / 2  # it compresses
    cached = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert len(cached) == 1
    again = train_tokenizer(corpus, vocab_size=700, cache_dir=tmp_path / "cache")
    assert again.backend.to_str() == tok.backend.to_str()
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1
    train_tokenizer(corpus, vocab_size=600, cache_dir=tmp_path / "cache")  # other settings, other entry
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 2
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, vocab_size=100, cache_dir=tmp_path / "cache")


def test_token_ids_are_memory_mapped_documents_joined_by_eos(tmp_path):
    corpus = read_corpus(str(small_corpus_dir(tmp_path, 8)))
    tok = train_tokenizer(corpus, vocab_size=500, cache_dir=tmp_path / "cache")
    data = tokenize_corpus(corpus, tok, cache_dir=tmp_path / "cache")
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    docs = np.split(np.asarray(data.train), np.flatnonzero(np.asarray(data.train) == data.eos_id) + 1)[:-1]
    assert [tok.decode(d[:-1].tolist()) for d in docs] == [d.text for d in corpus.train]
    again = tokenize_corpus(corpus, tok, cache_dir=tmp_path / "cache")  # cached: same file, same ids
    assert again.train.filename == data.train.filename and np.array_equal(again.val, data.val)


def test_window_sampler_visits_every_window_once_per_epoch_and_is_resumable():
    ids = np.arange(1001, dtype=np.uint16)
    s = WindowSampler(ids, seq_len=10, seed=3)
    assert s.num_windows == 100
    starts = [int(s.batch(i, 1)[0, 0]) for i in range(100)]
    assert sorted(starts) == list(range(0, 1000, 10))
    b = s.batch(150, 4)
    assert b.shape == (4, 11) and np.array_equal(b[:, 1:], b[:, :-1] + 1)
    fresh = WindowSampler(ids, seq_len=10, seed=3)  # position alone determines the batch
    assert np.array_equal(fresh.batch(150, 4), b)
    assert not np.array_equal(WindowSampler(ids, 10, seed=4).batch(0, 8), s.batch(0, 8))
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(ids[:5], seq_len=10, seed=0)
    ev = eval_windows(ids, 10, 7)
    assert ev.shape == (7, 11) and ev[0, 0] == 0 and ev[-1, 0] == 990
