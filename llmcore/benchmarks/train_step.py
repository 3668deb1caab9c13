"""A whole training step (forward, backward, AdamW step) of the gpt2, bert and llama flavours.

Cases (variants): "gpt2" (causal LM on every token), "bert" (masked LM, 15% of the tokens as
targets), "bert_padded" (the same with padded rows: each row's length uniform in [0.6 T, T],
about 20% padding; attention_mask 1 on real tokens, input id 0 and label -100 on padding, 15% of
the real tokens as targets) and "llama" (RMSNorm, rotary positions, SwiGLU, GQA, causal LM).
On CUDA: gpt2-small B8 T1024, bert-base B16 T512 (both bert cases), a llama 12 x 768 with 12
query : 4 kv heads, B4 T2048 ("full" doubles B); on the CPU, small versions of the same four.

Providers: the llmcore Transformer with every op family on one backend ("llmcore_triton",
"llmcore_native") or as "auto" picks per family ("llmcore_auto"; records say which), and that
model under llmcore.models.compile_model ("llmcore_compile": llmcore's ops stay opaque custom
ops in the graph); the same architecture with the backend forced to "torch" (eager PyTorch,
and "torch_compile": that model under torch.compile); the Hugging Face model with the same
weights ("hf", via llmcore.models.to_hf; transformers' default attention) and that model under
torch.compile ("hf_compile"). Every provider trains with the same inputs and the same
torch.optim.AdamW (default settings). A padded batch reaches the llmcore model as its
attention_mask, which it packs (varlen attention, no compute on padding), with the counts of
real tokens and targets when its forward takes them (num_tokens, num_targets: computed here on
the host, so the model needs no host sync to size the packed batch); HF models apply the mask.

tokens/s (the throughput) = B * T / step time, padding included; records of the padded case
also hold real_tokens_per_s (real tokens only). On CUDA, dtype bfloat16 means fp32 parameters
under torch.autocast(bfloat16) (the trainer's setting) and MFU = model FLOPs per step / step
time / the GPU's peak dense bf16 FLOP/s, where the FLOPs per step are tokens x
Transformer.estimate_flops_per_token (6 N + attention at the row's length) summed over the real
tokens only: the padding is not work, whether or not a provider computes it.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math

import torch

from llmcore.benchmarks.harness import OpBench, Rand, Runner
from llmcore.benchmarks.providers import LLMCORE_BACKEND

# peak dense bf16/fp16 tensor-core FLOP/s by GPU name (vendor data sheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
VARIANTS = ("gpt2", "llama", "bert", "bert_padded")   # in the order they run


def _sizes(size_set: str, device: str) -> list[dict]:
    """One dict per case: flavour, model sizes (llama also n_kv_heads, ffn), B, T."""
    if size_set == "tiny":
        m, bt = dict(dim=32, n_layers=1, n_heads=2, vocab=512), dict(B=2, T=32)
        llama = dict(m, n_kv_heads=1, ffn=96, B=2, T=32)
    elif device == "cpu":
        if size_set == "quick":
            m, bt = dict(dim=256, n_layers=2, n_heads=4, vocab=8192), dict(B=4, T=128)
        else:
            m, bt = dict(dim=512, n_layers=6, n_heads=8, vocab=32000), dict(B=4, T=256)
        # the same tokens per step as the others in rows twice as long (2048 vs 1024 on CUDA)
        llama = dict(m, n_kv_heads=m["n_heads"] // 2, ffn=8 * m["dim"] // 3 // 16 * 16,
                     B=bt["B"] // 2, T=2 * bt["T"])
    else:
        # CUDA: gpt2-small, bert-base, a llama 12 x 768 with GQA 12:4 and SwiGLU 2048
        scale = 1 if size_set == "quick" else 2
        gpt2 = dict(dim=768, n_layers=12, n_heads=12, vocab=50257, B=8 * scale, T=1024)
        bert = dict(dim=768, n_layers=12, n_heads=12, vocab=30522, B=16 * scale, T=512)
        llama = dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn=2048, vocab=32000,
                     B=4 * scale, T=2048)
        return [{"flavour": "gpt2", **gpt2}, {"flavour": "llama", **llama},
                {"flavour": "bert", **bert}, {"flavour": "bert_padded", **bert}]
    return [{"flavour": "gpt2", **m, **bt}, {"flavour": "llama", **llama},
            {"flavour": "bert", **m, **bt}, {"flavour": "bert_padded", **m, **bt}]


def _config(shape: dict, backend: str):
    from llmcore.models import config as mc

    family = shape["flavour"].removesuffix("_padded")
    extra = {}
    if family == "llama":
        extra = dict(n_kv_heads=shape["n_kv_heads"], ffn_dim=shape["ffn"])
    make = {"gpt2": mc.gpt2, "bert": mc.bert, "llama": mc.llama}[family]
    return make(dim=shape["dim"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                vocab_size=shape["vocab"], max_seq_len=max(shape["T"], 128), backend=backend,
                **extra)


# The default `llmcore pretrain` run's model and batch shape (the tiny-gpt preset: width 128,
# 4 layers, 4 heads, 4k vocabulary, B16 T128); llama adds GQA 4:2 and a SwiGLU of 352.
PRETRAIN_SHAPE = dict(flavour="gpt2", dim=128, n_layers=4, n_heads=4, vocab=4096, B=16, T=128,
                      n_kv_heads=2, ffn=352)


def pretrain_case(backend: str = "auto", flavour: str = "gpt2"):
    """(model, fused AdamW, batch) at the default pretrain run's shape on the CPU, seeded: the
    case of the CPU step measurements under benchmarks/results/."""
    from llmcore.models import Transformer

    torch.manual_seed(0)
    shape = dict(PRETRAIN_SHAPE, flavour=flavour)
    model = Transformer(_config(shape, backend))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), batch(shape, 0)


def peak_flops(device: str, dtype: str) -> float | None:
    if device != "cuda" or dtype not in ("bfloat16", "float16"):
        return None
    name = torch.cuda.get_device_properties(0).name
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def batch(shape: dict, seed: int) -> dict:
    """The case's CPU batch: input_ids and labels, and for bert_padded attention_mask.
    gpt2 and llama: labels are the ids (the model shifts them); bert: 15% of the (real)
    positions are targets, -100 elsewhere."""
    rnd = Rand("cpu", seed)
    b, t, v = shape["B"], shape["T"], shape["vocab"]
    ids = rnd.integers(v, b, t, low=1)                      # 0 is bert's padding id
    if shape["flavour"] in ("gpt2", "llama"):
        return {"input_ids": ids, "labels": ids}
    targets = rnd.integers(100, b, t) < 15
    out = {}
    if shape["flavour"] == "bert_padded":
        lengths = rnd.integers(t + 1, b, 1, low=math.ceil(0.6 * t))     # (B, 1)
        real = torch.arange(t) < lengths                                 # (B, T)
        ids = torch.where(real, ids, 0)
        targets &= real
        out["attention_mask"] = real.long()
    labels = torch.where(targets, ids, -100)
    return {"input_ids": ids, **out, "labels": labels}


def counts(model: torch.nn.Module, batch: dict) -> dict:
    """num_tokens / num_targets for an llmcore model whose forward takes them (from the CPU
    batch: no host sync on the step path); {} otherwise."""
    if "num_tokens" not in inspect.signature(model.forward).parameters:
        return {}
    out = {}
    if "attention_mask" in batch:
        out["num_tokens"] = int(batch["attention_mask"].sum())
    if model.config.head == "mlm":                          # the targets the MLM head gathers
        out["num_targets"] = int((batch["labels"] != -100).sum())
    return out


class TrainStepBench(OpBench):
    name = "train_step"
    families = ("norm", "cross_entropy", "attention")
    # baseline first, then roughly by importance (a --max-minutes run drops the last ones)
    providers = ("torch", "llmcore_auto", "hf", "llmcore_compile", "hf_compile",
                 "torch_compile", "llmcore_triton", "llmcore_native")
    modes = ("step",)
    unit = "tokens/s"
    x_key = "T"

    def shapes(self, size_set, device):
        return [{"variant": s["flavour"], **s} for s in _sizes(size_set, device)]

    def probe(self, provider, device):
        try:
            importlib.import_module("llmcore.models")
        except Exception as exc:
            return f"llmcore.models is not importable: {type(exc).__name__}: {exc}"
        return super().probe(provider, device)

    def _model(self, provider: str, shape: dict, device: str):
        """(module to call, the llmcore Transformer or None for HF models)."""
        from llmcore.models import Transformer, compile_model

        backend = LLMCORE_BACKEND.get(provider, "torch")
        if provider.endswith("_compile"):
            # every case compiles from scratch: without this, the graphs of earlier cases would
            # count towards dynamo's recompile limit and mark sizes dynamic ("automatic dynamic")
            torch._dynamo.reset()
        torch.manual_seed(0)
        model = Transformer(_config(shape, backend))
        if provider in ("hf", "hf_compile"):
            from llmcore.models import to_hf

            hf = to_hf(model).to(device).train()
            return (torch.compile(hf) if provider == "hf_compile" else hf), None
        model = model.to(device).train()
        if provider == "torch_compile":
            return torch.compile(model), model
        if provider == "llmcore_compile":
            return compile_model(model), model
        return model, model

    def inputs(self, shape, dtype, device, seed):
        if device == "meta":
            b, t = shape["B"], shape["T"]
            ids = torch.empty(b, t, dtype=torch.int64, device="meta")
            mask = {"attention_mask": ids} if shape["flavour"] == "bert_padded" else {}
            return {"input_ids": ids, **mask, "labels": ids}
        return {k: v.to(device) for k, v in batch(shape, seed).items()}

    def runner(self, provider, shape, dtype, device, mode, n_sets):
        if mode != "step":
            raise ValueError(f"train_step has only mode 'step', got {mode!r}")
        if device == "cpu" and dtype != torch.float32:
            raise ValueError("train_step on the CPU runs in float32 only (no CPU autocast here)")
        model, llmcore_model = self._model(provider, shape, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        host = batch(shape, 0)
        inp = {k: v.to(device) for k, v in host.items()}
        if llmcore_model is not None:
            inp.update(counts(llmcore_model, host))
        autocast = (torch.autocast("cuda", dtype=dtype)
                    if device == "cuda" and dtype != torch.float32 else contextlib.nullcontext())

        def call():
            with autocast:
                loss = model(**inp).loss
            loss.backward()
            opt.step()

        def pre():
            opt.zero_grad(set_to_none=True)
        return Runner(call=call, pre=pre)

    def work(self, shape, dtype, mode):
        return shape["B"] * shape["T"]

    def extra(self, shape, dtype, mode, ms, device, provider=None):
        from llmcore import backends
        from llmcore.models import Transformer

        with torch.device("meta"):
            model = Transformer(_config(shape, "torch"))
        if shape["flavour"] == "bert_padded":
            lengths = batch(shape, 0)["attention_mask"].sum(1).tolist()
        else:
            lengths = [shape["T"]] * shape["B"]
        # FLOPs of the real tokens: each row's at its own length (the attention term grows with it)
        flops = sum(n * model.estimate_flops_per_token(n) for n in lengths)
        real = sum(lengths)
        peak = peak_flops(device, dtype)
        backend = LLMCORE_BACKEND.get(provider, "torch")
        rec = {"flops_per_token": flops / real,
               "mfu": flops / (ms * 1e-3) / peak if peak else None,
               "backends": None if provider in ("hf", "hf_compile") else
               {f: backends.resolve(f, backend, device) for f in self.families}}
        if shape["flavour"] == "bert_padded":
            rec["real_tokens_per_s"] = real / (ms * 1e-3)
            rec["padding"] = 1 - real / (shape["B"] * shape["T"])
        return rec


BENCHES = {"train_step": TrainStepBench()}
