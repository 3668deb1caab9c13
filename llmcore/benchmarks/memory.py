"""Peak CPU memory of benchmark cases, measured in this separate process.

Run by the harness as `python -m llmcore.benchmarks.memory` with a JSON request on stdin:
{"threads": n, "cases": [{"op": ..., "provider": ..., "shape": {...}, "dtype": ..., "mode": ...}]}.
It writes one JSON line per case to stdout: {"peak_mb": float} or {"error": str}.

Per case: build the case (one input set), run it twice (compilation, lazy initialisation), release
the gradients, read VmRSS, reset the kernel's RSS high-water mark (writing "5" to
/proc/self/clear_refs, Linux >= 4.0), run one call and read VmHWM. peak_mb = VmHWM - VmRSS:
the extra resident memory the call needed above the inputs (and parameters, saved graph) that
already existed. The harness starts this process with MALLOC_MMAP_THRESHOLD_=65536 so that freed
tensors go back to the OS rather than staying resident and hiding the next call's allocations.
"""
from __future__ import annotations

import gc
import json
import sys


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} line")


def _reset_high_water_mark() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs: {exc}")


def measure(case: dict) -> float:
    from llmcore.benchmarks.harness import DTYPES, load_op

    runner = load_op(case["op"]).runner(case["provider"], case["shape"], DTYPES[case["dtype"]],
                                        "cpu", case["mode"], 1)
    for _ in range(2):
        runner.pre()
        runner.call()
    runner.pre()
    gc.collect(1)   # young generations only (a full collection takes ~0.5 s with torch loaded)
    before = _status_kb("VmRSS")
    _reset_high_water_mark()
    runner.call()
    peak = _status_kb("VmHWM")
    del runner
    gc.collect(1)
    return max(0, peak - before) / 1024


def main() -> int:
    import torch

    request = json.load(sys.stdin)
    torch.set_num_threads(int(request["threads"]))
    for case in request["cases"]:
        try:
            line = {"peak_mb": measure(case)}
        except Exception as exc:
            line = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
