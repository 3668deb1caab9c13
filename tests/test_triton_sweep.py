"""benchmarks/triton_sweep.py, the launch-configuration sweep of the GPU check's opt-in `sweep`
stage: it must rank only the configurations that compute what the default computes, and run
end to end (tiny shapes, under the Triton interpreter)."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import time

import pytest
import torch

pytest.importorskip("triton")

_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "triton_sweep.py"
_spec = importlib.util.spec_from_file_location("triton_sweep", _PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_compare_flags_a_different_result():
    a = torch.tensor([1.0, 2.0, float("nan")])
    assert sweep.compare([a, None], [a.clone(), None], 1e-3, 0.0) == (True, 0.0)
    ok, err = sweep.compare([a], [a + torch.tensor([0.0, 0.1, 0.0])], 1e-3, 0.0)
    assert not ok and err == pytest.approx(0.1)
    assert not sweep.compare([a], [torch.tensor([1.0, 2.0, 3.0])], 1e-3, 0.0)[0]  # nan lost
    assert not sweep.compare([a], [a[:2]], 1e-3, 0.0)[0]                         # shape
    assert not sweep.compare([a, None], [a, a], 1e-3, 0.0)[0]                    # missing output


def test_a_faster_config_with_another_result_is_never_ranked(tmp_path):
    """Three configs: the default (slow), a fast one that computes something else, a middling
    correct one: the summary picks the correct one and lists the other as not matching."""
    x = torch.arange(4.0)
    naps = {0: 0.006, 1: 0.0, 2: 0.002}

    def run(cfg):
        def call():
            time.sleep(naps[cfg["v"]])
            return (x * 2 if cfg["v"] == 1 else x.clone(),)
        return call

    sw = sweep.Sweep(tmp_path, "cpu", max_minutes=1.0, size="tiny")
    sw.case("fake", [{"v": 0}, {"v": 1}, {"v": 2}], run, (1e-6, 0.0))
    rows = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [(r["config"]["v"], r["matches_default"], r["default"]) for r in rows] == \
        [(0, True, True), (1, False, False), (2, True, False)]
    assert rows[1]["ms"] < rows[2]["ms"] < rows[0]["ms"]
    line = next(l for l in (tmp_path / "sweep.md").read_text().splitlines()
                if l.startswith("| fake"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2].startswith("{'v': 2}") and cells[4] == "{'v': 1}"


def test_the_norm_backward_sweep_runs_and_every_candidate_matches(tmp_path):
    out = sweep.main(["--out", str(tmp_path), "--ops", "norm_bwd", "--size", "tiny",
                      "--max-minutes", "5"])
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    cases = {r["case"] for r in rows}
    assert cases == {f"{k}_norm bwd 37x{n} float32" for k in ("layer", "rms") for n in (64, 200)}
    # the partial-row counts differ between candidates, so the weight gradients are summed
    # in different orders: within the tolerance, never bit-for-bit required
    assert len({r["config"]["partials"] for r in rows}) > 1
    assert all(r["matches_default"] and r["error"] is None for r in rows), rows
    assert sum(r["default"] for r in rows) == len(cases)
