"""Aggregation on synthetic records: finished, failed and missing stages, several seeds."""
import math

import pandas as pd
from PIL import Image

from benchmark import aggregate
from benchmark.store import write_json


def _cell(root, label, keys, facts_by_stage, failed=None, missing=()):
    nodes = {}
    for stage, facts in facts_by_stage.items():
        key = f"{stage}-{label}"
        nodes[stage] = key
        d = root / "stages" / stage / key
        if stage in missing:
            continue
        if stage == failed:
            write_json(d / "failed.json", {"reason": "NonFiniteLossError: loss is nan at step 3"})
        else:
            write_json(d / "record.json", {"facts": facts, "wall_time_s": 2.0, "device_hours": 2 / 3600})
    return {"label": label, "keys": keys, "nodes": nodes}


def _keys(prior, seed):
    return {"dataset": "fashion_mnist", "prior": prior, "loss": "dm", "lambda": 1.0,
            "tokenizer": "cpu-tiny", "generator": "cpu-tiny", "seed": seed}


def _facts(rfid, gfid):
    return {"tokenizer": {"latent_swd_to_prior": 0.1}, "recon_eval": {"rfid": rfid, "psnr": 20.0, "ssim": 0.8},
            "generator": {}, "gen_eval": {"gfid": gfid, "kid": 0.01, "precision": 0.5, "recall": 0.4,
                                          "n_samples": 100, "is": None}}


def test_aggregate_handles_missing_and_failed(tmp_path):
    root, sweep = tmp_path / "runs", tmp_path / "runs" / "sweeps" / "s"
    cells = [_cell(root, "a0", _keys("gaussian", 0), _facts(10.0, 50.0)),
             _cell(root, "a1", _keys("gaussian", 1), _facts(12.0, 54.0)),
             _cell(root, "b0", _keys("gmm", 0), _facts(1, 1), failed="tokenizer",
                   missing=("recon_eval", "generator", "gen_eval")),
             _cell(root, "c0", _keys("ssl", 0), _facts(3.0, 4.0), missing=("gen_eval",))]
    write_json(sweep / "cells.json", cells)
    wide = aggregate.write_tables(sweep, root).set_index("prior", append=True)
    wide = wide.reset_index(level=0, drop=True)
    assert list(wide.loc["gaussian", "status"]) == ["done", "done"]
    assert wide.loc["gmm", "status"] == "failed" and "nan at step 3" in wide.loc["gmm", "failure"]
    assert wide.loc["ssl", "status"] == "incomplete" and math.isnan(wide.loc["ssl", "gfid"])
    assert wide.loc["ssl", "rfid"] == 3.0  # finished stages still report
    seeds = pd.read_csv(sweep / "results_over_seeds.csv").set_index("prior")
    assert list(seeds.index) == ["gaussian"]  # only finished cells
    assert seeds.loc["gaussian", "gfid"] == 52.0
    assert abs(seeds.loc["gaussian", "gfid_std"] - 2 ** 0.5 * 2) < 1e-9
    md = (sweep / "results.md").read_text()
    assert "52 ± 2.8" in md and "| failed |" in md
    assert "fd_mobilenet_v2" not in md  # a metric no cell computed is no column of dashes
    tex = (sweep / "results.tex").read_text()
    assert "\\begin{tabular}" in tex and "gaussian" in tex
    long = pd.read_csv(sweep / "results_long.csv")
    assert set(long.columns) >= {"prior", "seed", "metric", "value"}
    assert not ((long["prior"] == "gmm") & (long["metric"] == "gfid")).any()
    aggregate.tradeoff_plot(aggregate.cell_rows(cells, root), sweep / "tradeoff.png")
    with Image.open(sweep / "tradeoff.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300
    # The sweep's plot is the figures' trade-off figure: legend entries name the prior and the
    # loss (the sweep plot's legend used to be titled 'None'), and unfinished cells are named.
    fig, caption = aggregate.tradeoff_figure(aggregate.cell_rows(cells, root), "t")
    legend = fig.axes[-1].get_legend()
    texts = [t.get_text() for t in legend.get_texts()] + [legend.get_title().get_text()]
    assert "None" not in texts and {"prior", "loss", "gaussian", "dm"} <= set(texts), texts
    assert "Left out (no gFID): gmm/dm, ssl/dm." in caption
