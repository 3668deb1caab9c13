"""torch.profiler summary of a training step: where the time goes (a measurement script, not a
test; the GPU check runs it).

    python benchmarks/profile_train_step.py [--device cuda] [--flavour gpt2] [--provider
        llmcore_auto] [--size-set quick] [--steps 5] [--out DIR]

Builds the train-step benchmark's case (gpt2-small B8 T1024 on CUDA with --size-set quick;
--flavour llama: 12 x 768, GQA 12:4, B4 T2048; bert, bert_padded: bert-base B16 T512),
warms up, then profiles --steps steps (forward, backward, AdamW) and writes
profile_<flavour>_<provider>.txt: the host (wall) time per step, the device time per step, and
the ops and kernels ranked by device time (CUDA) or CPU time (CPU), with call counts.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from llmcore.benchmarks.train_step import VARIANTS, TrainStepBench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--flavour", default="gpt2", choices=VARIANTS)
    ap.add_argument("--provider", default="llmcore_auto")
    ap.add_argument("--size-set", default="quick", choices=("tiny", "quick", "full"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    bench = TrainStepBench()
    shape = next(s for s in bench.shapes(args.size_set, args.device)
                 if s["variant"] == args.flavour)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    runner = bench.runner(args.provider, shape, dtype, args.device, "step", 1)
    cuda = args.device == "cuda"

    def step():
        runner.pre()
        runner.call()

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        host_s = time.perf_counter() - t0          # the host's time to issue the steps
        if cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - t0
    events = prof.key_averages()
    if cuda:
        attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
        kernels = [e for e in events if getattr(e, attr, 0) > 0 and e.device_type.name == "CUDA"]
        device_us = sum(getattr(e, attr) for e in kernels) / args.steps
        sort = attr
    else:
        device_us = None
        sort = "self_cpu_time_total"
    lines = [
        f"profile of {args.steps} train steps: {args.flavour} {shape} provider {args.provider}, "
        f"device {args.device}, dtype {dtype}, torch {torch.__version__}",
        f"host time per step (issuing the work): {host_s / args.steps * 1e3:.2f} ms",
        f"wall time per step (to the last sync): {wall_s / args.steps * 1e3:.2f} ms",
        (f"device (kernel) time per step: {device_us / 1e3:.2f} ms" if device_us is not None
         else "device time: CPU run, see the CPU-time table"),
        "(the profiler adds host time; compare the ratios, and the step times of llmcore bench)",
        "",
        events.table(sort_by=sort, row_limit=args.rows),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_{args.flavour}_{args.provider}.txt"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:5]))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
