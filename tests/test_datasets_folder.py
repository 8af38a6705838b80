"""File-backed datasets (dataset=imagenet / dataset=folder): the class-folder index, the ADM centre
crop against a direct PIL computation, RGB conversion, bad files (skipped and counted, or an
error), roots rejected at config validation, the sharded resumable loader, and a tokenizer stage
trained from a folder. Every tree is built here, in tmp_path, with mixed sizes and modes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark import config
from benchmark.datasets import (BadImageError, FileImageSet, ImageSet, check_dataset, class_balanced, load_images,
                                open_dataset, subset)
from benchmark.datasets.files import scan
from benchmark.datasets.loader import ShardSampler, ShardedLoader
from _launch import clean_env

ROOT = Path(__file__).resolve().parent.parent
WNIDS = ("n02", "n10", "n01")  # written out of order: the index must sort them
# (width, height) pairs: landscape, portrait, square, wider than 2x the target (BOX halvings)
SIZES = [(40, 30), (30, 52), (24, 24), (100, 37), (33, 80), (70, 70), (45, 20), (20, 45)]
MODES = ["RGB", "L", "CMYK", "RGBA", "P"]


def _image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    w, h = size
    # Smooth gradients plus noise: resampling differences would show, flat colour would hide them.
    base = np.linspace(0, 255, w)[None, :, None] * 0.5 + np.linspace(0, 255, h)[:, None, None] * 0.5
    arr = np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA"); img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=90)


def build_tree(root: Path, per_class: int = 8, bad: bool = True) -> Path:
    """ImageNet layout: train/<wnid>/ and val/<wnid>/ with mixed sizes and modes (JPEG for
    RGB, L and CMYK; PNG for RGBA and P). With ``bad``: one truncated JPEG and one non-JPEG
    byte string named .JPEG in train/n01, and a text file in train/n02."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 3)):
        for c, wnid in enumerate(WNIDS):
            for i in range(n):
                mode = MODES[(i + c) % len(MODES)]
                ext = ".png" if mode in ("RGBA", "P") else ".JPEG"
                _save(_image(rng, SIZES[(i + 3 * c) % len(SIZES)], mode), root / split / wnid / f"{wnid}_{i:03d}{ext}")
    if bad:
        good = (root / "train/n01/n01_000.JPEG").read_bytes()
        (root / "train/n01/n01_000b_truncated.JPEG").write_bytes(good[: len(good) // 2])
        (root / "train/n01/n01_000c_garbage.JPEG").write_bytes(b"this is not a JPEG at all" * 20)
        (root / "train/n02/notes.txt").write_text("not an image")
    return root


def settings(root: Path, name: str = "imagenet", **kw) -> dict:
    return {"name": name, "resolution": 16, "channels": 3, "num_classes": 3, "root": str(root),
            "workers": 0, **kw}


def adm_reference(path: Path, size: int) -> np.ndarray:
    """The ADM centre crop written directly on PIL + numpy, as guided-diffusion's data loader
    describes it (PAPER_SCALE.md): RGB, BOX halvings, BICUBIC to the short side, central crop."""
    img = Image.open(path)
    img.load()
    img = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("imagenet"))


def test_class_order_index_and_split_names(tree):
    train = open_dataset(settings(tree), "train")
    test = open_dataset(settings(tree), "test")
    assert isinstance(train, FileImageSet) and train.class_names == ("n01", "n02", "n10")
    assert test.class_names == train.class_names and len(test) == 9  # the suite's test split is val/
    assert test.index.root == tree / "val"
    # 8 per class + 2 damaged .JPEG files in n01 (found at decode time); notes.txt is skipped at the scan
    assert len(train) == 26 and train.index.skipped == (os.path.join("n02", "notes.txt"),)
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [0] * 10 + [1] * 8 + [2] * 8
    # class_start: each class one contiguous run of rows, the file names sorted within it
    names = [os.fsdecode(f) for f in train.index.files]
    assert all(n.startswith("n01/") for n in names[:10]) and names[10:18] == sorted(names[10:18])
    assert (train.channels, train.resolution, train.num_classes) == (3, 16, 3)


def test_adm_crop_matches_direct_pil_reference(tree):
    ds = open_dataset(settings(tree, resolution=16), "test")
    x = ds.uint8_batch(torch.arange(len(ds)))
    assert x.shape == (9, 3, 16, 16) and x.dtype == torch.uint8
    for i in range(len(ds)):
        ref = adm_reference(Path(ds.index.path(i)), 16)
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), ref), ds.index.path(i)
    f = ds.float_batch(torch.tensor([0, 4]))
    assert f.dtype == torch.float32 and torch.equal(f, x[[0, 4]].float() / 255)
    # A target below half of every short side exercises the BOX halvings (100x37 -> 50x18 at 8 px).
    small = open_dataset(settings(tree, resolution=8), "train")
    rows = [i for i in range(len(small)) if "garbage" not in small.index.path(i) and "truncated" not in
            small.index.path(i)]
    got = small.uint8_batch(torch.tensor(rows))
    for j, i in enumerate(rows):
        assert np.array_equal(got[j].permute(1, 2, 0).numpy(), adm_reference(Path(small.index.path(i)), 8))


def test_modes_become_rgb(tree):
    ds = open_dataset(settings(tree), "train")
    modes = {}
    for i in range(len(ds)):
        try:
            modes[i] = Image.open(ds.index.path(i)).mode
        except Exception:
            continue
    assert {"L", "CMYK", "RGBA", "P", "RGB"} <= set(modes.values())
    grey = next(i for i, m in modes.items() if m == "L")
    g = ds.uint8_batch(torch.tensor([grey]))[0]
    assert g.shape[0] == 3 and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    for mode in ("CMYK", "RGBA", "P"):
        i = next(i for i, m in modes.items() if m == mode)
        assert tuple(ds.uint8_batch(torch.tensor([i]))[0].shape) == (3, 16, 16)


def test_bad_files_skipped_counted_or_refused(tree):
    ds = FileImageSet("imagenet", "train", scan(str(tree / "train")), 16, "skip")
    assert ds.bad_images == 1  # notes.txt, from the scan
    names = [Path(ds.index.path(i)).name for i in range(len(ds))]
    trunc, garbage = names.index("n01_000b_truncated.JPEG"), names.index("n01_000c_garbage.JPEG")
    x = ds.uint8_batch(torch.arange(len(ds)))
    assert ds.bad_images == 3 and ds.bad.rows == {trunc, garbage}
    # a damaged file is replaced by the next decodable file of its class: the label stays right
    assert torch.equal(x[trunc], x[garbage + 1]) and torch.equal(x[garbage], x[garbage + 1])
    assert int(ds.labels[garbage + 1]) == int(ds.labels[trunc]) == 0
    strict = FileImageSet("imagenet", "train", scan(str(tree / "train")), 16, "fail")
    with pytest.raises(BadImageError, match="n01_000b_truncated.JPEG.*on_bad_image=skip"):
        strict.uint8_batch(torch.tensor([trunc]))
    with pytest.raises(BadImageError, match="garbage"):
        strict.uint8_batch(torch.tensor([garbage]))
    assert strict.uint8_batch(torch.tensor([0])).shape == (1, 3, 16, 16)  # good files still decode


def test_views_subset_and_balanced_selection(tree):
    ds = open_dataset(settings(tree), "train")
    sub = subset(ds, 12, seed=3)
    assert isinstance(sub, FileImageSet) and len(sub) == 12
    assert torch.equal(sub.uint8_batch(torch.tensor([5])), ds.uint8_batch(torch.tensor([int(sub.rows[5])])))
    bal = class_balanced(ds, 9, seed=0)
    assert bal.labels.tolist() == [0, 1, 2] * 3 and bal.bad is ds.bad
    nested = bal.select(torch.tensor([2, 0]))
    assert nested.labels.tolist() == [2, 0] and list(nested.rows) == [int(bal.rows[2]), int(bal.rows[0])]
    with pytest.raises(AttributeError, match="uint8_batch"):
        _ = ds.images
    # the in-memory sets keep their tensors and gain the same methods
    fm = load_images("fashion_mnist", "test", 32)
    assert isinstance(fm, ImageSet) and (fm.channels, fm.resolution) == (1, 32)
    idx = torch.tensor([3, 1, 4])
    assert torch.equal(fm.uint8_batch(idx), fm.images[idx])
    assert torch.equal(subset(fm, 50, seed=1).images,
                       fm.images[torch.randperm(len(fm), generator=torch.Generator().manual_seed(1))[:50].sort().values])


def test_flat_folder_is_one_class(tmp_path):
    rng = np.random.default_rng(1)
    for i, mode in enumerate(MODES):
        _save(_image(rng, SIZES[i], mode), tmp_path / "flat" / f"img{i}{'.png' if mode in ('RGBA', 'P') else '.jpg'}")
    s = settings(tmp_path / "flat", name="folder", num_classes=1, resolution=12)
    check_dataset(s)
    ds = open_dataset(s, "train")
    assert ds.class_names == ("flat",) and len(ds) == 5 and ds.uint8_batch(torch.arange(5)).shape == (5, 3, 12, 12)
    with pytest.raises(ValueError, match="num_classes=1"):
        check_dataset(settings(tmp_path / "flat", name="folder", num_classes=4))


def test_bad_roots_rejected_at_validation(tmp_path, tree):
    over = ["grid=single", "dataset=folder", "dataset.resolution=32", f"run_root={tmp_path / 'runs'}"]
    with pytest.raises(ValueError, match=f"dataset.root={tmp_path / 'nope'} does not exist"):
        config.load([*over, f"dataset.root={tmp_path / 'nope'}"])
    (tmp_path / "empty/a").mkdir(parents=True)
    (tmp_path / "empty/a/readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} holds no images"):
        config.load([*over, f"dataset.root={tmp_path / 'empty'}"])
    with pytest.raises(ValueError, match="set dataset.root"):
        config.load(over)
    with pytest.raises(ValueError, match="no train/ folder; dataset=imagenet expects"):
        check_dataset(settings(tree / "train"))  # imagenet needs train/ and val/
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        check_dataset({**settings(tree), "name": "cifar10"})
    # through the real command line: exit code 2, the path named, no stage directory created
    env = clean_env()  # one thread, no launcher variables (tests/_launch.py)
    proc = subprocess.run([sys.executable, "-m", "benchmark.grid", *over, f"dataset.root={tmp_path / 'nope'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{tmp_path / 'nope'} does not exist" in proc.stdout + proc.stderr
    assert not (tmp_path / "runs" / "stages").exists()


def test_sampler_shards_reshuffles_and_resumes(tree):
    n, B = 26, 6
    ranks = [ShardSampler(n, B, rank=r, world_size=2, seed=5) for r in range(2)]
    assert ranks[0].steps_per_epoch == 4
    for epoch in (0, 1):
        a, b = (s.epoch_rows(epoch) for s in ranks)
        # two ranks partition the epoch's 24 rows (26 // 6 batches of 6; 2 dropped)
        assert len(a) == len(b) == 12 and not set(a.tolist()) & set(b.tolist())
        assert len(set(a.tolist()) | set(b.tolist())) == 24
        # a gathered global batch is the ranks' rows in rank order
        assert torch.equal(ranks[0].global_rows(epoch, 1).flatten(),
                           torch.cat([torch.tensor([r for r, _ in s.rank_items(epoch, 1)]) for s in ranks]))
    assert not torch.equal(ranks[0].epoch_rows(0), ranks[0].epoch_rows(1))  # reshuffled per epoch
    assert torch.equal(ranks[0].epoch_rows(1), ShardSampler(n, B, 0, 2, seed=5).epoch_rows(1))  # a pure function
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardSampler(5, 6)

    ds = open_dataset(settings(tree), "train")

    def loader(workers):
        return ShardedLoader(ds, ShardSampler(len(ds), 6, rank=1, world_size=2, seed=9, hflip=True), workers=workers)

    full = loader(0)
    batches = [full.next() for _ in range(10)]  # crosses two epoch boundaries (4 batches an epoch)
    assert full.sampler.epoch == 2 and full.sampler.position == 2
    first = loader(2)  # worker processes; stopped after 5 batches
    for i in range(5):
        x, y = first.next()
        assert torch.equal(x, batches[i][0]) and torch.equal(y, batches[i][1])
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 1)
    del first  # its workers exit: the resumed loader starts from the state alone
    resumed = loader(2)
    resumed.load_state_dict(state)
    for i in range(5, 10):
        x, y = resumed.next()
        assert torch.equal(x, batches[i][0]) and torch.equal(y, batches[i][1]), i
    x, y = batches[0]
    assert x.shape == (3, 3, 16, 16) and y.shape == (6,)  # this rank's 3 rows, the global batch's 6 labels
    # flips: some image appears mirrored relative to its plain decode
    rows = full.sampler.rank_items(0, 0)
    plain = ds.uint8_batch(torch.tensor([r for r, _ in rows]))
    for (r, flip), img, p in zip(rows, x, plain):
        assert torch.equal(img, p.flip(-1) if flip else p)
    with pytest.raises(ValueError, match="seed=9"):
        ShardedLoader(ds, ShardSampler(len(ds), 6, seed=1), workers=0).load_state_dict(state)


class Killed(BaseException):
    pass


def test_tokenizer_stage_on_folder_dataset_resumes_exactly(tmp_path, tiny_overrides, monkeypatch, one_thread):
    from benchmark import run_stage
    from benchmark.store import read_json
    from benchmark.training import Checkpoint
    root = build_tree(tmp_path / "tree", per_class=6)
    over = [o for o in tiny_overrides if not o.startswith("run_root")] + [
        "dataset=folder", f"dataset.root={root}", "dataset.resolution=32", "dataset.num_classes=3",
        "dataset.workers=1", "loss=kl", "tokenizer.norm_images=16", "tokenizer.batch_size=8"]

    def run(runs):
        for st in ("reference", "tokenizer"):
            assert run_stage.main(["--stage", st, *over, f"run_root={runs}"]) == 0

    run(tmp_path / "a")
    (d,) = (tmp_path / "a").glob("stages/tokenizer/*")
    save, seen = Checkpoint.save, []

    def save_then_die(self, step, **state):
        save(self, step, **state)
        seen.append(state.get("data_loader"))
        if step == 15:  # mid-epoch: position 1 of epoch 7
            raise Killed()

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "save", save_then_die)
        with pytest.raises(Killed):
            run(tmp_path / "b")
    assert (seen[-1]["epoch"], seen[-1]["position"]) == (7, 1)
    run(tmp_path / "b")
    a, b = (torch.load(next((tmp_path / r).glob("stages/tokenizer/*/tokenizer.pt")), weights_only=True) for r in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    facts = read_json(d / "record.json")["facts"]
    # 20 train rows (18 good, 2 damaged) + notes.txt; 20 iterations of 8 = 10 epochs of 2 batches (4 rows dropped)
    assert facts["tokenizer_iters"] == 20 and facts["data_epochs"] == 10.0
    assert facts["data_bad_images"] == 3
    assert (d / "tokenizer.pt").exists() and np.isfinite(facts["latent_scale"])
    (db,) = (tmp_path / "b").glob("stages/tokenizer/*")
    assert read_json(db / "record.json")["facts"]["data_bad_images"] == 3  # restored with the loader state


def test_third_party_kind_registers_and_validates():
    from benchmark.datasets import DATASETS, register_dataset

    @register_dataset("test_noise_set")
    class NoiseSet:
        """A plug-in kind: an in-memory set of seeded noise, refusing odd resolutions at validation."""
        file_backed = False

        @classmethod
        def open(cls, settings, split):
            g = torch.Generator().manual_seed(0 if split == "train" else 1)
            r = int(settings.resolution)
            return ImageSet("test_noise_set", split, torch.randint(0, 256, (6, 3, r, r), generator=g, dtype=torch.uint8),
                            torch.arange(6) % 2, ("a", "b"))

        @classmethod
        def check(cls, settings):
            if settings.resolution % 2:
                raise ValueError(f"test_noise_set needs an even resolution, got {settings.resolution}")

    assert "test_noise_set" in DATASETS and DATASETS.group == "dmvae_bench.datasets"
    s = {"name": "test_noise_set", "resolution": 8, "channels": 3, "num_classes": 2}
    check_dataset(s)
    ds = open_dataset(s, "test")
    assert ds.uint8_batch(torch.tensor([0, 5])).shape == (2, 3, 8, 8) and class_balanced(ds, 4).labels.tolist() == [0, 1] * 2
    with pytest.raises(ValueError, match="even resolution"):
        check_dataset({**s, "resolution": 7})
