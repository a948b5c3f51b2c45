"""Documents to train on: the built-in corpus (Python source on this machine) or the user's files.

Sources (`read_corpus(source)`):
  "builtin"        every *.py of the standard library (sysconfig "stdlib"), outside test folders and
                   site-packages (~13 MB on CPython 3.12)
  "builtin:large"  every *.py under the interpreter's stdlib and site-packages folders, deduplicated by
                   content hash (~150 MB in the project's environment)
  a .jsonl file    one JSON object per line with a "text" field
  a text file      split into blocks of `BLOCK_LINES` lines so it can have a validation part
  a folder         every file below it (recursively; hidden files skipped) read as UTF-8 text

Split: a document goes to validation when a hash of its key (path, or content for builtin:large) falls
in the first `val_fraction` of the hash range: deterministic, independent of file order and of the
other files, so adding a file never moves another one between splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_LINES = 200
TEST_DIRS = {"test", "tests", "idle_test", "__pycache__"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Document:
    key: str  # what the split hashes: a path (+ block/line index) or a content hash
    text: str


@dataclass
class Corpus:
    """Documents split into train and validation, plus what was skipped."""

    source: str
    train: list[Document] = field(default_factory=list)
    val: list[Document] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # undecodable or unreadable files
    duplicates: int = 0

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.train) + sum(len(d.text) for d in self.val)

    def fingerprint(self) -> str:
        """Hash of every document's key, split and content: the cache key of tokenizer and token ids."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("val", self.val)):
            for d in docs:
                h.update(f"{split}\0{d.key}\0".encode())
                h.update(hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest())
        return h.hexdigest()[:20]


def is_validation(key: str, val_fraction: float) -> bool:
    """True when sha256(key) lands in the first val_fraction of the hash range."""
    v = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return v < val_fraction * 2**64


def builtin_files(large: bool = False) -> list[Path]:
    """The built-in corpus' files, sorted. Small: stdlib outside tests/site-packages. Large: + site-packages."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    if large:
        roots += [Path(paths[k]) for k in ("purelib", "platlib") if k in paths]
    seen: set[Path] = set()
    out: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not _skip_dir(d, large))
            for f in sorted(files):
                if f.endswith(".py"):
                    p = Path(dirpath) / f
                    rp = p.resolve()
                    if rp not in seen:
                        seen.add(rp)
                        out.append(p)
    return out


def _skip_dir(name: str, large: bool) -> bool:
    if name.startswith(".") or name == "__pycache__":
        return True
    return not large and (name in TEST_DIRS or name in SKIP_DIRS)


def read_corpus(source: str = "builtin", val_fraction: float = 0.02, max_chars: int | None = None) -> Corpus:
    """Read and split a corpus (see the module docstring for the accepted sources).

    max_chars (built-in corpora only): stop after about this many characters, taking files in an order
    fixed by a hash of their path (a spread-out sample rather than the alphabetically first packages).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    corpus = Corpus(source=source)
    if source in ("builtin", "builtin:large"):
        large = source == "builtin:large"
        root = Path(sysconfig.get_paths()["stdlib"]).parent
        files = builtin_files(large)
        if max_chars is not None:
            files.sort(key=lambda p: hashlib.sha256(str(p).encode()).digest())
        n_chars = 0
        for p in files:
            if max_chars is not None and n_chars >= max_chars:
                break
            text = _read_text(p, corpus)
            n_chars += len(text or "")
            if text is None or not text.strip():
                continue
            key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() if large else _rel(p, root)
            _add(corpus, Document(key, text), val_fraction)
        if large:
            _dedupe(corpus)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"--data {source!r}: no such file or folder (or use 'builtin' / 'builtin:large')")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
            if not files:
                raise ValueError(f"--data {source!r}: the folder holds no files")
            for p in files:
                _read_file_into(corpus, p, str(p.relative_to(path)), val_fraction)
        else:
            _read_file_into(corpus, path, path.name, val_fraction)
    if corpus.skipped:
        warnings.warn(f"{len(corpus.skipped)} file(s) skipped as unreadable or not UTF-8 text, e.g. "
                      f"{corpus.skipped[0]}", stacklevel=2)
    if not corpus.train:
        raise ValueError(f"--data {source!r}: no training text found (empty files or everything skipped)")
    if not corpus.val:  # tiny corpora: take the last training document so validation is never empty
        corpus.val.append(corpus.train.pop())
        if not corpus.train:
            raise ValueError(f"--data {source!r}: need at least two documents (one for validation)")
    return corpus


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _add(corpus: Corpus, doc: Document, val_fraction: float) -> None:
    (corpus.val if is_validation(doc.key, val_fraction) else corpus.train).append(doc)


def _dedupe(corpus: Corpus) -> None:
    for split in ("train", "val"):
        seen: set[str] = set()
        kept = []
        for d in getattr(corpus, split):
            if d.key in seen:
                corpus.duplicates += 1
                continue
            seen.add(d.key)
            kept.append(d)
        setattr(corpus, split, kept)


def _read_text(p: Path, corpus: Corpus) -> str | None:
    try:
        return p.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        corpus.skipped.append(str(p))
        return None


def _read_file_into(corpus: Corpus, p: Path, key: str, val_fraction: float) -> None:
    if p.suffix == ".jsonl":
        _read_jsonl(corpus, p, key, val_fraction)
        return
    text = _read_text(p, corpus)
    if text is None or not text.strip():
        return
    lines = text.splitlines(keepends=True)
    for b in range(0, len(lines), BLOCK_LINES):
        _add(corpus, Document(f"{key}#{b // BLOCK_LINES}", "".join(lines[b:b + BLOCK_LINES])), val_fraction)


def _read_jsonl(corpus: Corpus, p: Path, key: str, val_fraction: float) -> None:
    text = _read_text(p, corpus)
    if text is None:
        return
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{i + 1}: not valid JSON ({e.msg}); expected one object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{p}:{i + 1}: each JSONL line needs a string field 'text'")
        if obj["text"].strip():
            _add(corpus, Document(f"{key}:{i}", obj["text"]), val_fraction)
