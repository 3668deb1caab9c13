"""Smoke tests of the benchmark harness (llmcore.benchmarks): tiny sizes, eager providers only.

The suite itself is run by `llmcore bench`; CI only checks that the harness works and reports
what the issue asks for."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from llmcore.benchmarks import cli, harness
from llmcore.benchmarks.harness import BenchConfig, BenchError

RECORD_FIELDS = {"op", "provider", "device", "dtype", "shape", "mode", "ms", "ms_p20", "ms_p80",
                 "peak_mb", "throughput", "throughput_unit", "machine", "git_commit", "versions"}


def test_quantiles():
    assert harness.quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))


def test_run_writes_json_markdown_and_plots(tmp_path):
    cfg = BenchConfig(size_set="tiny", ops=["layer_norm"], providers=["torch"],
                      modes=["fwd", "fwd+bwd"], out=str(tmp_path), memory=False)
    result = harness.run(cfg)
    assert result["errors"] == []
    data = json.loads((tmp_path / "results.json").read_text())
    recs = data["records"]
    # 2 variants (plain, residual) x 2 hidden sizes x 2 modes
    assert len(recs) == 8
    for r in recs:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert (r["op"], r["provider"], r["device"], r["dtype"]) == \
            ("layer_norm", "torch", "cpu", "float32")
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["cpu_ms"] > 0
        assert r["throughput"] > 0 and r["throughput_unit"] == "GB/s"
        assert r["peak_mb"] is None          # memory=False
    assert {r["mode"] for r in recs} == {"fwd", "fwd+bwd"}
    assert {r["shape"]["residual"] for r in recs} == {False, True}
    for key in ("machine", "versions", "git", "created", "config"):
        assert key in data
    assert data["versions"]["torch"] == torch.__version__
    md = (tmp_path / "results.md").read_text()
    assert "## layer_norm" in md and "vs torch" in md and "1.00x" in md
    png = tmp_path / "layer_norm.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_modes_compute_gradients():
    bench = harness.load_op("rms_norm")
    shape = {"variant": "residual", "N": 5, "D": 7, "residual": True}
    fn = bench.function("torch", shape)
    inp = bench.inputs(shape, torch.float32, "cpu", 0)
    runner = harness.autograd_runner(fn, [inp], "bwd")
    assert inp["x"].grad is None
    runner.call()
    for name in ("x", "weight", "residual"):
        assert inp[name].grad is not None and inp[name].grad.abs().sum() > 0, name
    runner.pre()                             # resets the gradients, runs the next forward
    assert inp["x"].grad is None


def test_named_provider_that_cannot_run_fails_loudly():
    with pytest.raises(BenchError, match="liger cannot run layer_norm on cpu: Liger-Kernel"):
        harness.plan(BenchConfig(ops=["layer_norm"], providers=["liger"]))
    with pytest.raises(BenchError, match="sdpa implements none of the selected ops"):
        harness.plan(BenchConfig(ops=["layer_norm"], providers=["sdpa"]))
    with pytest.raises(BenchError, match="unknown provider 'nope'"):
        harness.plan(BenchConfig(ops=["layer_norm"], providers=["nope"]))
    with pytest.raises(BenchError, match="unknown op"):
        harness.plan(BenchConfig(ops=["layer_nrom"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_cuda_without_a_gpu_fails_loudly():
    with pytest.raises(BenchError, match="no CUDA device"):
        harness.plan(BenchConfig(device="cuda", ops=["layer_norm"]))


def test_all_available_says_what_was_skipped_and_why():
    todo, skipped = harness.plan(BenchConfig(ops=["layer_norm", "attention"]))
    ran = {(b.name, p) for b, p in todo}
    assert ("layer_norm", "torch") in ran and ("attention", "sdpa") in ran
    reasons = {(s["op"], s["provider"]): s["reason"] for s in skipped}
    assert set(ran).isdisjoint(reasons)
    # every provider of every op is either run or skipped with a reason
    for op in ("layer_norm", "attention"):
        for p in harness.load_op(op).providers:
            assert (op, p) in ran or reasons.get((op, p)), (op, p)
    if not torch.cuda.is_available():
        assert "CUDA" in reasons[("layer_norm", "liger")]
        assert "CUDA" in reasons[("attention", "flash_attn")]


def test_cli_reports_a_provider_that_cannot_run(capsys, tmp_path):
    code = cli.main(["--ops", "cross_entropy", "--providers", "liger", "--out", str(tmp_path)])
    assert code == 2
    assert "liger cannot run cross_entropy" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc is Linux-only")
def test_cpu_peak_memory_in_a_child_process():
    # eager layer_norm forward of a (1024, 1024) fp32 input allocates its 4 MiB output (plus
    # 8 KiB of statistics); the backward of the same also writes a 4 MiB input gradient.
    # (VmRSS is exact only to a few hundred KiB: the kernel batches RSS counter updates.)
    shape = {"variant": "plain", "N": 1024, "D": 1024, "residual": False}
    cases = [{"op": "layer_norm", "provider": "torch", "shape": shape, "dtype": "float32",
              "mode": mode} for mode in ("fwd", "fwd+bwd")]
    fwd, both = harness._cpu_memory_in_child(cases, threads=1, timeout_s=300)
    assert "error" not in fwd and "error" not in both, (fwd, both)
    assert 3.5 <= fwd["peak_mb"] <= 12, fwd
    assert 7.5 <= both["peak_mb"] <= 24, both


def test_overhead_op_times_every_public_op_per_call(tmp_path):
    cfg = BenchConfig(size_set="tiny", ops=["overhead"], providers=["torch", "llmcore_native"],
                      out=str(tmp_path), memory=False, plots=True)
    if harness.plan(BenchConfig(ops=["overhead"]))[1]:  # native not built: torch alone
        cfg.providers = ["torch"]
    result = harness.run(cfg)
    assert result["errors"] == []
    recs = result["records"]
    variants = {"layer_norm", "rms_norm", "cross_entropy", "linear_ce", "attention"}
    for provider in cfg.providers:
        for mode in ("fwd", "fwd+bwd"):
            got = {r["variant"] for r in recs if (r["provider"], r["mode"]) == (provider, mode)}
            assert got == variants, (provider, mode, got)
    for r in recs:
        assert r["throughput_unit"] == "calls/s"
        assert r["input_sets"] == 1                 # one call on one input set, no rotation
        assert r["cpu_ms"] > 0 and r["ms"] > 0
        assert r["throughput"] == pytest.approx(1e3 / r["ms"])
    assert "overhead" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("overhead*.png"))  # nothing swept, nothing plotted


def test_skip_reason_lists_a_case_as_skipped_not_failed(tmp_path, monkeypatch):
    from llmcore.benchmarks import overhead

    bench = overhead.BENCHES["overhead"]
    monkeypatch.setattr(bench, "skip_reason",
                        lambda p, s, d, m: "no kernel here" if s["variant"] == "attention" else None)
    result = harness.run(BenchConfig(size_set="tiny", ops=["overhead"], providers=["torch"],
                                     modes=["fwd"], out=str(tmp_path), memory=False,
                                     plots=False))
    assert result["errors"] == []
    assert "attention" not in {r["variant"] for r in result["records"]}
    assert any("attention" in s["reason"] and "no kernel here" in s["reason"]
               for s in result["skipped"])


@pytest.mark.parametrize("feature", ["window", "softcap", "alibi", "documents", "bool_mask"])
def test_attention_features_providers_compute_the_same_attention(feature):
    """The feature benchmark compares like with like: every provider that runs here gives the
    same output (FlexAttention: forward, where it compiles on the CPU)."""
    from llmcore import backends
    from llmcore.benchmarks import attention_features as af

    bench = af.BENCHES["attention_features"]
    shape = next(s for s in bench.shapes("tiny", "cpu") if s["feature"] == feature)
    inp = {k: v.double() for k, v in bench.inputs(shape, torch.float32, "cpu", 0).items()}
    want = bench.function("torch", shape)(**inp)
    providers = ["llmcore_native"] if "native" in backends.IMPLEMENTED["attention"] and \
        backends.native_module() is not None else []
    if feature != "softcap":
        providers.append("sdpa")
    for p in providers:
        got = bench.function(p, shape)(**inp)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{p} vs eager")
    assert bench.work(shape, torch.float32, "fwd") == \
        4 * shape["B"] * shape["H"] * shape["D"] * int(af.allowed(shape, "cpu").sum())


def test_rope_bench_providers_compute_the_same_rotation():
    """The rope benchmark's providers all rotate q and k alike, and its byte count is the
    q/k traffic of the op."""
    from llmcore import backends
    from llmcore.benchmarks import rope as rb

    bench = rb.BENCHES["rope"]
    for shape in bench.shapes("tiny", "cpu"):
        inp = bench.inputs(shape, torch.float32, "cpu", 0)
        want = bench.function("torch", shape)(**inp)
        providers = ["llmcore_native"] if backends.native_module() is not None else []
        for p in providers:
            for got, w in zip(bench.function(p, shape)(**inp), want):
                torch.testing.assert_close(got, w, msg=f"{p} vs eager")
        elems = shape["B"] * shape["N"] * (shape["Hq"] + shape["Hkv"]) * shape["D"]
        assert bench.work(shape, torch.float32, "fwd+bwd") == 4 * elems * 4
