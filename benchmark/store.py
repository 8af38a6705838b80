"""Content-addressed run directories and atomic writes.

Every file a stage produces is written to a temporary name in the same directory and moved
into place with os.replace, which is atomic on POSIX: a kill -9 leaves either the old file,
the new file, or a stray ``*.tmp-*`` that is ignored and overwritten later, never a torn file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-able object that does not depend on dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_hash(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: Path) -> Any:
    # weights_only: our own files hold tensors, dicts, lists and numbers only.
    return torch.load(path, map_location="cpu", weights_only=True)


def save_figure(path: Path, fig: Any, **kwargs: Any) -> None:
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".")
    fig.savefig(buf, format=fmt, **kwargs)
    write_bytes(path, buf.getvalue())


def write_stream(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file too large to build in memory (``write`` streams into the open file),
    atomically like every other writer here."""
    _atomic(path, write)
