"""Compile llmcore's Triton kernels for an NVIDIA GPU on a machine without one, and read what the
compiler made of them: registers, spills, shared memory, occupancy, and the instructions of
each loop.

Why: the kernels are written for the H200, and most working sessions have no GPU. Triton
compiles ahead of time for any CUDA target (its wheel carries ptxas and cuobjdump), so a CPU
machine can prove that every kernel variant compiles for sm_90 (the interpreter never compiles
anything), that no launch configuration spills registers or asks for more shared memory than
an SM has, and that the inner loops use Hopper's instructions (HGMMA, async copies) with little
integer work around them. It times nothing: a short loop is a prediction, not a measurement.

How: the launchers run as usual on `meta` tensors (no memory, no data) inside `compile_for`.
Triton asks a stand-in driver for its target, and every `kernel[grid](...)` compiles without
launching. The attention kernels, autotuned on a GPU, compile once per candidate config that
the pruner keeps for the shape (or just the first, `attention_configs="first"`). Run it where
TRITON_INTERPRET is unset: the kernels must be the compiled ones (a subprocess does it in the
tests).

    with compile_for(90) as compiled:
        attention_fwd(q, k, v, scale=0.125, window=(-1, 0))      # q, k, v on "meta"
    for c in compiled:
        print(c.name, c.config, c.resources(), c.loops())
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile

import triton

# Hopper (sm_90) per-SM limits: 64K 32-bit registers, 228 KiB of shared memory of which one
# block may use 227 KiB, 64 resident warps, 32 resident blocks; 1 KiB of each block's shared
# memory is reserved by the system.
SM90 = dict(regs=65536, smem=233472, smem_per_block=232448, warps=64, blocks=32,
            smem_reserved=1024)

# Spills accepted in a compile, each of a candidate the attention autotuner times like the others:
# (kernel, BLOCK_D, BLOCK_M, BLOCK_N, warps, stages) -> bytes per thread at most. Both are
# register-limit tiles that compile without a spill under Triton 3.6 (the H200 machine's) in the
# causal smoke case and spill under 3.9: the D = 128 forward's 128 x 128 (16 bytes) and the
# D = 128 dK/dV 32 x 128 with 2 stages (64 bytes; its 3-stage twin does not spill). At the
# register limit a small change in the kernel moves these by tens of bytes either way.
TOLERATED_SPILLS = {("_attn_fwd_kernel", 128, 128, 128, 8, 2): 16,
                    ("_attn_bwd_dkdv_kernel", 128, 32, 128, 8, 2): 64}


def unexpected(row: dict) -> bool:
    """A report row that spills more than TOLERATED_SPILLS allows its kernel and tile (nothing,
    for most), or whose shared memory does not fit an SM."""
    c = row["config"]
    key = (row["kernel"], c.get("BLOCK_D"), c.get("BLOCK_M"), c.get("BLOCK_N"),
           c.get("num_warps"), c.get("num_stages"))
    return row["spill"] > TOLERATED_SPILLS.get(key, 0) or not row["fits"]


# opcode classes of the loop summaries (prefixes of SASS opcodes)
_CLASSES = {
    "mma": ("HGMMA", "HMMA"),
    "tma": ("UTMALDG", "UTMASTG", "UBLKCP"),
    "async_copy": ("LDGSTS",),
    "global_load": ("LDG",),
    "global_store": ("STG",),
    "shared": ("LDS", "STS", "LDSM"),
    "exp": ("MUFU",),
    "int": ("IMAD", "IADD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IABS", "VIADD", "IMNMX",
            "ULEA", "UIADD", "UIMAD", "USHF", "ULOP", "UISETP", "USEL", "PRMT"),
    "float": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "F2F", "F2FP", "FCHK"),
    "sync": ("BAR", "WARPSYNC", "DEPBAR", "LDGDEPBAR", "SYNCS", "WARPGROUP"),
}


def _tool(name: str) -> str:
    """Path of a CUDA tool shipped in Triton's wheel (backends/nvidia/bin)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in this Triton's wheel ({path})")
    return path


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([_tool("cuobjdump"), *flags, f.name], capture_output=True,
                              text=True, check=True)
    return done.stdout


@dataclasses.dataclass
class Compiled:
    """One kernel as compiled for the target: its name, the constexprs and launch options it was
    specialised with, and Triton's CompiledKernel (asm['ptx'], asm['cubin'], metadata)."""
    name: str
    config: dict
    kernel: object

    @property
    def num_warps(self) -> int:
        return self.kernel.metadata.num_warps

    @functools.cached_property
    def _usage(self) -> dict:
        text = _cuobjdump(self.kernel.asm["cubin"], "--dump-resource-usage")
        line = next(l for l in text.splitlines() if "REG:" in l)
        return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}

    def resources(self) -> dict:
        """regs per thread; spill = stack + local bytes per thread (0 unless registers ran out);
        shared = bytes of shared memory per block (the pipeline buffers Triton sizes at compile
        time, plus static); fits = the block can launch on an SM at all; blocks_per_sm and
        warps_per_sm = the occupancy that registers, shared memory and warps allow."""
        u = self._usage
        regs, warps = u["REG"], self.num_warps
        shared = self.kernel.metadata.shared + u["SHARED"]
        # registers are allocated per warp in units of 256
        regs_per_warp = -(-regs * 32 // 256) * 256
        by_regs = SM90["regs"] // max(regs_per_warp * warps, 1)
        by_smem = SM90["smem"] // (shared + SM90["smem_reserved"])
        blocks = min(by_regs, by_smem, SM90["warps"] // warps, SM90["blocks"])
        return dict(regs=regs, spill=u["STACK"] + u["LOCAL"], shared=shared,
                    fits=shared <= SM90["smem_per_block"] and blocks > 0, blocks_per_sm=blocks,
                    warps_per_sm=blocks * warps)

    @functools.cached_property
    def sass(self) -> list[tuple[int, str]]:
        """(address, opcode) of every instruction, predicates dropped."""
        text = _cuobjdump(self.kernel.asm["cubin"], "-sass")
        out = []
        for addr, body in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text):
            body = re.sub(r"^@!?U?P\w+\s+", "", body.strip())
            out.append((int(addr, 16), body))
        return out

    def loops(self) -> list[dict]:
        """Every innermost-or-not loop (a backward branch), in address order: its instruction
        count and counts per opcode class (_CLASSES), e.g. mma (HGMMA), int (address and index
        arithmetic), async_copy (LDGSTS). The loops with mma are the attention tile loops."""
        insts = self.sass
        out = []
        for addr, body in insts:
            m = re.match(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", body)
            if not m or not m.group(1) or int(m.group(1), 16) >= addr:
                continue
            start = int(m.group(1), 16)
            ops = [b.split()[0] for a, b in insts if start <= a <= addr]
            counts = collections.Counter()
            for op in ops:
                for cls, prefixes in _CLASSES.items():
                    if op.startswith(prefixes):
                        counts[cls] += 1
                        break
            out.append(dict(start=start, instructions=len(ops), **counts))
        return out


class _TargetDriver:
    """What Triton asks the active driver while compiling a launch, answered for a GPU that is
    not there."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 64)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def target(arch: int = 90):
    """Inside: Triton's active driver is the stand-in for sm_<arch>, so `JITFunction.run(...,
    warmup=True)` compiles (or finds in its cache) without a GPU."""
    from triton.runtime.driver import driver

    previous = driver._active  # None until something asked: reset_active would probe for a GPU
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def _short_config(kwargs: dict) -> dict:
    """The constexprs and options worth reporting: drop pointers, tensors and Triton's
    internal options."""
    keep = {}
    for k, v in kwargs.items():
        if k in ("debug", "instrumentation_mode", "fpsan_homomorphic_casts"):
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            keep[k] = v
        elif hasattr(v, "name") and not hasattr(v, "data_ptr"):  # tl dtypes
            keep[k] = str(v)
    return keep


@contextlib.contextmanager
def compile_for(arch: int = 90, attention_configs="all"):
    """Inside: every Triton launch compiles for sm_<arch> instead of running, and is appended to
    the yielded list as a Compiled. attention_configs: "all" compiles each autotune candidate the
    pruner keeps for the shape, "first" only the first (the heuristic's choice), a list of
    triton.Config those configs instead (a sweep beyond the tables)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_for needs the compiled kernels: unset TRITON_INTERPRET "
                           "before llmcore's Triton modules are imported")
    from triton.runtime.jit import JITFunction

    from llmcore.kernels.triton import attention

    if attention._INTERPRET:
        raise RuntimeError("llmcore's attention kernels were imported under TRITON_INTERPRET=1")
    compiled: list[Compiled] = []
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(Compiled(self.__name__, _short_config(kwargs), kernel))
        return kernel

    def launch(kernel, grid_axis0, H, B, args, consts, tune_key):
        if isinstance(attention_configs, str):
            named = dict(zip(kernel.fn.arg_names, args))
            configs = kernel.early_config_prune(kernel.configs, named, **consts)
            configs = configs[:1] if attention_configs == "first" else configs
        else:
            configs = attention_configs
        for config in configs:
            kernel.fn.run(*args, grid=(1, 1, 1), warmup=True, **consts, **config.all_kwargs())

    JITFunction.run = run
    real_launch, attention._launch = attention._launch, launch
    try:
        with target(arch):
            yield compiled
    finally:
        attention._launch = real_launch
        JITFunction.run = real_run


# ------------------------------------------------------------------------------ the report
# python -m llmcore.kernels.triton.aot [--cases smoke|full] [--arch 90] [--json F] [--md F]:
# compile the cases for the GPU check's shapes (meta tensors: nothing is allocated) and print
# one row per compiled kernel. Exit status 1 when a kernel spills (beyond TOLERATED_SPILLS) or
# does not fit an SM.

def _cases(full: bool):
    """(label, thunk) pairs; each thunk runs launchers on meta tensors."""
    import torch

    from llmcore.kernels.triton import attention as A
    from llmcore.kernels.triton import cross_entropy as ce
    from llmcore.kernels.triton import gelu, norm, rope, swiglu

    meta, bf16 = "meta", torch.bfloat16

    def empty(*shape, dtype=bf16):
        return torch.empty(shape, device=meta, dtype=dtype)

    def attention(b=4, h=16, hkv=None, s=2048, d=128, dv=None, deterministic=True,
                  mask_grad=False, varlen=False, schedule="two_pass", **kw):
        hkv, dv = hkv or h, dv or d
        q, k, v = empty(b, h, s, d), empty(b, hkv, s, d), empty(b, hkv, s, dv)
        if varlen:  # b packed sequences of s tokens: (1, H, b * s, D) views
            q, k, v = (t.reshape(1, t.shape[1], -1, t.shape[3]) for t in (q, k, v))
            cu = empty(b + 1, dtype=torch.int32)
            kw = dict(kw, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s)
        kw.setdefault("scale", d ** -0.5)
        out, lse = A.attention_fwd(q, k, v, **kw)
        before, A.BWD_SCHEDULE = A.BWD_SCHEDULE, schedule
        try:
            A.attention_bwd(out, q, k, v, out, lse, deterministic=deterministic,
                            mask_grad=mask_grad, **kw)
        finally:
            A.BWD_SCHEDULE = before

    def norms(n, rows=16384):
        x, w = empty(rows, n), empty(n)
        y, h, mean, rstd = norm.norm_fwd(x, None, w, w, 1e-5, False)
        norm.norm_bwd(x, None, x, w, mean, rstd, False, True, True, bf16, bf16)
        y, h, mean, rstd = norm.norm_fwd(x, x, w, None, 1e-6, True)
        norm.norm_bwd(x, x, h, w, None, rstd, True, True, False, bf16, None)

    def cross_entropy(v, rows=8192, **options):
        logits, target = empty(rows, v), empty(rows, dtype=torch.int64)
        scale = empty(dtype=torch.float32)
        args = (None, -100, options.get("label_smoothing", 0.0), options.get("z_loss", 0.0),
                options.get("softcap"))
        loss, lse = ce.ce_fwd(logits, target, *args, grad=logits, grad_scale=scale)
        ce.ce_bwd(logits, target, None, lse, scale, *args[1:])
        ce.ce_grad_block(logits[:, :4096], target, lse, scale, 0, v, *args[1:])

    def rope_and_activations(t=16384, hq=12, hkv=4, d=64, f=2048):
        q, k, tab = empty(t, hq, d), empty(t, hkv, d), empty(2048, d, dtype=torch.float32)
        rope.rotary(q, k, tab, tab)
        rope.rotary(q, k, tab, tab, backward=True)
        x = empty(t, 2 * f)
        swiglu.swiglu_bwd(swiglu.swiglu_fwd(x), x)
        h = empty(t, f)
        for approximate in ("none", "tanh"):
            gelu.gelu_bwd(gelu.gelu_fwd(h, approximate), h, approximate)

    causal = (-1, 0)
    cases = [("attention D128 causal", lambda: attention(window=causal)),
             ("layer_norm, rms_norm+residual 4096", lambda: norms(4096)),
             ("cross_entropy V32000", lambda: cross_entropy(32000)),
             ("rope, swiglu, gelu", rope_and_activations)]
    if not full:
        return cases
    return cases + [
        ("attention D128 full", lambda: attention()),
        ("attention D64 causal", lambda: attention(b=8, h=32, d=64, window=causal)),
        ("attention GQA 32/8 D128 causal S8192", lambda: attention(b=2, h=32, hkv=8, s=8192,
                                                                  window=causal)),
        ("attention D128 causal, deterministic=False", lambda: attention(window=causal,
                                                                         deterministic=False)),
        ("attention D128 causal, the ordered dq", lambda: attention(window=causal,
                                                                   schedule="ordered")),
        ("attention D128 full, the ordered dq", lambda: attention(schedule="ordered")),
        ("attention D64 causal, the ordered dq", lambda: attention(b=8, h=32, d=64,
                                                                  window=causal,
                                                                  schedule="ordered")),
        ("attention GQA 32/8 D128 causal S8192, the ordered dq", lambda: attention(
            b=2, h=32, hkv=8, s=8192, window=causal, schedule="ordered")),
        ("attention D128 window 4096", lambda: attention(b=1, s=16384, window=(4096, 0))),
        ("attention D128 causal softcap 50", lambda: attention(window=causal, softcap=50.0)),
        ("attention D128 causal ALiBi", lambda: attention(
            window=causal, alibi_slopes=empty(16, dtype=torch.float32))),
        ("attention D128 bool mask", lambda: attention(
            attn_mask=empty(4, 1, 2048, 2048, dtype=torch.bool))),
        ("attention D128 additive mask with its gradient", lambda: attention(
            attn_mask=empty(4, 1, 2048, 2048), mask_grad=True)),
        ("attention D128 varlen 8 x 2048", lambda: attention(b=8, varlen=True, window=causal)),
        ("attention D128 causal dropout 0.1", lambda: attention(
            window=causal, dropout_p=0.1, seed=empty(1, dtype=torch.int64))),
        ("attention D80", lambda: attention(d=80, window=causal)),
        ("attention D96", lambda: attention(d=96, window=causal)),
        ("attention D192", lambda: attention(d=192, window=causal)),
        ("attention D256", lambda: attention(d=256, window=causal)),
        ("attention D128 Dv64", lambda: attention(dv=64, window=causal)),
        ("layer_norm, rms_norm+residual 1024", lambda: norms(1024)),
        ("layer_norm, rms_norm+residual 2048", lambda: norms(2048)),
        ("layer_norm, rms_norm+residual 8192", lambda: norms(8192)),
        ("cross_entropy V128256", lambda: cross_entropy(128256)),
        ("cross_entropy V256000", lambda: cross_entropy(256000)),
        ("cross_entropy V32000 smoothing, z-loss, softcap", lambda: cross_entropy(
            32000, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)),
    ]


def report(full: bool = False, arch: int = 90) -> list[dict]:
    """One dict per distinct compiled kernel of the cases: case, kernel, config, resources()
    and the loops that hold tensor-core instructions (or all loops when none do)."""
    rows, seen = [], set()
    for label, thunk in _cases(full):
        with compile_for(arch) as compiled:
            thunk()
        for c in compiled:
            key = (label, c.name, tuple(sorted(c.config.items())))
            if key in seen:
                continue
            seen.add(key)
            loops = c.loops()
            mma_loops = [l for l in loops if l.get("mma")]
            rows.append(dict(case=label, kernel=c.name, config=c.config, **c.resources(),
                             loops=mma_loops or loops))
    return rows


def _markdown(rows: list[dict]) -> str:
    def cfg(c):
        names = [k for k in c if k.startswith("BLOCK")] + ["num_warps", "num_stages"]
        flavour = [c["APPROXIMATE"]] if "APPROXIMATE" in c else []      # gelu's formula
        return " ".join(flavour + [f"{k.replace('BLOCK_', '').replace('num_', '')}={c[k]}"
                                   for k in names if k in c])

    def loops(ls):  # instructions / tensor-core ops / integer ops per loop
        return ", ".join(f"{l['instructions']}/{l.get('mma', 0)}/{l.get('int', 0)}" for l in ls)

    lines = ["| case | kernel | config | regs | spill B | shared KiB | warps/SM | loops "
             "(instr/mma/int) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['kernel']} | {cfg(r['config'])} | {r['regs']} | "
                     f"{r['spill']} | {r['shared'] / 1024:.0f}{'' if r['fits'] else ' (too big)'}"
                     f" | {r['warps_per_sm']} | {loops(r['loops'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", choices=("smoke", "full"), default="full")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90)")
    p.add_argument("--json", help="write the rows here as JSON")
    p.add_argument("--md", help="write the markdown table here")
    args = p.parse_args(argv)
    rows = report(args.cases == "full", args.arch)
    table = _markdown(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, rows=rows), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    bad = [r for r in rows if unexpected(r)]
    for r in bad:
        print(f"{r['case']}: {r['kernel']} {r['config']} spills {r['spill']} B or does not fit "
              f"({r['shared']} B of shared memory)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
