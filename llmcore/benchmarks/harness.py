"""The benchmark harness: one timing loop, one memory probe, one record format for every op.

An op benchmark (`OpBench`) says which providers apply, which shapes to sweep, how to build
inputs and the provider's function, and how much work one call does. The harness turns that into
a `Runner` per case (op x provider x shape x dtype x mode), times it, measures its peak memory,
and writes one record per case.

Timing. Warm-up calls first (they also trigger torch.compile and autotuning), then repeated
single calls: `time.perf_counter` around each call on the CPU, CUDA events around each call on a
GPU; we report the median and the 20th/80th percentiles in milliseconds. On the CPU we also
report the median CPU time per call (time.process_time, every thread of the process): on a
shared, oversubscribed machine it shows the work a call did, where wall time adds the waiting. Work that must not be
timed (resetting .grad, picking the next input set, flushing the GPU L2) happens in `pre()`,
outside the timed region. Inputs are random normal (never zeros). On the CPU the harness rotates
through enough copies of the inputs to exceed twice the last-level cache, so a call never finds
its inputs already cached by the previous one; on a GPU it zeroes a 256 MiB buffer before each
call, which evicts the L2 (the approach of triton.testing.do_bench).

Memory. `peak_mb` is the memory a single call needs above what was already held just before it
(inputs, parameters, optimizer state and, for "bwd", the saved forward graph):
  - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
    memory_allocated() before the call.
  - CPU: the peak resident set size of a separate process (python -m llmcore.benchmarks.memory,
    one per run, after the timing) that rebuilds each case, warms it up, then resets the
    kernel's RSS high-water mark (writing "5" to /proc/self/clear_refs), runs one call and
    reads VmHWM - VmRSS(before).
    That process runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed tensors to
    the OS instead of keeping them resident, which would hide the next call's allocations.
    Timing always runs in the parent process with the default allocator settings.

Modes: "fwd" is a training forward (inputs that need gradients require grad, so the graph is
built), "bwd" is the backward alone (a fresh forward runs before each call, outside the
timer), "fwd+bwd" both, and "step" (train step only) forward, backward and optimizer step.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from llmcore.benchmarks import providers as _providers
from llmcore.benchmarks.names import MODES, OP_MODULES, OPS, SIZE_SETS

log = logging.getLogger("llmcore.bench")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchError(RuntimeError):
    """A benchmark was asked for something it cannot do (e.g. a named provider that cannot run)."""


# ---------------------------------------------------------------------------- op benchmarks

@dataclass
class Runner:
    """One case ready to time: `pre()` runs untimed before every `call()`."""
    call: Callable[[], object]
    pre: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Timing:
    warmup_s: float     # keep warming up for this long (at least 2 calls)
    budget_s: float     # aim for this much timed work per case
    min_reps: int
    max_reps: int
    rotate: bool = True  # rotate input copies on the CPU (off for the tiny smoke-test sizes)


TIMINGS = {
    ("tiny", "cpu"): Timing(0.0, 0.02, 3, 5, rotate=False),
    ("quick", "cpu"): Timing(0.05, 0.3, 5, 50),
    ("full", "cpu"): Timing(0.2, 1.5, 10, 200),
    ("tiny", "cuda"): Timing(0.0, 0.01, 3, 10),
    ("quick", "cuda"): Timing(0.03, 0.1, 10, 200),
    ("full", "cuda"): Timing(0.1, 0.4, 20, 1000),
}


class OpBench:
    """One benchmarked op. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    families: tuple[str, ...] = ()      # llmcore op families the llmcore_* providers need
    # families checked per case instead (skip_reason): a backend without their kernels on this
    # device (native rope and swiglu are CPU-only) lists its cases as skipped, not failed
    case_families: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()     # the providers that implement this op, baseline first
    modes: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
    unit: str = "GB/s"                  # "GB/s", "TFLOP/s" or "tokens/s"
    x_key: str = ""                     # the shape entry on the x axis of the plots
    baselines: tuple[str, ...] = ("torch",)   # speed-up columns are against these
    host_timing: bool = False           # time each call alone: wall up to a device sync, and
                                        # the host's CPU time (per-call overhead benchmarks)

    def shapes(self, size_set: str, device: str) -> list[dict]:
        """The swept shapes: JSON-able dicts of sizes and flags, each with a "variant" label."""
        raise NotImplementedError

    def default_dtypes(self, device: str) -> list[str]:
        return ["bfloat16"] if device == "cuda" else ["float32"]

    def probe(self, provider: str, device: str) -> str | None:
        return _providers.probe(provider, self.families, device)

    def skip_reason(self, provider: str, shape: dict, device: str, mode: str) -> str | None:
        """Why `provider` cannot run this one shape in this mode here (None: it can); such
        cases are listed as skipped, not failed."""
        if not self.case_families or provider not in _providers.LLMCORE_BACKEND:
            return None
        return _providers.probe(provider, self.case_families, device)

    def inputs(self, shape: dict, dtype: torch.dtype, device: str, seed: int) -> dict:
        """Keyword arguments of `function`; tensors that get gradients require grad."""
        raise NotImplementedError

    def function(self, provider: str, shape: dict) -> Callable:
        """The provider's implementation, called as fn(**inputs); returns a tensor or a tuple of
        tensors. Built once per (provider, variant) and cached (torch.compile compiles once)."""
        raise NotImplementedError

    def work(self, shape: dict, dtype: torch.dtype, mode: str) -> float:
        """Bytes (GB/s ops), floating-point operations (TFLOP/s ops) or tokens per call."""
        raise NotImplementedError

    def extra(self, shape: dict, dtype: str, mode: str, ms: float, device: str,
              provider: str | None = None) -> dict:
        """Additional derived fields for a record (e.g. MFU)."""
        return {}

    def runner(self, provider: str, shape: dict, dtype: torch.dtype, device: str, mode: str,
               n_sets: int) -> Runner:
        fn = self._cached_function(provider, shape)
        sets = [self.inputs(shape, dtype, device, seed) for seed in range(n_sets)]
        return autograd_runner(fn, sets, mode)

    def input_bytes(self, shape: dict, dtype: torch.dtype) -> int:
        """Bytes of one input set (decides how many sets the CPU rotates through)."""
        inp = self.inputs(shape, dtype, "meta", 0)
        return sum(t.numel() * t.element_size() for t in inp.values() if isinstance(t, torch.Tensor))

    def _cached_function(self, provider: str, shape: dict) -> Callable:
        cache = self.__dict__.setdefault("_fn_cache", {})
        key = (provider, self.function_key(shape))
        if key not in cache:
            cache[key] = self.function(provider, shape)
        return cache[key]

    def function_key(self, shape: dict):
        """What makes two shapes need different functions (default: nothing)."""
        return ()


class Rand:
    """Seeded random inputs on a device (on "meta": shapes only, to size the inputs)."""

    def __init__(self, device: str, seed: int):
        self.device = device
        self.gen = None
        if device != "meta":
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(1234 + seed)

    def normal(self, *size, dtype, requires_grad=False, std=1.0) -> torch.Tensor:
        if self.gen is None:
            t = torch.empty(size, dtype=dtype, device="meta")
        else:
            t = torch.randn(size, generator=self.gen, device=self.device, dtype=torch.float32)
            t = (t * std).to(dtype)
        return t.requires_grad_(requires_grad)

    def integers(self, high: int, *size, low: int = 0) -> torch.Tensor:
        if self.gen is None:
            return torch.empty(size, dtype=torch.int64, device="meta")
        return torch.randint(low, high, size, generator=self.gen, device=self.device)


def _tensors(out) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def autograd_runner(fn: Callable, input_sets: Sequence[dict], mode: str) -> Runner:
    """Runner for a differentiable fn(**inputs) in mode fwd, bwd or fwd+bwd, rotating through
    `input_sets`. Output gradients are random (ones for a scalar loss). In "bwd" the forward
    runs in pre(), untimed, so every timed backward is an ordinary one-shot backward (no
    retain_graph, which compiled backwards with donated buffers refuse)."""
    if mode not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"mode must be fwd, bwd or fwd+bwd for an op, got {mode!r}")
    leaves = [[t for t in inp.values() if isinstance(t, torch.Tensor) and t.requires_grad]
              for inp in input_sets]

    def forward(i):
        return tuple(o for o in _tensors(fn(**input_sets[i])) if o.requires_grad)

    # one forward per set gives the output shapes for the gradients
    grads = [tuple(torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in forward(i))
             for i in range(len(input_sets))]
    state = {"i": -1, "out": None}

    def pre():
        state["out"] = None
        state["i"] = (state["i"] + 1) % len(input_sets)
        for t in leaves[state["i"]]:
            t.grad = None
        if mode == "bwd":
            state["out"] = forward(state["i"])

    if mode == "fwd":
        def call():
            fn(**input_sets[state["i"]])
    elif mode == "bwd":
        def call():
            torch.autograd.backward(state["out"], grads[state["i"]])
    else:
        def call():
            torch.autograd.backward(forward(state["i"]), grads[state["i"]])
    pre()
    return Runner(call=call, pre=pre)


# ---------------------------------------------------------------------------- timing

def _cache_bytes(device: str) -> int:
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))
    for index in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * mult
    return 32 * 2**20


def rotation_sets(input_bytes: int, device: str) -> int:
    """How many input copies to rotate through so that together they exceed 2x the CPU cache
    (1 on CUDA, where the L2 is flushed instead)."""
    if device == "cuda":
        return 1
    return max(1, min(64, math.ceil(2 * _cache_bytes(device) / max(input_bytes, 1))))


class _L2Flush:
    def __init__(self):
        self.buf = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self):
        self.buf.zero_()


def time_runner(runner: Runner, device: str, timing: Timing,
                host_timing: bool = False) -> tuple[list[float], list[float]]:
    """Milliseconds of each timed call after warm-up: (wall times, CPU times). CPU times
    (time.process_time, all threads of this process) are measured on the CPU only; on a shared,
    oversubscribed machine they show the work done where wall times also show the waiting.
    host_timing: every call alone, on any device: wall time up to a device sync after the call,
    and the host CPU time of the call itself (no L2 flush: the per-call overhead benchmark)."""
    cuda = device == "cuda"
    flush = _L2Flush() if cuda and not host_timing else None

    def one() -> tuple[float, float]:
        runner.pre()
        if host_timing:
            if cuda:
                torch.cuda.synchronize()
            c0, t0 = time.process_time(), time.perf_counter()
            runner.call()
            c1 = time.process_time()
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3, (c1 - c0) * 1e3
        if flush:
            flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), math.nan
        c0, t0 = time.process_time(), time.perf_counter()
        runner.call()
        t1, c1 = time.perf_counter(), time.process_time()
        return (t1 - t0) * 1e3, (c1 - c0) * 1e3

    warm = []
    t_end = time.perf_counter() + timing.warmup_s
    while len(warm) < 2 or time.perf_counter() < t_end:
        warm.append(one()[0])
        if len(warm) >= 1000:
            break
    est = sorted(warm[1:])[len(warm[1:]) // 2]
    reps = int(min(timing.max_reps, max(timing.min_reps, timing.budget_s * 1e3 / max(est, 1e-3))))
    if device != "cuda" or host_timing:
        wall, cpu = zip(*(one() for _ in range(reps)))
        return list(wall), list(cpu)
    # on CUDA, queue the calls and read the events once at the end (no per-call host sync)
    events = []
    for _ in range(reps):
        runner.pre()
        flush()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        runner.call()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events], []


def quantiles(ms: Sequence[float]) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile), linear interpolation."""
    xs = sorted(ms)

    def q(p):
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return q(0.5), q(0.2), q(0.8)


def cuda_peak_mb(runner: Runner) -> float:
    runner.pre()
    torch.cuda.synchronize()
    gc.collect(1)   # the young generations only: a full collection costs ~0.5 s with torch loaded
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _cpu_memory_in_child(cases: list[dict], threads: int, timeout_s: float) -> list[dict]:
    """Peak RSS per case ({"op", "provider", "shape", "dtype", "mode"}), all measured by one
    child process (python -m llmcore.benchmarks.memory), which resets its RSS high-water mark
    before each case."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    request = json.dumps({"threads": threads, "cases": cases})
    try:
        proc = subprocess.run([sys.executable, "-m", "llmcore.benchmarks.memory"], input=request,
                              capture_output=True, text=True, env=env, timeout=timeout_s)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, code = f"timed out after {timeout_s:.0f} s", "timeout"
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if code != 0 or len(results) != len(cases):
        tail = (stderr.strip().splitlines() or ["(no stderr)"])[-1]
        why = f"memory process exited with {code}: {tail}"
        results += [{"error": why}] * (len(cases) - len(results))
    return results


# ---------------------------------------------------------------------------- the run

@dataclass
class BenchConfig:
    device: str = "cpu"
    size_set: str = "full"
    ops: Sequence[str] | None = None          # None: all
    providers: Sequence[str] | None = None    # None: every available one; named: must run
    dtypes: Sequence[str] | None = None       # None: each op's default for the device
    modes: Sequence[str] | None = None        # None: each op's modes
    variants: Sequence[str] | None = None     # None: every case; else only these variants
    out: str = "bench-out"
    memory: bool = True
    plots: bool = True
    threads: int | None = None                # CPU threads (default: torch's default)
    max_minutes: float | None = None          # stop starting cases after this long; the
                                              # cases not run are listed under "skipped"


def load_op(name: str) -> OpBench:
    if name not in OP_MODULES:
        raise BenchError(f"unknown op {name!r}; choose from {', '.join(OPS)}")
    module = importlib.import_module(f"llmcore.benchmarks.{OP_MODULES[name]}")
    return module.BENCHES[name]


def plan(cfg: BenchConfig) -> tuple[list[tuple[OpBench, str]], list[dict]]:
    """The (op, provider) pairs to run and the skipped ones with reasons. Raises BenchError,
    before anything runs, when a provider named in cfg.providers cannot run."""
    if cfg.device not in ("cpu", "cuda"):
        raise BenchError(f"device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if cfg.size_set not in SIZE_SETS:
        raise BenchError(f"size set must be one of {SIZE_SETS}, got {cfg.size_set!r}")
    for p in cfg.providers or ():
        if p not in _providers.PROVIDERS:
            raise BenchError(f"unknown provider {p!r}; choose from {', '.join(_providers.PROVIDERS)}")
    for d in cfg.dtypes or ():
        if d not in DTYPES:
            raise BenchError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    for m in cfg.modes or ():
        if m not in MODES:
            raise BenchError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if cfg.plots and importlib.util.find_spec("matplotlib") is None:
        raise BenchError("the plots need matplotlib (pip install matplotlib), or pass --no-plots")
    benches = [load_op(n) for n in (cfg.ops or OPS)]
    named = list(cfg.providers or ())
    todo, skipped, failures = [], [], []
    for bench in benches:
        for provider in bench.providers:
            if named and provider not in named:
                continue
            reason = bench.probe(provider, cfg.device)
            if reason is None:
                todo.append((bench, provider))
            elif named:
                failures.append(f"{provider} cannot run {bench.name} on {cfg.device}: {reason}")
            else:
                skipped.append({"op": bench.name, "provider": provider, "reason": reason})
    for p in named:
        if not any(p in b.providers for b in benches):
            failures.append(f"{p} implements none of the selected ops "
                            f"({', '.join(b.name for b in benches)})")
    if failures:
        raise BenchError("providers asked for by name cannot run:\n  " + "\n  ".join(failures))
    known = {s["variant"] for b in benches for s in b.shapes(cfg.size_set, cfg.device)}
    unknown = sorted(set(cfg.variants or ()) - known)
    if unknown:
        raise BenchError(f"no case of the selected ops has variant {', '.join(unknown)}; "
                         f"choose from {', '.join(sorted(known))}")
    return todo, skipped


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict:
    """The commit of the llmcore source tree, when it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None, "note": "llmcore is not installed from a git checkout"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "dirty": None, "note": f"git failed: {exc}"}
    return {"commit": commit, "dirty": bool(status.strip())}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    import llmcore

    machine = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        machine.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                       cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
        machine["summary"] = f"{p.name} (CUDA {torch.version.cuda})"
    else:
        n = machine["torch_threads"]
        machine["summary"] = f"{machine['cpu']}, {n} thread{'' if n == 1 else 's'}"
    versions = {"python": platform.python_version(), "llmcore": llmcore.__version__,
                "torch": torch.__version__}
    for dist in ("triton", "numpy", "flash-attn", "liger-kernel", "transformers"):
        versions[dist] = _version(dist)
    return {"machine": machine, "versions": versions, "git": git_commit()}


def _label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "variant")


def run(cfg: BenchConfig) -> dict:
    """Runs the benchmark and writes results.json, results.md and the plots to cfg.out.
    Returns the results dict; results["errors"] lists cases that failed while running."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    todo, skipped = plan(cfg)
    env = environment(cfg.device)
    timing = TIMINGS[(cfg.size_set, cfg.device)]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {"machine": env["machine"]["summary"], "git_commit": env["git"]["commit"],
              "versions": {k: env["versions"][k] for k in ("torch", "triton", "llmcore")}}
    records, errors, measured = [], [], []
    for s in skipped:
        log.info("skip %s / %s: %s", s["op"], s["provider"], s["reason"])
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None
    for bench, provider in todo:
        not_run = 0
        dtypes = list(cfg.dtypes or bench.default_dtypes(cfg.device))
        modes = [m for m in bench.modes if not cfg.modes or m in cfg.modes]
        for shape in bench.shapes(cfg.size_set, cfg.device):
            if cfg.variants and shape["variant"] not in cfg.variants:
                continue
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                for mode in modes:
                    reason = bench.skip_reason(provider, shape, cfg.device, mode)
                    if reason is not None:
                        if dtype_name == dtypes[0]:
                            skipped.append({"op": bench.name, "provider": provider,
                                            "reason": f"{shape['variant']} {_label(shape)} "
                                                      f"{mode}: {reason}"})
                            log.info("skip %s / %s %s %s: %s", bench.name, provider,
                                     _label(shape), mode, reason)
                        continue
                    case = {"op": bench.name, "provider": provider, "device": cfg.device,
                            "dtype": dtype_name, "mode": mode, "variant": shape["variant"],
                            "shape": {k: v for k, v in shape.items() if k != "variant"}}
                    if deadline is not None and time.monotonic() > deadline:
                        not_run += 1
                        continue
                    try:
                        rec = _run_case(bench, provider, shape, dtype, mode, cfg, timing)
                    except Exception as exc:  # record and go on; the run exits non-zero
                        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
                        errors.append({**case, "error": msg})
                        log.warning("FAILED %s / %s %s %s %s: %s", bench.name, provider,
                                    _label(shape), dtype_name, mode, msg)
                        continue
                    finally:
                        gc.collect(1)
                        if cfg.device == "cuda":
                            torch.cuda.empty_cache()
                    rec = {**case, **rec, **common}
                    records.append(rec)
                    measured.append((rec, shape))
                    log.info("%-20s %-15s %-36s %-8s %-7s %9.3f ms  %s", bench.name, provider,
                             _label(shape)[:36], dtype_name, mode, rec["ms"],
                             _fmt_throughput(rec))
        if not_run:
            skipped.append({"op": bench.name, "provider": provider,
                            "reason": f"{not_run} cases not run: the time budget of "
                                      f"{cfg.max_minutes:g} min (--max-minutes) ran out"})
            log.warning("skip %d cases of %s / %s: time budget", not_run, bench.name, provider)
    if cfg.device == "cpu" and cfg.memory and measured:
        errors += _fill_cpu_memory(measured, cfg)
    result = {"schema": 1, "created": stamp, "config": dataclasses.asdict(cfg), **env,
              "memory_method": ("cuda max_memory_allocated" if cfg.device == "cuda" else
                                "peak RSS of a child process (VmHWM after clear_refs)")
              if cfg.memory else None,
              "skipped": skipped, "errors": errors, "records": records}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    from llmcore.benchmarks import report
    (out / "results.md").write_text(report.markdown(result))
    if cfg.plots:
        report.plots(result, out)
    return result


def _fmt_throughput(rec: dict) -> str:
    v = rec.get("throughput")
    return "" if v is None else f"{v:10.2f} {rec['throughput_unit']}"


def _run_case(bench: OpBench, provider: str, shape: dict, dtype: torch.dtype, mode: str,
              cfg: BenchConfig, timing: Timing) -> dict:
    n_sets = 1
    if mode != "step" and timing.rotate and not bench.host_timing:
        n_sets = rotation_sets(bench.input_bytes(shape, dtype), cfg.device)
    runner = bench.runner(provider, shape, dtype, cfg.device, mode, n_sets)
    ms_all, cpu_all = time_runner(runner, cfg.device, timing, bench.host_timing)
    ms, p20, p80 = quantiles(ms_all)
    peak = cuda_peak_mb(runner) if cfg.device == "cuda" and cfg.memory else None
    del runner
    work = bench.work(shape, dtype, mode)
    scale = {"GB/s": 1e9, "TFLOP/s": 1e12, "tokens/s": 1.0, "calls/s": 1.0}[bench.unit]
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    return {"ms": ms, "ms_p20": p20, "ms_p80": p80, "reps": len(ms_all), "input_sets": n_sets,
            "cpu_ms": quantiles(cpu_all)[0] if cpu_all else None,
            "peak_mb": peak, "throughput": work / (ms * 1e-3) / scale, "throughput_unit": bench.unit,
            **bench.extra(shape, dtype_name, mode, ms, cfg.device, provider)}


def _fill_cpu_memory(group: list, cfg: BenchConfig) -> list:
    """Sets peak_mb of each (record, shape) in `group` from the memory child; returns errors."""
    errors = []
    cases = [{"op": rec["op"], "provider": rec["provider"], "shape": shape, "dtype": rec["dtype"],
              "mode": rec["mode"]} for rec, shape in group]
    log.info("measuring the peak memory of %d cases in a child process", len(cases))
    results = _cpu_memory_in_child(cases, torch.get_num_threads(),
                                   timeout_s=120 + 30 * len(cases))
    for (rec, _), res in zip(group, results):
        rec["peak_mb"] = res.get("peak_mb")
        if "error" in res:
            rec["peak_mb_error"] = res["error"]
            errors.append({k: rec[k] for k in ("op", "provider", "device", "dtype", "mode",
                                                "variant", "shape")}
                          | {"error": "peak memory: " + res["error"]})
            log.warning("memory of %s / %s %s: %s", rec["op"], rec["provider"], rec["mode"],
                        res["error"])
    return errors
