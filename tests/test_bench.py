"""Smoke tests of the benchmark harness (llmcore.benchmarks): tiny sizes, eager providers only.

The suite itself is run by `llmcore bench`; CI only checks that the harness works and reports
what the issue asks for."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from llmcore.benchmarks import cli, harness
from llmcore.benchmarks.harness import BenchConfig, BenchError
from llmcore_testing import kernel_backends

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
    variants = {"layer_norm", "rms_norm", "cross_entropy", "linear_ce", "attention", "rope",
                "swiglu", "gelu"}
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


def test_swiglu_bench_providers_compute_the_same_activation(fresh_backends, monkeypatch):
    """The swiglu benchmark's providers agree with the eager formula, its byte count is the
    x / y / dy / dx traffic of the op, and a backend without swiglu kernels is skipped per case
    (as native is on CUDA)."""
    from llmcore import backends
    from llmcore.benchmarks import swiglu as sb

    bench = sb.BENCHES["swiglu"]
    for shape in bench.shapes("tiny", "cpu"):
        inp = bench.inputs(shape, torch.float32, "cpu", 0)
        want = bench.function("torch", shape)(**inp)
        if backends.native_module() is not None:
            got = bench.function("llmcore_native", shape)(**inp)
            torch.testing.assert_close(got, want, msg="llmcore_native vs eager")
        assert bench.work(shape, torch.float32, "fwd+bwd") == 8 * shape["N"] * shape["F"] * 4
    _assert_skipped_without_native(bench, "swiglu", fresh_backends, monkeypatch)


def test_gelu_bench_providers_compute_the_same_activation(fresh_backends, monkeypatch):
    """The gelu benchmark's cases cover both approximations; every llmcore backend that runs
    here (triton through the interpreter) agrees with F.gelu, forward and backward, through the
    function the harness caches per approximation; its byte count is the x / y / dy / dx
    traffic of the op; a backend without gelu kernels is skipped per case."""
    from llmcore.benchmarks import gelu as gb

    bench = gb.BENCHES["gelu"]
    shapes = bench.shapes("tiny", "cpu")
    assert {s["approximate"] for s in shapes} == {"none", "tanh"}
    providers = ["torch"] + [f"llmcore_{b}" for b in kernel_backends("gelu") if b != "torch"]
    for shape in shapes:
        x = bench.inputs(shape, torch.float32, "cpu", 0)["x"]
        want = F.gelu(x, approximate=shape["approximate"])
        dy = torch.randn_like(want)
        want_dx, = torch.autograd.grad(want, x, dy)
        for p in providers:
            got = bench._cached_function(p, shape)(x=x)
            torch.testing.assert_close(got, want, msg=f"{p} vs F.gelu")
            torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0], want_dx,
                                       msg=f"{p} vs F.gelu, dx")
        assert bench.work(shape, torch.float32, "fwd+bwd") == 5 * shape["N"] * shape["F"] * 4
    _assert_skipped_without_native(bench, "gelu", fresh_backends, monkeypatch)


def _assert_skipped_without_native(bench, family, backends, monkeypatch):
    # as native is on CUDA for the CPU-only families: the case is skipped, with the reason
    monkeypatch.setattr(backends, "IMPLEMENTED",
                        {**backends.IMPLEMENTED, family: ("torch", "triton")})
    backends.clear_cache()                       # the calls before cached native's answer
    reason = bench.skip_reason("llmcore_native", bench.shapes("tiny", "cpu")[0], "cpu", "fwd")
    assert reason and f"no native kernels for {family}" in reason


# ---------------------------------------------------------------------------- the train step

def _train_step():
    from llmcore.benchmarks import train_step

    return train_step, train_step.BENCHES["train_step"]


def test_train_step_cases():
    ts, bench = _train_step()
    for size_set in ("tiny", "quick", "full"):
        for device in ("cpu", "cuda"):
            assert [s["variant"] for s in bench.shapes(size_set, device)] == list(ts.VARIANTS)
    cuda = {s["variant"]: s for s in bench.shapes("quick", "cuda")}
    assert (cuda["gpt2"]["B"], cuda["gpt2"]["T"], cuda["gpt2"]["dim"]) == (8, 1024, 768)
    assert (cuda["bert"]["B"], cuda["bert"]["T"]) == (16, 512) == \
        (cuda["bert_padded"]["B"], cuda["bert_padded"]["T"])
    llama = ts._config(cuda["llama"], "torch")
    assert (llama.n_layers, llama.dim, llama.n_heads, llama.n_kv_heads, cuda["llama"]["T"]) == \
        (12, 768, 12, 4, 2048)
    assert (llama.norm, llama.position, llama.mlp) == ("rms", "rotary", "swiglu")
    quick = ts._config(next(s for s in bench.shapes("quick", "cpu") if s["variant"] == "llama"),
                       "torch")
    assert quick.n_kv_heads < quick.n_heads and quick.mlp == "swiglu"


def test_train_step_padded_bert_batch():
    """About 20% padding (row lengths uniform in [0.6 T, T]); padding is id 0, label -100 and
    mask 0, after the real tokens; 15% of the real tokens are MLM targets."""
    ts, _ = _train_step()
    b = ts.batch({"flavour": "bert_padded", "B": 64, "T": 100, "vocab": 1000}, seed=0)
    mask = b["attention_mask"].bool()
    lengths = mask.sum(1)
    assert lengths.min() >= 60 and lengths.max() <= 100 and len(set(lengths.tolist())) > 10
    assert torch.equal(mask, torch.arange(100) < lengths[:, None])
    assert 0.17 < 1 - mask.float().mean() < 0.23
    assert (b["input_ids"][~mask] == 0).all() and (b["input_ids"][mask] > 0).all()
    assert (b["labels"][~mask] == -100).all()
    targets = b["labels"] != -100
    assert 0.13 < targets.sum() / mask.sum() < 0.17
    assert torch.equal(b["labels"][targets], b["input_ids"][targets])
    unpadded = ts.batch({"flavour": "bert", "B": 4, "T": 16, "vocab": 1000}, seed=0)
    assert "attention_mask" not in unpadded


def test_train_step_providers_run_on_the_cpu(tmp_path):
    """Every eager provider that runs here runs every case; the padded case also reports its
    real tokens/s; MFU is for CUDA only."""
    _, bench = _train_step()
    providers = [p for p in ("torch", "llmcore_auto", "llmcore_native", "hf")
                 if bench.probe(p, "cpu") is None]
    assert {"torch", "llmcore_auto"} <= set(providers)
    result = harness.run(BenchConfig(size_set="tiny", ops=["train_step"], providers=providers,
                                     out=str(tmp_path), memory=False, plots=False))
    assert result["errors"] == []
    recs = result["records"]
    assert sorted((r["provider"], r["variant"]) for r in recs) == \
        sorted((p, v) for p in providers for v in ("gpt2", "bert", "bert_padded", "llama"))
    for r in recs:
        assert r["throughput"] > 0 and r["throughput"] < float("inf")
        assert r["mfu"] is None and r["flops_per_token"] > 0
        if r["variant"] == "bert_padded":
            assert 0 < r["padding"] < 0.5
            assert r["real_tokens_per_s"] == pytest.approx(r["throughput"] * (1 - r["padding"]))
        else:
            assert "real_tokens_per_s" not in r
    assert "real tokens/s" in (tmp_path / "results.md").read_text()


def test_train_step_gives_the_llmcore_model_its_counts(monkeypatch):
    """num_tokens / num_targets reach the forward when it takes them (and only then)."""
    from llmcore.models import Transformer

    ts, bench = _train_step()
    original = Transformer.forward
    seen = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, *,
                num_tokens=None, num_targets=None, **kw):
        seen.append((num_tokens, num_targets, attention_mask, labels))
        return original(self, input_ids, attention_mask, token_type_ids, labels, **kw)

    monkeypatch.setattr(Transformer, "forward", forward)
    for variant in ("bert_padded", "gpt2"):
        shape = next(s for s in bench.shapes("tiny", "cpu") if s["variant"] == variant)
        runner = bench.runner("llmcore_auto", shape, torch.float32, "cpu", "step", 1)
        runner.pre()
        runner.call()
    (tokens, targets, mask, labels), (gpt_tokens, gpt_targets, gpt_mask, _) = seen
    assert tokens == int(mask.sum()) < mask.numel()
    assert targets == int((labels != -100).sum()) > 0
    assert (gpt_tokens, gpt_targets, gpt_mask) == (None, None, None)
    assert ts.counts(torch.nn.Linear(2, 2), ts.batch(shape, 0)) == {}   # takes no counts


def test_llmcore_compile_provider_uses_compile_model(monkeypatch):
    import llmcore.models
    from llmcore.models import compile as compile_module

    _, bench = _train_step()
    calls = []

    def spy(model, **kw):
        calls.append(compile_module.compile_model(model, backend="aot_eager", **kw))
        return calls[-1]

    monkeypatch.setattr(llmcore.models, "compile_model", spy)
    shape = next(s for s in bench.shapes("tiny", "cpu") if s["variant"] == "gpt2")
    runner = bench.runner("llmcore_compile", shape, torch.float32, "cpu", "step", 1)
    runner.pre()
    runner.call()
    assert len(calls) == 1 and calls[0].fullgraph       # a gpt2 train step is one graph
    torch._dynamo.reset()


def test_variants_select_cases(tmp_path):
    with pytest.raises(BenchError, match="no case of the selected ops has variant nope"):
        harness.plan(BenchConfig(ops=["train_step"], variants=["nope"]))
    result = harness.run(BenchConfig(size_set="tiny", ops=["train_step"], providers=["torch"],
                                     variants=["llama"], out=str(tmp_path), memory=False,
                                     plots=False))
    assert [r["variant"] for r in result["records"]] == ["llama"]


@pytest.mark.slow
def test_train_step_compile_providers_run_on_the_cpu(tmp_path):
    """hf_compile and llmcore_compile with inductor (C++ for the CPU: ~10-20 s per case here)."""
    _, bench = _train_step()
    providers = ["llmcore_compile", "hf_compile"]
    for p in providers:
        assert bench.probe(p, "cpu") is None, bench.probe(p, "cpu")
    # every case is one graph: the bench gives the llmcore model the host-side counts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = harness.run(BenchConfig(size_set="tiny", ops=["train_step"],
                                         providers=providers, out=str(tmp_path), memory=False,
                                         plots=False))
    assert not [w for w in caught if "not one graph" in str(w.message)]
    assert result["errors"] == []
    assert sorted((r["provider"], r["variant"]) for r in result["records"]) == \
        sorted((p, v) for p in providers for v in ("gpt2", "bert", "bert_padded", "llama"))
    for r in result["records"]:
        assert 0 < r["throughput"] < float("inf")
    torch._dynamo.reset()


def test_rope_bench_skips_a_backend_without_rope_kernels_per_case(monkeypatch, fresh_backends):
    # as on CUDA, where rope's native kernel does not exist but the norms' and cross-entropy's
    # do: a run that names llmcore_native for them lists rope's native cases as skipped
    from llmcore.benchmarks import rope as rb

    bench = rb.BENCHES["rope"]
    monkeypatch.setattr(fresh_backends, "IMPLEMENTED",
                        {**fresh_backends.IMPLEMENTED, "rope": ("torch", "triton")})
    assert bench.probe("llmcore_native", "cpu") is None
    shape = bench.shapes("tiny", "cpu")[0]
    reason = bench.skip_reason("llmcore_native", shape, "cpu", "fwd+bwd")
    assert reason and "no native kernels for rope" in reason
    assert bench.skip_reason("torch", shape, "cpu", "fwd+bwd") is None
