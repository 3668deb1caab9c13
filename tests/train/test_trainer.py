"""The Trainer on a tiny stand-in model: loss normalisation over micro-batches, the non-finite
policy, exact resume, evaluation metrics, early stopping, label smoothing, FGM."""
import functools
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmcore.train import Trainer, TrainingError
from llmcore.train.config import TrainConfig
from llmcore.train.trainer import classification_metrics
from train_helpers import RandomLMSource, TinyModel, poison_loss


def _cfg(tmp_path, **kw):
    base = dict(task="clm", max_steps=6, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=0,
                log_every=1, save_every=0, progress=False, out=str(tmp_path / "run"),
                deterministic=True)
    return TrainConfig(**{**base, **kw})


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _train(tmp_path, name, model_kw=None, src_kw=None, **kw):
    torch.manual_seed(0)
    model = TinyModel(**(model_kw or {}))
    cfg = _cfg(tmp_path, out=str(tmp_path / name), **kw)
    train = RandomLMSource(**(src_kw or {}))
    t = Trainer(model, cfg, train_data=train, eval_data=train)   # random data: memorise it
    return t, t.train()


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_grad_accumulation_matches_one_big_batch(tmp_path, task):
    """1 x 8 and 4 x 2 micro-batches give the same update: the loss is normalised by the
    global count of valid targets, which varies per micro-batch for MLM."""
    kw = dict(model_kw={"task": task}, src_kw={"task": task}, task=task)
    a, _ = _train(tmp_path, "a", grad_accum=1, **kw)
    b, _ = _train(tmp_path, "b", grad_accum=4, **kw)
    for (k, wa), wb in zip(_weights(a.model).items(), _weights(b.model).values()):
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6, msg=k)
    la = [e["loss"] for e in map(json.loads, (tmp_path / "a/metrics.jsonl").open())
          if e["event"] == "train"]
    lb = [e["loss"] for e in map(json.loads, (tmp_path / "b/metrics.jsonl").open())
          if e["event"] == "train"]
    assert la == pytest.approx(lb, rel=1e-5)


def test_loss_decreases_and_outputs_written(tmp_path):
    t, s = _train(tmp_path, "r", max_steps=30, eval_every=10, lr=3e-2)
    run = tmp_path / "r"
    for f in ("metrics.jsonl", "summary.json", "loss.png", "config.json",
              "final/train_config.json", "final/model.safetensors", "best/model.safetensors"):
        assert (run / f).is_file(), f
    for k in ("steps", "tokens", "wall_seconds", "final_train_loss", "eval_loss",
              "eval_perplexity", "device", "backends"):
        assert k in json.loads((run / "summary.json").read_text())
    assert s["steps"] == 30 and s["tokens"] == 30 * 8 * 9
    assert s["eval_loss"] < s["initial_eval_loss"] - 0.1
    assert s["eval_perplexity"] == pytest.approx(math.exp(s["eval_loss"]))
    events = [json.loads(x) for x in (run / "metrics.jsonl").open()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 10, 20, 30]


def test_nonfinite_loss_is_skipped_then_stops(tmp_path):
    torch.manual_seed(0)
    model = TinyModel()
    forward = model.forward
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = forward(*a, **k)
        calls["n"] += 1
        if calls["n"] in (2, 3):                  # steps 2 and 3 (1-based) see a NaN loss
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    t = Trainer(model, _cfg(tmp_path, max_steps=4), train_data=RandomLMSource())
    s = t.train()
    assert s["steps"] == 4 and s["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    # K in a row: a clear error
    model.forward = lambda *a, **k: type(forward(*a, **k))(
        loss=forward(*a, **k).loss * float("nan"), logits=None)
    t = Trainer(model, _cfg(tmp_path, out=str(tmp_path / "r2"), max_nonfinite=3),
                train_data=RandomLMSource())
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):
        t.train()


class _Crash(Exception):
    pass


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_resume_is_bit_identical(tmp_path, task):
    kw = dict(task=task, max_steps=8, save_every=3, eval_every=4)
    src = {"task": task}

    def make(out, callbacks=(), resume=False):
        torch.manual_seed(0)
        m = TinyModel(task=task, dropout=0.1)           # dropout: the RNG state must resume too
        cfg = _cfg(tmp_path, out=str(tmp_path / out), **kw)
        return Trainer(m, cfg, train_data=RandomLMSource(**src),
                       eval_data=RandomLMSource(n=16, seed=1, **src),
                       callbacks=callbacks, resume=resume)

    full = make("full")
    full.train()

    def crash(tr):
        if tr.step == 5:                                # after the step-3 checkpoint, before 6
            raise _Crash
    with pytest.raises(_Crash):
        make("cut", callbacks=[crash]).train()
    resumed = make("cut", resume=True)
    assert resumed._restore() == 3
    resumed = make("cut", resume=True)
    resumed.train()
    for (k, a), b in zip(_weights(full.model).items(), _weights(resumed.model).values()):
        assert torch.equal(a, b), k
    read = lambda d: [(e["step"], e.get("loss"), e.get("eval_loss"))  # noqa: E731
                      for e in map(json.loads, (tmp_path / d / "metrics.jsonl").open())]
    assert read("full") == read("cut")


def test_classification_eval_and_early_stopping(tmp_path, classify_source):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, task="classify", max_steps=200, eval_every=2, patience=2,
               batch_size=8, lr=1e-3)
    t = Trainer(TinyModel(task="classify"), cfg, train_data=classify_source,
                eval_data=classify_source, label_map={"a": 0, "b": 1, "c": 2})
    s = t.train()
    assert s["stopped_early"] and s["steps"] < 200
    assert 0.0 <= s["eval_accuracy"] <= 1.0 and "eval_macro_f1" in s
    assert s["eval_examples"] == 40


def test_classification_learns_with_label_smoothing_and_fgm(tmp_path, classify_source):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, task="classify", max_steps=60, batch_size=8, lr=2e-2, eval_every=0,
               label_smoothing=0.1, adversarial="fgm", adversarial_epsilon=0.01)
    t = Trainer(TinyModel(task="classify"), cfg, train_data=classify_source,
                eval_data=classify_source, label_map={"a": 0, "b": 1, "c": 2})
    s = t.train()
    assert s["eval_accuracy"] > 0.6


def test_classification_metrics():
    # true x predicted
    c = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    m = classification_metrics(c)
    assert m["eval_accuracy"] == pytest.approx(5 / 6)
    f1_0 = 2 * 3 / (2 * 3 + 0 + 1)
    f1_1 = 2 * 2 / (2 * 2 + 1 + 0)
    assert m["eval_macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)   # class 2 absent: skipped


def test_bad_batch_split(tmp_path):
    with pytest.raises(ValueError, match="batch_size \\(8\\) must be divisible"):
        Trainer(TinyModel(), _cfg(tmp_path, grad_accum=3), train_data=RandomLMSource())


# ----------------------------------------------------------------------------- host reads

class _HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: aten._local_scalar_dense (.item(), bool(),
    int(), float() of a tensor) and Tensor.tolist (which dispatches nothing, so is patched)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.n = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self.n += 1
            return tolist(t)
        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_no_host_read_between_log_steps(tmp_path, monkeypatch):
    # per step: the number of host reads since the previous step ended (callbacks run after
    # every step); only log steps (every 4th, and the last) may read
    reads = _HostReads(monkeypatch)
    per_step = {}

    def mark(trainer):
        per_step[trainer.step] = reads.n
        reads.n = 0

    torch.manual_seed(0)
    t = Trainer(TinyModel(), _cfg(tmp_path, max_steps=10, log_every=4), callbacks=[mark],
                train_data=RandomLMSource())
    with reads:
        s = t.train()
    assert s["steps"] == 10 and s["skipped_steps"] == 0
    assert sorted(per_step) == list(range(1, 11))
    quiet = {k: v for k, v in per_step.items() if k not in (4, 8, 10)}
    assert all(v == 0 for v in quiet.values()), per_step
    assert all(per_step[k] >= 1 for k in (4, 8, 10)), per_step
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [4, 8, 10]
    assert all(math.isfinite(e["loss"]) for e in train) and train[-1]["tokens"] == t.tokens


def test_nonfinite_between_log_steps_is_skipped_on_the_device(tmp_path):
    # steps 2 and 3 are NaN and not log steps: their updates are skipped on the device (the
    # weights stay finite), they count toward max_steps, and the next log step reads the skips
    torch.manual_seed(0)
    t = Trainer(poison_loss(TinyModel(), {2, 3}), _cfg(tmp_path, max_steps=8, log_every=4),
                train_data=RandomLMSource())
    s = t.train()
    assert s["steps"] == 8 and s["skipped_steps"] == 2 and t.nonfinite_in_row == 0
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    # a run of max_nonfinite between log steps stops the run at the next log step, naming the
    # step where the run reached it
    torch.manual_seed(0)
    t = Trainer(poison_loss(TinyModel(), set(range(2, 100))),
                _cfg(tmp_path, out=str(tmp_path / "r2"), max_steps=8, log_every=4,
                     max_nonfinite=2), train_data=RandomLMSource())
    with pytest.raises(TrainingError, match=r"not finite for 2 steps in a row \(at step 2\)"):
        t.train()


def test_label_smoothing_goes_through_the_fused_head_loss(tmp_path, monkeypatch):
    # an llmcore CLM model: the trainer's smoothed loss is the head's linear_cross_entropy
    # with label_smoothing, never F.cross_entropy over full logits
    import llmcore
    from llmcore.models import Transformer
    from llmcore.models.config import tiny_gpt

    torch.manual_seed(0)
    model = Transformer(tiny_gpt(vocab_size=23, backend="torch"))
    t = Trainer(model, _cfg(tmp_path, label_smoothing=0.1), train_data=RandomLMSource())
    batch = t._to_device(t.train_data.batch(list(range(4)), 0, list(range(4))))

    def refused(*a, **k):
        raise AssertionError("F.cross_entropy over full logits")
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", refused)
    got = t._loss(batch)
    h = model(batch["input_ids"]).last_hidden_state                  # (B, N, E)
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    want = llmcore.linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.decoder_weight(),
                                        labels.reshape(-1), label_smoothing=0.1,
                                        backend="torch")
    torch.testing.assert_close(got, want.float())


@pytest.mark.parametrize("task", ["mlm", "classify"])
def test_llmcore_model_trains_without_host_sync(tmp_path, task, classify_source):
    # the trainer gives an llmcore model the host-side counts of each batch (MLM targets; real
    # tokens of the padded classification batches), so a step that is not a log step never
    # makes the host wait: no value read, no nonzero (see tests/models/test_host_sync.py)
    from llmcore.models import Transformer, preset
    from llmcore_testing import HostSyncLog

    head = {} if task == "mlm" else {"head": "seq_cls", "num_labels": 3}
    torch.manual_seed(0)
    model = Transformer(preset("tiny-bert", vocab_size=23, dim=16, n_layers=1, n_heads=2,
                               ffn_dim=24, backend="torch", **head))
    data = RandomLMSource(task="mlm") if task == "mlm" else classify_source
    t = Trainer(model, _cfg(tmp_path, task=task, max_steps=4, log_every=4), train_data=data,
                label_map=None if task == "mlm" else {"a": 0, "b": 1, "c": 2})
    calls = []
    forward = model.forward

    @functools.wraps(forward)                       # the trainer reads forward's signature
    def spy(*args, **kwargs):
        calls.append(sorted(kwargs))
        return forward(*args, **kwargs)
    model.forward = spy
    with HostSyncLog() as log:
        t.train_step(read=False)
    assert log.syncs == []
    want = {"mlm": ["input_ids", "labels", "num_targets"],
            "classify": ["attention_mask", "input_ids", "labels", "num_tokens"]}[task]
    assert calls and all(c == want for c in calls), calls
    calls.clear()                                  # evaluation passes them too
    t.evaluate(data)
    assert calls and all(set(want) <= set(c) for c in calls), calls
