"""Launch-configuration sweep of the Triton norm and cross-entropy kernels (a measurement script,
not a test; `benchmarks/gpu_check.sh` runs it as its opt-in `sweep` stage).

    python benchmarks/triton_sweep.py [--out DIR] [--ops norm_fwd,norm_bwd,ce,lce]
        [--size quick|tiny] [--max-minutes 2.5]

The norm and cross-entropy launchers take their configurations from one small function each,
chosen without a GPU and never timed there (llmcore/kernels/triton/norm.py `_row_config` and
`_num_partials`, cross_entropy.py `_block_v`). This script times every candidate of those
functions at the shapes of issue "GPU speed I" (bf16: norms T=16384 x H 1024..8192, cross-entropy
N=8192 x V 32000..256000, linear_cross_entropy 8192 x 4096 x 128256), each candidate against the
default's outputs (a configuration that computes something else is marked, never ranked), and
writes as it goes:

    sweep.jsonl   one line per candidate: case, config, ms (median, p20, p80), TB/s by the byte
                  model of llmcore/benchmarks (norm.py, cross_entropy.py), peak memory above the
                  inputs (linear_cross_entropy), whether it matched the default, its error
    sweep.md      per case: the default, the fastest matching candidate, and the speed-up

A configuration changes the order of the kernels' reductions, hence the low bits of their
results: a chosen one is pinned per GPU in the launcher (a fixed table, not an autotuner), so
that two runs on one machine stay bit-identical.

Without CUDA (`--size tiny`, under TRITON_INTERPRET=1) it runs tiny shapes on the CPU to check
the script itself; those times mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from llmcore.benchmarks.harness import TIMINGS, Runner, environment, quantiles, time_runner

NORM_BYTES = {"fwd": 2, "bwd": 3}  # elements moved per (row, column): read x, write y; h, dy, dx
CE_BYTES = {"fwd": 1, "bwd": 2, "fused": 2}  # per logit: read; read + write; read + write

# (size) -> shapes; the tiny ones only check the script under the interpreter
SIZES = {
    "quick": dict(norm_rows=16384, norm_hidden=[1024, 2048, 4096, 8192], ce_rows=8192,
                  ce_classes=[32000, 128256, 256000], lce=(8192, 4096, 128256),
                  lce_chunks=[1024, 2048, 4096, 8192]),
    "tiny": dict(norm_rows=37, norm_hidden=[64, 200], ce_rows=5, ce_classes=[300],
                 lce=(40, 16, 300), lce_chunks=[16, 40]),
}


@contextlib.contextmanager
def patched(module, **attrs):
    """Module attributes replaced for the duration (the launchers read them at every call)."""
    old = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def compare(ref, got, rtol: float, atol: float) -> tuple[bool, float]:
    """(whether every tensor of `got` matches `ref` within rtol/atol, the largest abs error);
    None entries must be None in both."""
    ok, worst = True, 0.0
    for a, b in zip(ref, got):
        if a is None or b is None:
            ok = ok and a is None and b is None
            continue
        if a.shape != b.shape:
            return False, float("inf")
        both_nan = a.isnan() & b.isnan()
        a64 = torch.where(both_nan, 0.0, a.double())
        diff = (a64 - torch.where(both_nan, 0.0, b.double())).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        ok = ok and torch.equal(a.isnan(), b.isnan()) and bool(
            (diff <= atol + rtol * a64.abs()).all())
    return ok, worst


class Sweep:
    def __init__(self, out: Path, device: str, max_minutes: float, size: str):
        self.out, self.device, self.size = out, device, size
        self.deadline = time.perf_counter() + 60 * max_minutes
        self.timing = TIMINGS[("quick" if device == "cuda" else "tiny", device)]
        self.summary: list[str] = []
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "sweep.jsonl").write_text("")
        self.sms = (torch.cuda.get_device_properties(0).multi_processor_count
                    if device == "cuda" else 2)
        self.skipped: list[str] = []

    def over_budget(self) -> bool:
        return time.perf_counter() > self.deadline

    def time_ms(self, call, pre) -> tuple[float, float, float]:
        ms, _ = time_runner(Runner(call=call, pre=pre), self.device, self.timing)
        return quantiles(ms)

    def peak_mb(self, call, pre) -> float | None:
        """CUDA memory the call allocates at its peak beyond what was allocated before it."""
        if self.device != "cuda":
            return None
        pre()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def case(self, name: str, configs: list, run, ref_tol, bytes_moved: int | None = None,
             memory: bool = False, pre=lambda: None) -> None:
        """Times run(config) for each config (configs[0] is the default) against the
        default's outputs; run(config) -> a callable returning the outputs to compare; pre()
        runs untimed before every call."""
        if self.over_budget():
            self.skipped.append(name)
            return
        pre()
        # copies: a call may write into the buffers of the one before it
        ref = [None if t is None else t.clone() for t in run(configs[0])()]
        rows = []
        for config in configs:
            if self.over_budget():
                self.skipped.append(f"{name} {config}")
                break
            call = run(config)
            try:
                pre()
                got = call()
                ok, err = compare(ref, got, *ref_tol)
                del got
                peak = self.peak_mb(call, pre) if memory else None
                med, p20, p80 = self.time_ms(call, pre)
                error = None
            except Exception as exc:  # a config that cannot compile or launch: recorded
                ok, err, peak, med, p20, p80 = False, float("nan"), None, *(float("nan"),) * 3
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rec = dict(case=name, config=config, default=config == configs[0], ms=med,
                       ms_p20=p20, ms_p80=p80, matches_default=ok, max_abs_err=err,
                       tb_s=(bytes_moved / med / 1e9 if bytes_moved and med == med else None),
                       peak_mb=peak, error=error)
            rows.append(rec)
            with open(self.out / "sweep.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{name:40s} {str(config):28s} {med:9.4f} ms  "
                  f"{'ok' if ok else 'MISMATCH' if error is None else error}", flush=True)
        self._summarise(name, rows)

    def _summarise(self, name: str, rows: list[dict]) -> None:
        if not rows:
            return
        default = rows[0]
        good = [r for r in rows if r["matches_default"] and r["ms"] == r["ms"]]
        best = min(good, key=lambda r: r["ms"]) if good else None
        bad = [r for r in rows if not r["matches_default"]]

        def fmt(r):
            extra = f", {r['tb_s']:.3g} TB/s" if r["tb_s"] else ""
            extra += f", peak {r['peak_mb']:.0f} MB" if r["peak_mb"] is not None else ""
            return f"{r['config']} {r['ms']:.4f} ms{extra}"
        line = f"| {name} | {fmt(default)} | {fmt(best) if best else '-'} | " \
               f"{default['ms'] / best['ms']:.2f}x | " if best else f"| {name} | {fmt(default)} | - | - | "
        line += ", ".join(str(r["config"]) for r in bad) + " |"
        self.summary.append(line)
        self.write_summary()

    def write_summary(self) -> None:
        env = environment(self.device)
        head = [f"# Triton launch-configuration sweep ({self.size})", "",
                f"{env['machine']['summary']}; torch {env['versions']['torch']}, triton "
                f"{env['versions']['triton']}; commit {env['git'].get('commit')}"
                f"{' (dirty)' if env['git'].get('dirty') else ''}", "",
                "| case | default | fastest matching | speed-up | not matching the default |",
                "|---|---|---|---|---|"]
        tail = ["", "Not run (budget): " + "; ".join(self.skipped)] if self.skipped else []
        (self.out / "sweep.md").write_text("\n".join(head + self.summary + tail) + "\n")


# ---------------------------------------------------------------------------- the cases

def _warps_for(block: int, choices, per_thread: int) -> list[int]:
    """The warp counts that give each thread of a row block at least one element and at most
    `per_thread` (more spill: compiled for sm_90, the norm forward's 8192-wide row on one warp
    spills 712 bytes a thread and the backward's on 4 warps 504 under Triton 3.6;
    benchmarks/results/sm90-static-2026-12-01-sweep)."""
    return [w for w in choices if 32 * w <= max(block, 32) and block <= 32 * w * per_thread]


def norm_cases(sw: Sweep, phase: str, dtype, dev) -> None:
    from llmcore.kernels.triton import norm
    s = SIZES[sw.size]
    m = s["norm_rows"]
    tol = (2e-2, 2e-2) if dtype in (torch.bfloat16, torch.float16) else (1e-4, 1e-5)
    for is_rms in (False, True):
        for n in s["norm_hidden"]:
            gen = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(m, n, device=dev, dtype=dtype, generator=gen)
            w = torch.rand(n, device=dev, dtype=dtype, generator=gen) + 0.5
            b = None if is_rms else torch.randn(n, device=dev, dtype=dtype, generator=gen)
            block, default_warps = norm._row_config(n)
            name = f"{'rms' if is_rms else 'layer'}_norm {phase} {m}x{n} {str(dtype)[6:]}"
            bytes_moved = NORM_BYTES[phase] * m * n * x.element_size()
            if phase == "fwd":
                configs = [{"num_warps": default_warps}] + [
                    {"num_warps": wp} for wp in _warps_for(block, (1, 2, 4, 8, 16, 32), 64)
                    if wp != default_warps]

                def run(cfg, x=x, w=w, b=b, is_rms=is_rms, block=block):
                    def call():
                        with patched(norm, _row_config=lambda _n: (block, cfg["num_warps"])):
                            y, _, mean, rstd = norm.norm_fwd(x, None, w, b, 1e-5, is_rms)
                        return y, mean, rstd
                    return call
            else:
                _, _, mean, rstd = norm.norm_fwd(x, None, w, b, 1e-5, is_rms)
                dy = torch.randn(m, n, device=dev, dtype=dtype, generator=gen)
                default_p = norm._num_partials(m, n, x.get_device())
                configs = [{"num_warps": default_warps, "partials": default_p}]
                for wp in _warps_for(block, (4, 8, 16), 32):
                    for per_sm in (1, 2, 4):
                        p = max(1, min(m, per_sm * sw.sms))
                        cfg = {"num_warps": wp, "partials": p}
                        if cfg not in configs:
                            configs.append(cfg)

                def run(cfg, x=x, w=w, b=b, is_rms=is_rms, block=block, dy=dy, mean=mean,
                        rstd=rstd):
                    def call():
                        with patched(norm, _row_config=lambda _n: (block, cfg["num_warps"]),
                                     _num_partials=lambda *_a: cfg["partials"]):
                            return norm.norm_bwd(dy, None, x, w, mean, rstd, is_rms, True,
                                                 b is not None, w.dtype,
                                                 None if b is None else b.dtype)
                    return call
            sw.case(name, configs, run, tol, bytes_moved)


def ce_cases(sw: Sweep, dtype, dev) -> None:
    from llmcore.kernels.triton import cross_entropy as ce
    from llmcore.kernels.triton._host import next_power_of_2
    s = SIZES[sw.size]
    n = s["ce_rows"]
    for v in s["ce_classes"]:
        gen = torch.Generator(device=dev).manual_seed(0)
        logits = torch.randn(n, v, device=dev, dtype=dtype, generator=gen) * 4
        target = torch.randint(0, v, (n,), device=dev, generator=gen)
        scale = torch.full((), 1.0 / n, device=dev, dtype=torch.float32)
        default = ce._block_v(v)
        configs = [{"BLOCK_V": default[0], "num_warps": default[1]}]
        for block in (2048, 4096, 8192, 16384):
            block = min(block, next_power_of_2(v))
            for wp in _warps_for(block, (4, 8, 16, 32), 64):
                cfg = {"BLOCK_V": block, "num_warps": wp}
                if cfg not in configs:
                    configs.append(cfg)
        opts = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)
        _, lse = ce.ce_fwd(logits, target, None, **opts)
        grad = torch.empty_like(logits)
        for phase in ("fwd", "bwd", "fused"):
            name = f"cross_entropy {phase} {n}x{v} {str(dtype)[6:]}"
            bytes_moved = CE_BYTES[phase] * n * v * logits.element_size()

            def run(cfg, phase=phase):
                def call():
                    with patched(ce, _block_v=lambda _v: (cfg["BLOCK_V"], cfg["num_warps"])):
                        if phase == "fwd":
                            return ce.ce_fwd(logits, target, None, **opts)
                        if phase == "bwd":
                            return (ce.ce_bwd(logits, target, None, lse, scale, **opts),)
                        loss, lse2 = ce.ce_fwd(logits, target, None, **opts, grad=grad,
                                               grad_scale=scale)
                        return loss, lse2, grad
                return call
            sw.case(name, configs, run, (2e-2, 1e-3), bytes_moved)


def lce_cases(sw: Sweep, dtype, dev) -> None:
    import llmcore
    s = SIZES[sw.size]
    n, h, v = s["lce"]
    gen = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(n, h, device=dev, dtype=dtype, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(v, h, device=dev, dtype=dtype, generator=gen) * h ** -0.5).requires_grad_()
    target = torch.randint(0, v, (n,), device=dev, generator=gen)
    configs = [{"chunk_size": None}] + [{"chunk_size": c} for c in s["lce_chunks"]]
    backend = "triton"
    name = f"linear_cross_entropy fwd+bwd {n}x{h}x{v} {str(dtype)[6:]}"

    def release():
        x.grad = w.grad = None

    def run(cfg):
        def call():
            loss = llmcore.linear_cross_entropy(x, w, target, chunk_size=cfg["chunk_size"],
                                                backend=backend)
            loss.backward()
            return loss.detach(), x.grad, w.grad
        return call
    # a chunk size changes how dW is summed: bf16 gradients then differ by roundings
    sw.case(name, configs, run, (5e-2, 5e-3), memory=True, pre=release)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sweep")
    # in order of importance: the norm backward is the furthest behind eager (0.19-0.79x)
    ap.add_argument("--ops", default="norm_bwd,norm_fwd,ce,lce")
    ap.add_argument("--size", default=None, choices=sorted(SIZES),
                    help="quick on CUDA (default), tiny otherwise")
    ap.add_argument("--max-minutes", type=float, default=3.0)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    size = args.size or ("quick" if cuda else "tiny")
    if not cuda and size != "tiny":
        ap.error("without CUDA only --size tiny runs (under TRITON_INTERPRET=1)")
    dtype = torch.bfloat16 if cuda else torch.float32
    sw = Sweep(Path(args.out), device, args.max_minutes, size)
    ops = args.ops.split(",")
    unknown = set(ops) - {"norm_fwd", "norm_bwd", "ce", "lce"}
    if unknown:
        ap.error(f"unknown --ops {sorted(unknown)}; choose from norm_fwd, norm_bwd, ce, lce")
    for op in ops:
        if op in ("norm_fwd", "norm_bwd"):
            norm_cases(sw, op[5:], dtype, device)
        elif op == "ce":
            ce_cases(sw, dtype, device)
        else:
            lce_cases(sw, dtype, device)
    sw.write_summary()
    print((sw.out / "sweep.md").read_text())
    return sw.out


if __name__ == "__main__":
    main()
