"""The Triton kernels, compiled for the H200 (sm_90) on this CPU machine: every family compiles
(the interpreter tests never compile anything), no launch configuration the attention autotuner
may pick spills registers or overflows shared memory, and the attention tile loops run on the
tensor cores (HGMMA). llmcore.kernels.triton.aot does the compiling; the GPU itself is not
needed. It runs in a child process: the kernels must be imported without TRITON_INTERPRET."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _compile_smoke(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    done = subprocess.run(
        [sys.executable, "-m", "llmcore.kernels.triton.aot", "--cases", "smoke", "--json",
         str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), done.stderr[-4000:]
    return dict(json.loads(out.read_text()), returncode=done.returncode, stderr=done.stderr)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return _compile_smoke(tmp_path_factory.mktemp("aot"))


def test_every_triton_family_compiles_for_sm90(smoke):
    kernels = {r["kernel"] for r in smoke["rows"]}
    assert {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dq_kernel",
            "_attn_bwd_dkdv_kernel", "_norm_fwd_kernel", "_norm_bwd_kernel",
            "_partials_sum_kernel", "_ce_fwd_kernel", "_ce_bwd_kernel",
            "_ce_grad_block_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
            "_swiglu_bwd_kernel", "_gelu_fwd_kernel", "_gelu_bwd_kernel"} <= kernels
    # gelu: one compiled formula per approximate value, forward and backward
    assert {(r["kernel"], r["config"]["APPROXIMATE"]) for r in smoke["rows"]
            if r["kernel"].startswith("_gelu")} == \
        {(k, a) for k in ("_gelu_fwd_kernel", "_gelu_bwd_kernel") for a in ("none", "tanh")}
    assert smoke["arch"] == 90


def test_no_kernel_spills_or_overflows_shared_memory(smoke):
    # beyond the documented exceptions (aot.TOLERATED_SPILLS: two register-limit tiles that
    # spill under newer Tritons only), which must stay within their bytes
    from llmcore.kernels.triton import aot

    bad = [(r["kernel"], r["config"], r["spill"], r["shared"]) for r in smoke["rows"]
           if aot.unexpected(r)]
    assert not bad, bad
    assert smoke["returncode"] == 0, smoke["stderr"][-4000:]


def test_every_attention_candidate_compiles_and_uses_tensor_cores(smoke):
    # each config the pruner keeps for D = 128, causal, S = 2048 is compiled, and each tile loop
    # of the three attention kernels issues HGMMA (wgmma) instructions
    from llmcore.kernels.triton import attention as A

    for name, table in (("_attn_fwd_kernel", A._FWD_TABLE), ("_attn_bwd_dq_kernel", A._DQ_TABLE),
                        ("_attn_bwd_dkdv_kernel", A._DKDV_TABLE)):
        rows = [r for r in smoke["rows"] if r["kernel"] == name]
        compiled = {(r["config"]["BLOCK_M"], r["config"]["BLOCK_N"], r["config"]["num_warps"],
                     r["config"]["num_stages"]) for r in rows}
        assert compiled == set(table[128]), name
        for r in rows:
            assert r["loops"] and all(loop.get("mma", 0) > 0 for loop in r["loops"]), r
