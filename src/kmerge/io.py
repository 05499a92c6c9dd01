"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole new one."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, flushed to
    disk and renamed over ``path``: a crash never leaves a half-written file. The file gets
    the permissions a plain ``open(path, "w")`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` as UTF-8 (newlines written as given)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: object) -> Path:
    """``payload`` as indented JSON, atomically (a result a resumed run trusts is never half
    written)."""
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def write_csv(path: str | Path, rows: Iterable[dict], columns: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV, atomically. ``columns``: the header, other keys left out (default: every
    key of the rows, in the order they first appear)."""
    rows = list(rows)
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())


def stored_json(
    path: str | Path, compute: Callable[[], dict], check: Callable[[dict], None] | None = None
) -> dict:
    """The JSON object stored at ``path`` (``check`` refuses one made with other settings), else
    ``compute()``'s, stored there atomically: a resumed recipe redoes only what is missing."""
    path = Path(path)
    if path.is_file():
        stored = json.loads(path.read_text())
        if check is not None:
            check(stored)
        return stored
    result = compute()
    write_json(path, result)
    return result


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``path`` (an old
    ``path`` is renamed aside first, then removed), on failure it is removed: ``path`` is never
    a half-written directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
