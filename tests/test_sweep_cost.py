"""benchmark/sweep_cost.py: the replay of the launcher's schedule, the longest chain, and the grid's
budget. The report on a real finished sweep is tested in tests/test_grid_e2e.py."""
from __future__ import annotations

import pytest

from benchmark.dag import longest_chains
from benchmark.sweep_cost import grid_budget, replay

# c -> d is the long chain; a and b are independent. Costs: a 2, b 2, c 1, d 4.
DEPS = {"a": [], "b": [], "c": [], "d": ["c"]}
COST = {"a": 2.0, "b": 2.0, "c": 1.0, "d": 4.0}
ORDER = ["a", "b", "c", "d"]


def test_longest_chains_add_the_costliest_dependants():
    assert longest_chains(DEPS, COST) == {"a": 2.0, "b": 2.0, "c": 5.0, "d": 4.0}
    # A dependency outside the graph (finished elsewhere) is ignored.
    assert longest_chains({"x": ["elsewhere"]}, {"x": 3.0}) == {"x": 3.0}


def test_replay_starts_the_longest_chain_first():
    prio = longest_chains(DEPS, COST)
    times = replay(ORDER, DEPS, COST, prio, workers=2)
    # c (chain 5) and a start at 0; when c ends d (4) goes before b (2): everything ends at 5, the
    # longest chain. In the topological order alone (a, b first) it would end at 7.
    assert times == {"c": (0.0, 1.0), "a": (0.0, 2.0), "d": (1.0, 5.0), "b": (2.0, 4.0)}
    fifo = replay(ORDER, DEPS, COST, {k: 0.0 for k in ORDER}, workers=2)
    assert max(end for _, end in fifo.values()) == 7.0


def test_replay_on_one_worker_is_the_sum_and_on_many_the_chain():
    prio = longest_chains(DEPS, COST)
    one = replay(ORDER, DEPS, COST, prio, workers=1)
    assert max(end for _, end in one.values()) == sum(COST.values())
    # Back to back, each stage after its dependencies.
    assert all(one[d][1] <= one[k][0] for k, ds in DEPS.items() for d in ds)
    many = replay(ORDER, DEPS, COST, prio, workers=8)
    assert max(end for _, end in many.values()) == 5.0


def test_replay_rejects_a_cycle_and_no_workers():
    with pytest.raises(ValueError, match="cycle"):
        replay(["x", "y"], {"x": ["y"], "y": ["x"]}, {"x": 1.0, "y": 1.0}, {"x": 0.0, "y": 0.0}, 1)
    with pytest.raises(ValueError, match="at least 1"):
        replay(ORDER, DEPS, COST, COST, 0)


def test_grid_budget_from_the_config_or_the_grid_file_and_checked():
    assert grid_budget({"grid": {"name": "x", "budget": {"minutes": 7, "workers": 3}}}) == {"minutes": 7.0,
                                                                                            "workers": 3}
    # A sweep written before grids stated budgets: its grid file's, by name.
    assert grid_budget({"grid": {"name": "default"}}) == {"minutes": 15.0, "workers": 2}
    assert grid_budget({"grid": {"name": "mini-paper"}}) == {"minutes": 120.0, "workers": 2}
    assert grid_budget({"grid": {"name": "pair"}}) is None
    for bad in ({"minutes": 0, "workers": 2}, {"minutes": 5}, {"minutes": "soon", "workers": 1}):
        with pytest.raises(ValueError, match="grid.budget"):
            grid_budget({"grid": {"name": "x", "budget": bad}})


def _run(key, stage, deps, wall, start, world=1, attempts=1, lost=0.0):
    from benchmark.sweep_cost import StageRun
    return StageRun(key, stage, deps, wall, wall + lost, attempts, start, start + wall, "cpu X",
                    (wall + lost) * world / 3600, world)


def test_analyse_judges_by_span_in_one_go_and_by_replay_otherwise():
    from benchmark.sweep_cost import analyse
    base = {"grid": {"name": "x", "budget": {"minutes": 1, "workers": 2}}}
    # Two workers kept busy: a (30 s) and c (10 s) side by side, then d (40 s) after c.
    runs = [_run("a", "teacher", [], 30, 0), _run("c", "reference", [], 10, 0), _run("d", "tokenizer", ["c"], 40, 10)]
    r = analyse(base, runs, [1, 2])
    assert r["work_s"] == 80 and r["span_s"] == 50 and r["longest_chain_s"] == 50
    assert r["replay_s"] == {"1": 80, "2": 50}
    v = r["verdict"]
    assert v["ran_in_one_go"] and v["judged_by"] == "measured span" and v["meets"] and v["fewest_workers"] == 2
    # The same stages run hours apart (a resumed sweep): judged by the replay, which still fits.
    late = [_run("a", "teacher", [], 30, 0), _run("c", "reference", [], 10, 5000),
            _run("d", "tokenizer", ["c"], 40, 9000, world=2, attempts=2, lost=20)]
    r = analyse(base, late, [2])
    assert not r["verdict"]["ran_in_one_go"] and r["verdict"]["judged_s"] == 50 and r["verdict"]["meets"]
    assert r["earlier_attempts_s"] == 20 and r["restarted_stages"] == 1 and r["multi_process_stages"] == 1
    # A budget below the longest chain: no number of workers fits.
    r = analyse({"grid": {"name": "x", "budget": {"minutes": 0.5, "workers": 2}}}, runs, [2])
    assert not r["verdict"]["meets"] and r["verdict"]["fewest_workers"] is None


def test_stage_runs_follow_the_launchers_order():
    from benchmark.sweep_cost import _launch_order
    rank = {"tokenizer": 0, "latent_cache": 1, "reference": 2}
    # Cell by cell, each stage after its dependencies: a reference that reads a later kind's
    # output (difftraj's latent cache) comes after it; a stage shared by two cells comes once.
    runs = [_run("ref", "reference", ["cache"], 1, 0), _run("tok", "tokenizer", [], 1, 0),
            _run("cache", "latent_cache", ["tok"], 1, 0), _run("tok2", "tokenizer", ["ref"], 1, 0)]
    cells = [{"nodes": {"reference": "ref", "tokenizer": "tok2"}}, {"nodes": {"tokenizer": "tok", "latent_cache": "cache"}}]
    assert [r.key for r in _launch_order(cells, runs, rank)] == ["tok", "cache", "ref", "tok2"]
    with pytest.raises(ValueError, match="cycle"):
        _launch_order([{"nodes": {"reference": "a"}}],
                      [_run("a", "reference", ["b"], 1, 0), _run("b", "teacher", ["a"], 1, 0)], rank)
