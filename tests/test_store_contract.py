"""benchmark.store against hand-computed values: run-directory hashes and atomic writes.

Every expected hash here is sha256 of a byte string written out by hand, so a change to the
canonical JSON (key order, separators, default=str) or to the hash length shows up as a
different run directory name before it silently orphans finished runs.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark import store


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def test_stable_hash_is_sha256_of_compact_sorted_json():
    assert store.stable_hash({"b": [1, 2], "a": 1}) == _sha(b'{"a":1,"b":[1,2]}')[:12]
    assert store.stable_hash({"x": {"z": 1.5, "y": "s"}}) == _sha(b'{"x":{"y":"s","z":1.5}}')[:12]
    assert store.stable_hash([1, None, True]) == _sha(b"[1,null,true]")[:12]


def test_stable_hash_length_and_non_json_values():
    assert len(store.stable_hash({"a": 1})) == 12
    assert store.stable_hash({"a": 1}, length=5) == _sha(b'{"a":1}')[:5]
    assert store.stable_hash({"a": 1}, length=64) == _sha(b'{"a":1}')
    # default=str: a Path hashes as its string
    assert store.stable_hash({"p": Path("runs/x")}) == _sha(b'{"p":"runs/x"}')[:12]


def test_file_hash_streams_whole_file(tmp_path):
    data = bytes(range(256)) * (3 * 4096 + 17)  # ~3 MiB: several 1 MiB chunks plus a tail
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    assert store.file_hash(p) == _sha(data)[:16]
    assert store.file_hash(p, length=40) == _sha(data)[:40]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert store.file_hash(empty) == _sha(b"")[:16]


def test_writes_create_parent_dirs_and_exact_bytes(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    store.write_text(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode("utf-8")
    store.write_text(target, "second")  # the directory exists now: no error, replaced
    assert target.read_text() == "second"
    store.write_bytes(tmp_path / "raw.bin", b"\x00\x01\xff")
    assert (tmp_path / "raw.bin").read_bytes() == b"\x00\x01\xff"


def test_written_files_are_world_readable(tmp_path):
    old = os.umask(0o077)  # even with a strict umask: fchmod sets 0644 explicitly
    try:
        store.write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


def test_atomic_writes_a_temporary_next_to_the_target(tmp_path):
    target = tmp_path / "r.json"
    seen: list[list[str]] = []

    def write(f):
        seen.append(sorted(os.listdir(tmp_path)))
        f.write(b"{}")

    store._atomic(target, write)
    (names,) = seen
    assert len(names) == 1 and names[0].startswith("r.json.tmp-")
    assert os.listdir(tmp_path) == ["r.json"] and target.read_bytes() == b"{}"


def test_failed_write_propagates_and_cleans_up(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # BaseException too: a Ctrl-C must not leave a torn file

    with pytest.raises(KeyboardInterrupt):
        store._atomic(target, boom)
    assert os.listdir(tmp_path) == ["r.json"] and target.read_text() == "old"


def test_write_json_format(tmp_path):
    p = tmp_path / "r.json"
    store.write_json(p, {"b": 1, "a": [1, 2]})
    assert p.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert store.read_json(p) == {"a": [1, 2], "b": 1}


def test_write_json_converts_scalars_and_paths(tmp_path):
    p = tmp_path / "r.json"
    store.write_json(p, {"t": torch.tensor(2.5), "n": np.float64(0.25), "i": np.int64(3), "p": Path("x/y")})
    assert store.read_json(p) == {"i": 3, "n": 0.25, "p": "x/y", "t": 2.5}
    with pytest.raises(TypeError, match="not JSON serialisable: <class 'object'>"):
        store.write_json(tmp_path / "bad.json", {"o": object()})
    assert not (tmp_path / "bad.json").exists()


def test_json_default_directly():
    assert store._json_default(np.int32(7)) == 7 and isinstance(store._json_default(np.int32(7)), int)
    assert store._json_default(Path("a/b")) == "a/b"
    with pytest.raises(TypeError):
        store._json_default({1, 2})


def test_torch_round_trip_and_weights_only(tmp_path):
    p = tmp_path / "m.pt"
    obj = {"w": torch.arange(6.0).view(2, 3), "step": 4, "names": ["a", "b"]}
    store.save_torch(p, obj)
    back = store.load_torch(p)
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 4 and back["names"] == ["a", "b"]
    assert back["w"].device.type == "cpu"
    # weights_only=True: an arbitrary pickled object is refused, not executed
    torch.save({"bad": _Custom()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        store.load_torch(tmp_path / "evil.pt")


class _Custom:
    pass


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_save_figure_format_from_suffix_and_kwargs(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    store.save_figure(tmp_path / "f.png", fig, dpi=50)
    store.save_figure(tmp_path / "g.svg", fig)
    plt.close(fig)
    assert _png_size(tmp_path / "f.png") == (100, 50)  # 2 x 1 inches at the dpi passed through
    assert b"<svg" in (tmp_path / "g.svg").read_bytes()[:2000]
    assert sorted(os.listdir(tmp_path)) == ["f.png", "g.svg"]


def test_load_torch_maps_to_cpu_and_refuses_pickles(monkeypatch, tmp_path):
    # a checkpoint written on a GPU machine must load on a CPU-only one, and never unpickle code
    seen = {}

    def spy(path, **kw):
        seen.update(kw)
        return "ok"

    monkeypatch.setattr(store.torch, "load", spy)
    assert store.load_torch(tmp_path / "x.pt") == "ok"
    assert seen == {"map_location": "cpu", "weights_only": True}
