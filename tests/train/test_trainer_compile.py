"""`compile=True` (`llmcore pretrain --compile`) trains through llmcore.models.compile_model, the
same function the train-step benchmark's llmcore_compile provider uses."""
from __future__ import annotations

import torch

from llmcore.models import Transformer, tiny_gpt
from llmcore.models import compile as compile_module
from llmcore.train import Trainer, trainer
from llmcore.train.config import TrainConfig
from train_helpers import RandomLMSource


def test_compile_goes_through_compile_model(tmp_path, monkeypatch):
    calls = []

    def spy(model, **kw):
        # aot_eager: the same tracing as inductor, no C++ to build
        compiled = compile_module.compile_model(model, backend="aot_eager", **kw)
        calls.append((model, compiled))
        return compiled

    monkeypatch.setattr(trainer, "compile_model", spy)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(tiny_gpt(vocab_size=23, dim=16, n_layers=1, n_heads=2))
    cfg = TrainConfig(task="clm", compile=True, max_steps=3, batch_size=4, lr=1e-2,
                      warmup_steps=1, eval_every=0, log_every=1, save_every=0, progress=False,
                      out=str(tmp_path / "run"))
    t = Trainer(model, cfg, train_data=RandomLMSource(), eval_data=RandomLMSource())
    summary = t.train()
    torch._dynamo.reset()
    assert [m for m, _ in calls] == [model]
    compiled = calls[0][1]
    assert t.engine is compiled or t.engine.module is compiled   # DDP wraps it when distributed
    assert compiled.fullgraph                   # a gpt2 training forward is one graph
    assert summary["steps"] == 3
