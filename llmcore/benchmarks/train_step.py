"""A whole training step (forward, backward, AdamW step) of the gpt2 and bert flavours.

Providers: the llmcore Transformer with every op family on one backend ("llmcore_triton",
"llmcore_native") or as "auto" picks per family ("llmcore_auto"; records say which), against the same architecture with the backend forced to "torch" (eager
PyTorch, and "torch_compile": that model under torch.compile) and the Hugging Face model with
the same weights ("hf", via llmcore.models.to_hf; transformers' default attention).
Every provider trains with the same inputs and the same torch.optim.AdamW (default settings).
gpt2 trains causal LM on all tokens; bert masked LM with 15% of the tokens as targets.

tokens/s = B * T / step time. On CUDA, dtype bfloat16 means fp32 parameters under
torch.autocast(bfloat16) (the trainer's setting) and MFU = tokens/s * model FLOPs per token
(Transformer.estimate_flops_per_token, 6 N + attention) / the GPU's peak dense bf16 FLOP/s.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from llmcore.benchmarks.harness import OpBench, Rand, Runner
from llmcore.benchmarks.providers import LLMCORE_BACKEND

# peak dense bf16/fp16 tensor-core FLOP/s by GPU name (vendor data sheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def _sizes(size_set: str, device: str) -> list[dict]:
    if size_set == "tiny":
        m = dict(dim=32, n_layers=1, n_heads=2, vocab=512)
        return [{"flavour": f, **m, "B": 2, "T": 32} for f in ("gpt2", "bert")]
    if device == "cpu":
        m = dict(dim=256, n_layers=2, n_heads=4, vocab=8192) if size_set == "quick" else \
            dict(dim=512, n_layers=6, n_heads=8, vocab=32000)
        bt = dict(B=4, T=128) if size_set == "quick" else dict(B=4, T=256)
        return [{"flavour": f, **m, **bt} for f in ("gpt2", "bert")]
    # CUDA: gpt2-small and bert-base
    scale = 1 if size_set == "quick" else 2
    return [{"flavour": "gpt2", "dim": 768, "n_layers": 12, "n_heads": 12, "vocab": 50257,
             "B": 8 * scale, "T": 1024},
            {"flavour": "bert", "dim": 768, "n_layers": 12, "n_heads": 12, "vocab": 30522,
             "B": 16 * scale, "T": 512}]


def _config(shape: dict, backend: str):
    from llmcore.models import config as mc

    make = {"gpt2": mc.gpt2, "bert": mc.bert}[shape["flavour"]]
    return make(dim=shape["dim"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                vocab_size=shape["vocab"], max_seq_len=max(shape["T"], 128), backend=backend)


def peak_flops(device: str, dtype: str) -> float | None:
    if device != "cuda" or dtype not in ("bfloat16", "float16"):
        return None
    name = torch.cuda.get_device_properties(0).name
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class TrainStepBench(OpBench):
    name = "train_step"
    families = ("norm", "cross_entropy", "attention")
    providers = ("torch", "torch_compile", "llmcore_auto", "llmcore_triton", "llmcore_native", "hf")
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

    def _model(self, provider: str, shape: dict, device: str) -> torch.nn.Module:
        from llmcore.models import Transformer

        backend = LLMCORE_BACKEND.get(provider, "torch")
        torch.manual_seed(0)
        model = Transformer(_config(shape, backend))
        if provider == "hf":
            from llmcore.models import to_hf

            model = to_hf(model)
        model = model.to(device).train()
        return torch.compile(model) if provider == "torch_compile" else model

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        b, t, v = shape["B"], shape["T"], shape["vocab"]
        ids = rnd.integers(v, b, t, low=1)                  # 0 is bert's padding id
        if shape["flavour"] == "gpt2":
            labels = ids                                     # the model shifts them
        else:
            # bert MLM: 15% of positions are targets, the rest ignored
            masked = rnd.integers(100, b, t) < 15
            labels = torch.where(masked, ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "labels": labels}

    def runner(self, provider, shape, dtype, device, mode, n_sets):
        if mode != "step":
            raise ValueError(f"train_step has only mode 'step', got {mode!r}")
        model = self._model(provider, shape, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        inp = self.inputs(shape, dtype, device, 0)
        autocast = (torch.autocast("cuda", dtype=dtype)
                    if device == "cuda" and dtype != torch.float32 else contextlib.nullcontext())
        if device == "cpu" and dtype != torch.float32:
            raise ValueError("train_step on the CPU runs in float32 only (no CPU autocast here)")

        def call():
            with autocast:
                loss = model(input_ids=inp["input_ids"], labels=inp["labels"]).loss
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
            flops = Transformer(_config(shape, "torch")).estimate_flops_per_token(shape["T"])
        peak = peak_flops(device, dtype)
        tokens_per_s = shape["B"] * shape["T"] / (ms * 1e-3)
        backend = LLMCORE_BACKEND.get(provider, "torch")
        return {"flops_per_token": flops,
                "mfu": tokens_per_s * flops / peak if peak else None,
                "backends": None if provider == "hf" else
                {f: backends.resolve(f, backend, device) for f in self.families}}


BENCHES = {"train_step": TrainStepBench()}
