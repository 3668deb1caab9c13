"""AdamW parameter groups and the lr schedules."""
import math

import pytest
import torch

from llmcore.train.optim import lr_multiplier, param_groups
from train_helpers import TinyModel


def test_no_decay_on_norms_biases_embeddings():
    m = TinyModel()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(m.fc.weight), id(m.out.weight)}
    assert ids(no_decay["params"]) == {id(m.tok_emb.weight), id(m.norm.weight), id(m.norm.bias),
                                       id(m.fc.bias), id(m.out.bias)}


def test_tied_parameter_listed_once():
    m = TinyModel(task="mlm")
    m.out.weight = m.tok_emb.weight                    # tie decoder and embedding
    groups = param_groups(m, 0.1)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert id(m.tok_emb.weight) in {id(p) for p in groups[1]["params"]}


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules(schedule):
    f = lambda s: lr_multiplier(s, total=100, warmup=10, schedule=schedule,  # noqa: E731
                                min_ratio=0.1, decay_fraction=0.2)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)   # linear warmup
    assert f(10) == pytest.approx(1.0)
    end = {"constant": 1.0}.get(schedule, 0.1)
    assert f(100) == pytest.approx(end)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:])), "must not increase"
    if schedule == "cosine":
        assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    if schedule == "linear":
        assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    if schedule == "wsd":
        assert f(81) == pytest.approx(1.0) and f(91) < 1.0        # decay starts at 82


def test_lambda_scheduler_drives_adamw():
    from llmcore.train.config import TrainConfig
    from llmcore.train.optim import build_optimizer, build_scheduler
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, schedule="linear", min_lr_ratio=0.0)
    opt = build_optimizer(TinyModel(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])
