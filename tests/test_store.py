import os

import torch

from benchmark.store import load_torch, save_torch, stable_hash, write_json, read_json


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_atomic_writes_leave_no_temporaries(tmp_path):
    write_json(tmp_path / "r.json", {"x": 1.5})
    save_torch(tmp_path / "m.pt", {"w": torch.ones(3)})
    assert read_json(tmp_path / "r.json") == {"x": 1.5}
    assert torch.equal(load_torch(tmp_path / "m.pt")["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "r.json"]


def test_failed_write_keeps_old_file(tmp_path):
    write_json(tmp_path / "r.json", {"x": 1})
    try:
        write_json(tmp_path / "r.json", {"x": object()})
    except TypeError:
        pass
    assert read_json(tmp_path / "r.json") == {"x": 1}
    assert os.listdir(tmp_path) == ["r.json"]
