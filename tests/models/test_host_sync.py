"""No host sync inside a training forward/backward of any flavour, padded batches and the MLM
gather included, when the caller gives the host-side counts (num_tokens, num_targets).

On the CPU a HostSyncLog (tests/llmcore_testing.py) records the ops that would make the host
wait on CUDA; on a GPU, torch.cuda.set_sync_debug_mode("error") turns any sync into an error."""
import pytest
import torch

from llmcore_testing import HostSyncLog, kernel_backends
from llmcore.models import Transformer, preset
from llmcore.train.data import count_hints

V = 61
NAMES = ["tiny-bert", "tiny-gpt", "tiny-llama"]


def _model(name, backend, device="cpu"):
    extra = {"n_kv_heads": 1} if name == "tiny-llama" else {}
    torch.manual_seed(0)
    return Transformer(preset(name, vocab_size=V, dim=32, n_layers=2, n_heads=2, ffn_dim=48,
                              backend=backend, **extra)).to(device).train()


def _batch(name, device="cpu"):
    """A padded batch (rows of 11, 5 and 8 real tokens; one left-padded) built on the host, and
    its count hints."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if name == "tiny-bert":
        labels = labels.masked_fill(torch.rand(3, 11, generator=g) < 0.6, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    hints = count_hints("mlm" if name == "tiny-bert" else "clm", batch)
    return {k: v.to(device) for k, v in batch.items()}, hints


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", *[b for b in kernel_backends("attention")
                                                if b == "native"]])
@pytest.mark.parametrize("name", NAMES)
def test_training_step_has_no_host_sync_given_the_counts(name, backend):
    model = _model(name, backend)
    batch, hints = _batch(name)
    assert hints["num_tokens"] == 24 and ("num_targets" in hints) == (name == "tiny-bert")
    with HostSyncLog() as log:
        loss = model(**batch, **hints).loss
        loss.backward()
    assert log.syncs == []
    with_counts = (loss.detach(), _grads(model))

    # without the counts the model finds the positions itself: nonzero, a sync on CUDA (this
    # is what the log catches), and the very same loss and gradients
    model.zero_grad(set_to_none=True)
    with HostSyncLog() as log:
        loss = model(**batch).loss
        loss.backward()
    assert log.syncs.count("nonzero") == (2 if name == "tiny-bert" else 1)
    assert torch.equal(loss.detach(), with_counts[0])
    grads = _grads(model)
    assert grads.keys() == with_counts[1].keys()
    for n, g in grads.items():
        assert torch.equal(g, with_counts[1][n]), n


def test_triton_training_step_has_no_host_sync_given_the_counts():
    if "triton" not in kernel_backends("attention"):
        pytest.skip("Triton is not installed")
    model = _model("tiny-bert", "triton")
    batch, hints = _batch("tiny-bert")
    with HostSyncLog() as log:
        model(**batch, **hints).loss.backward()
    assert log.syncs == []


def test_host_sync_log_catches_what_syncs_on_cuda():
    x = torch.tensor([0.0, 1.0, 2.0])
    with HostSyncLog() as log:
        x.sum().item()
        bool(x[0] > 0)
        x.nonzero()
        x[x > 0]
        torch.equal(x, x)
        x.repeat_interleave(torch.tensor([1, 2, 0]))
        x.cumsum(0)[torch.tensor([0, 2])]                 # integer indexing: no sync
        torch._assert_async(x.sum() > 0, "fine")          # checked on the device
    assert log.syncs == ["_local_scalar_dense", "_local_scalar_dense", "nonzero",
                         "index with a bool mask", "equal", "repeat_interleave"]


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt"])
def test_wrong_counts_fail_naming_them(name):
    model = _model(name, "torch")
    batch, hints = _batch(name)
    with pytest.raises(RuntimeError, match=r"num_tokens=25 must equal the number of real "
                                           r"tokens in attention_mask"):
        model(**batch, num_tokens=hints["num_tokens"] + 1)
    if name == "tiny-bert":
        with pytest.raises(RuntimeError, match=r"num_targets=0 must equal the number of "
                                               r"labels != -100"):
            model(**batch, num_targets=0)


def test_bad_counts_are_refused_before_any_work():
    bert, gpt = _model("tiny-bert", "torch"), _model("tiny-gpt", "torch")
    batch, hints = _batch("tiny-bert")
    with pytest.raises(TypeError, match="num_tokens must be None or an int"):
        bert(**batch, num_tokens=torch.tensor(24))
    with pytest.raises(TypeError, match="num_targets must be None or an int"):
        bert(**batch, num_targets=True)
    with pytest.raises(ValueError, match="num_tokens must be >= 0, got -1"):
        bert(**batch, num_tokens=-1)
    with pytest.raises(ValueError, match="num_tokens counts the real tokens of attention_mask; "
                                         "it was given without an attention_mask"):
        bert(batch["input_ids"], num_tokens=33)
    with pytest.raises(ValueError, match="num_targets counts the masked-LM targets; this "
                                         "model's head is 'clm'"):
        gpt(**batch, num_targets=3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_training_step_never_syncs(name):
    model = _model(name, "auto", "cuda")
    batch, hints = _batch(name, "cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, **hints).loss
        loss.backward()
        return loss
    step()                      # warm-up, same dtypes: compiling and autotuning may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
