"""Rough CPU timing of the native kernels against eager PyTorch (a measurement script, not a test).

    python benchmarks/native_floors.py [--reps 5] [--cases layer_norm rms_norm ...]

Each case runs forward + backward; time is the median over reps after one warm-up, the backends'
calls interleaved round by round (CPU-time ratios beside the wall-time ones). Peak memory is
the growth of the process's peak RSS (VmHWM) during one forward + backward, measured in a fresh
subprocess per (case, backend), so the numbers do not contaminate each other.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import llmcore


# attention: causal B=2 H=8 N=1024 D=64; attention_nc_N<n>_D<d>: the same without a mask (BERT)
NONCAUSAL = tuple(f"attention_nc_N{n}_D{d}" for d in (64, 128) for n in (512, 1024))
CASES = ("layer_norm", "layer_norm_D2048", "rms_norm", "cross_entropy", "linear_cross_entropy",
         "attention") + NONCAUSAL


def _case(name: str, backend: str):
    """(make inputs, run fwd+bwd) for one case; backend "eager" is plain torch.nn.functional."""
    if name in ("layer_norm", "layer_norm_D2048", "rms_norm"):
        rows, d = (4096, 2048) if name.endswith("D2048") else (8192, 1024)

        def make():
            x = torch.randn(rows, d, requires_grad=True)
            w = torch.rand(d, requires_grad=True)
            b = torch.randn(d, requires_grad=True)
            return x, w, b, torch.randn(rows, d)

        def run(x, w, b, dy):
            if name.startswith("layer_norm"):
                y = (F.layer_norm(x, (d,), w, b) if backend == "eager"
                     else llmcore.layer_norm(x, d, w, b, backend=backend))
                torch.autograd.grad(y, [x, w, b], dy)
            else:
                y = (F.rms_norm(x, (d,), w, 1e-6) if backend == "eager"
                     else llmcore.rms_norm(x, d, w, 1e-6, backend=backend))
                torch.autograd.grad(y, [x, w], dy)
        return make, run
    if name == "cross_entropy":
        def make():
            return (torch.randn(4096, 32000, requires_grad=True), torch.randint(0, 32000, (4096,)))

        def run(x, t):
            loss = (F.cross_entropy(x, t) if backend == "eager"
                    else llmcore.cross_entropy(x, t, backend=backend))
            torch.autograd.grad(loss, [x])
        return make, run
    if name == "linear_cross_entropy":
        def make():
            return (torch.randn(4096, 512, requires_grad=True),
                    (torch.randn(32000, 512) / 512 ** 0.5).requires_grad_(),
                    torch.randint(0, 32000, (4096,)))

        def run(x, w, t):
            loss = (F.cross_entropy(x @ w.t(), t) if backend == "eager"
                    else llmcore.linear_cross_entropy(x, w, t, backend=backend))
            torch.autograd.grad(loss, [x, w])
        return make, run
    if name.startswith("attention"):
        causal = name == "attention"
        n, d = (1024, 64) if causal else (int(name.split("_N")[1].split("_")[0]),
                                          int(name.split("_D")[1]))

        def make():
            q, k, v = (torch.randn(2, 8, n, d, requires_grad=True) for _ in range(3))
            return q, k, v, torch.randn(2, 8, n, d)

        def run(q, k, v, do):
            if backend == "eager":        # materialised: scores, (causal mask,) softmax, matmul
                s = (q @ k.transpose(-1, -2)) * d ** -0.5
                if causal:
                    keep = torch.ones(n, n, dtype=torch.bool).tril()
                    s = s.masked_fill(~keep, float("-inf"))
                o = s.softmax(-1) @ v
            elif backend == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            else:
                o = llmcore.attention(q, k, v, is_causal=causal, backend=backend)
            torch.autograd.grad(o, [q, k, v], do)
        return make, run
    raise ValueError(name)


def _time(name, backends, reps):
    """{backend: (wall median, min, max, CPU-time median)}: the backends' calls interleaved, one
    round per rep after one warm-up each, so machine load drifts over all of them alike."""
    cases = {b: _case(name, b) for b in backends}
    inputs = {b: make() for b, (make, _) in cases.items()}
    for b, (_, run) in cases.items():
        run(*inputs[b])
    wall = {b: [] for b in backends}
    cpu = {b: [] for b in backends}
    for _ in range(reps):
        for b, (_, run) in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(*inputs[b])
            cpu[b].append(time.process_time() - c0)
            wall[b].append(time.perf_counter() - t0)
    return {b: (statistics.median(wall[b]), min(wall[b]), max(wall[b]), statistics.median(cpu[b]))
            for b in backends}


def _hwm_kib():
    # VmHWM, this address space's peak RSS (ru_maxrss would carry over the parent's peak
    # across fork + exec)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_mib(name, backend):
    make, run = _case(name, backend)
    args = make()
    before = _hwm_kib()
    run(*args)
    return (_hwm_kib() - before) / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--peak", nargs=2, metavar=("CASE", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak:
        print(json.dumps(_peak_mib(*args.peak)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.cases:
        # attention is also compared with PyTorch's fused CPU SDPA, as the issue asks
        backends = ("eager", "native", "sdpa") if name.startswith("attention") else ("eager", "native")
        times = _time(name, backends, args.reps)
        row = {}
        for backend in backends:
            out = subprocess.run([sys.executable, __file__, "--peak", name, backend],
                                 capture_output=True, text=True, check=True)
            row[backend] = (*times[backend], json.loads(out.stdout))
        (em, elo, ehi, ec, epk), (nm, nlo, nhi, nc, npk) = row["eager"], row["native"]
        line = (f"{name:22s} eager {em * 1e3:8.1f} ms [{elo * 1e3:.1f}-{ehi * 1e3:.1f}] "
                f"peak +{epk:7.1f} MiB | native {nm * 1e3:8.1f} ms [{nlo * 1e3:.1f}-{nhi * 1e3:.1f}]"
                f" peak +{npk:7.1f} MiB | speedup {em / nm:5.2f}x (CPU time {ec / nc:5.2f}x), "
                f"memory {npk / max(epk, 1e-9):4.2f}x")
        if "sdpa" in row:
            sm, _, _, sc, spk = row["sdpa"]
            line += (f" | sdpa {sm * 1e3:.1f} ms peak +{spk:.1f} MiB: native {sm / nm:4.2f}x "
                     f"sdpa's speed (CPU time {sc / nc:4.2f}x)")
        print(line, flush=True)

if __name__ == "__main__":
    main()
