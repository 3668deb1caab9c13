# Compile every candidate of benchmarks/triton_sweep.py (the norm and cross-entropy launch
# configurations) for sm_90 without a GPU (llmcore.kernels.triton.aot), and report registers,
# spills and the resident warps per SM: which candidates the GPU sweep can time as they are.
# Run without TRITON_INTERPRET:  python aot_sweep.py > aot_sweep_<triton>.txt
import importlib.util, pathlib, torch, triton
from llmcore.kernels.triton import aot, norm, cross_entropy as ce
from llmcore.kernels.triton._host import next_power_of_2

root = pathlib.Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("triton_sweep", root / "benchmarks/triton_sweep.py")
sweep = importlib.util.module_from_spec(spec); spec.loader.exec_module(sweep)
meta, bf16 = "meta", torch.bfloat16
def empty(*s, dtype=bf16): return torch.empty(s, device=meta, dtype=dtype)
print(f"triton {triton.__version__}, sm_90")
print(f"{'kernel':24s} {'case':28s} {'config':36s} regs spill shared warps/SM")
def show(label, cfg, compiled):
    for c in compiled:
        r = c.resources()
        print(f"{c.name:24s} {label:28s} {str(cfg):36s} {r['regs']:4d} {r['spill']:5d} "
              f"{r['shared']:6d} {r.get('warps_per_sm', '')}")
q = sweep.SIZES["quick"]
for n in q["norm_hidden"]:
    block, dw = norm._row_config(n)
    x, w = empty(16384, n), empty(n)
    for is_rms in (False, True):
        b = None if is_rms else w
        lab = f"{'rms' if is_rms else 'layer'} H={n}"
        for wp in sweep._warps_for(block, (1, 2, 4, 8, 16, 32), 64):
            with aot.compile_for(90) as comp, sweep.patched(norm, _row_config=lambda _n: (block, wp)):
                norm.norm_fwd(x, None, w, b, 1e-5, is_rms)
            show(lab + " fwd", {"num_warps": wp}, comp)
        _, _, mean, rstd = (None, None, None if is_rms else empty(16384, dtype=torch.float32),
                            empty(16384, dtype=torch.float32))
        for wp in sorted(set(sweep._warps_for(block, (4, 8, 16), 32)) | {dw}):
            with aot.compile_for(90) as comp, sweep.patched(
                    norm, _row_config=lambda _n: (block, wp), _num_partials=lambda *a: 264):
                norm.norm_bwd(x, None, x, w, mean, rstd, is_rms, True, not is_rms, bf16,
                              None if is_rms else bf16)
            show(lab + " bwd", {"num_warps": wp}, [c for c in comp if c.name == "_norm_bwd_kernel"])
for v in q["ce_classes"]:
    logits, target = empty(8192, v), empty(8192, dtype=torch.int64)
    scale = empty(dtype=torch.float32)
    d = ce._block_v(v)
    cands = [d] + [(min(bl, next_power_of_2(v)), wp) for bl in (2048, 4096, 8192, 16384)
                   for wp in sweep._warps_for(min(bl, next_power_of_2(v)), (4, 8, 16, 32), 64)]
    for bl, wp in dict.fromkeys(cands):
        with aot.compile_for(90) as comp, sweep.patched(ce, _block_v=lambda _v: (bl, wp)):
            loss, lse = ce.ce_fwd(logits, target, None, -100, 0.0, 0.0, None, grad=logits,
                                  grad_scale=scale)
            ce.ce_fwd(logits, target, None, -100, 0.0, 0.0, None)
            ce.ce_bwd(logits, target, None, lse, scale, -100, 0.0, 0.0, None)
        show(f"ce V={v}", {"BLOCK_V": bl, "num_warps": wp}, comp)
