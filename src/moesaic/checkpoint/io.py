"""Atomic file and folder writes: nothing already saved is lost when a write dies half-way.

Plan for a folder (`atomic_folder`):
 1. write every file into a sibling temporary folder `.tmp-<name>-<random>` (same filesystem);
 2. fsync each file, then the temporary folder itself;
 3. rename the temporary folder onto its final name (one `rename`, atomic on POSIX), fsync the parent.
A crash before step 3 leaves only a `.tmp-*` folder that readers ignore (`remove_stale_tmp` cleans it);
the previous complete folder is never touched, so the last good checkpoint stays loadable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (folders: so a rename inside it is durable). Best effort on odd filesystems."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(str(path), flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under folder, then every folder bottom-up."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, topdown=False):
        for f in files:
            fsync_path(Path(root) / f)
        for d in dirs:
            fsync_path(Path(root) / d)
    fsync_path(folder)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file atomically: temp file in the same folder, fsync, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + "-", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; saved files should read like ordinary ones
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """`with atomic_folder(dst) as tmp:` write files into tmp; on success tmp becomes dst atomically.

    `dst` must not exist yet (checkpoint folders are never rewritten in place). If the body raises,
    the temporary folder is removed and `dst` does not appear.
    """
    final = Path(final)
    if final.exists():
        raise ValueError(f"{final} already exists; refusing to overwrite a saved folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers create 0600 files; saved files should read like ordinary ones
            if f.is_file():
                os.chmod(f, 0o644)
        fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_link(target: str | Path, link: str | Path) -> None:
    """Point `link` at `target` atomically: a relative symlink made under a temp name, renamed over `link`."""
    link = Path(link)
    rel = os.path.relpath(Path(target), link.parent)
    tmp = link.parent / f"{TMP_PREFIX}{link.name}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(rel, tmp)
    if link.is_dir() and not link.is_symlink():
        raise ValueError(f"{link} is a real folder, not a link; refusing to replace it")
    os.replace(tmp, link)
    fsync_path(link.parent)


def remove_stale_tmp(folder: str | Path) -> int:
    """Delete `.tmp-*` leftovers of interrupted writes in folder; returns how many were removed."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            n += 1
    return n
