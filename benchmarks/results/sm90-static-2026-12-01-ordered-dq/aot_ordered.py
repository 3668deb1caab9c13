# The backward kernels of the attention cases that compare the three backward schedules, compiled
# for sm_90 on a machine without a GPU (llmcore.kernels.triton.aot, TRITON_INTERPRET unset):
# the two-pass dK/dV and dq kernels of "attention D128 causal", the deterministic=False pass and
# every "the ordered dq" case. Run with each Triton: python aot_ordered.py > aot_..._tritonXY.md
import llmcore.kernels.triton.aot as aot

keep = ("attention D128 causal", "attention D128 causal, deterministic=False")
full = aot._cases
aot._cases = lambda _: [c for c in full(True) if "ordered" in c[0] or c[0] in keep]
rows = [r for r in aot.report(True, 90) if r["kernel"] in ("_attn_bwd_dkdv_kernel",
                                                          "_attn_bwd_dq_kernel")]
print(aot._markdown(rows))
