"""`--fsdp` (FSDP2) on the CPU with gloo: 2 processes give the same losses and weights as 1
process for the same global batch and seed, through a checkpoint and resume, and an FSDP
checkpoint resumes in a plain single process.

Three torchrun launches run this file as a worker (`_worker` below) on 2 ranks:
  1. `llmcore pretrain --fsdp` (the real Transformer: one shard group per block) for 3 steps,
     with 2 micro-batches per rank (gradient sync on the last one only);
  2. `--resume` of that run to 6 steps (every rank loads the gathered checkpoint);
  3. the Trainer on a tiny MLM stand-in with 1-row micro-batches, some without any target
     (the zero-loss forward every rank must still run), and an eval set of 13 rows (slices of
     6 and 7 rows: the lock-step evaluation).
The test runs the same three in this process without FSDP and compares them step by step.
"""
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

WORDS = ("alpha beta gamma delta return value file object stream open close read write "
         "socket thread lock queue path string bytes").split()
PRETRAIN = ["pretrain", "--seq-len", "32", "--vocab-size", "300", "--deterministic",
            "--grad-accum", "2", "--schedule", "constant", "--warmup-steps", "0",
            "--eval-every", "3", "--log-every", "1", "--batch-size", "4", "--lr", "3e-3",
            "--set", "model.dim=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
            "--set", "eval_batches=2", "--no-progress"]


def _pretrain(main, corpus: Path, out: Path, *extra: str) -> None:
    """3 steps (constant lr: with the resume to 6 below, the same as 6 steps in one go)."""
    assert main([*PRETRAIN, "--data", str(corpus), "--max-steps", "3", "--out", str(out),
                 *extra]) == 0


def _resume(main, out: Path) -> None:
    assert main(["pretrain", "--out", str(out), "--resume", "--set", "max_steps=6"]) == 0


@dataclass
class _Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


# FSDP2 hooks the backward of the root through the tensors of its forward's output, so they
# must be in a pytree (the stand-in's SimpleNamespace is not one; TransformerOutput is)
torch.export.register_dataclass(_Output)


def _tiny_mlm(out: Path, fsdp: bool) -> None:
    from llmcore.train import Trainer
    from llmcore.train.config import TrainConfig
    from train_helpers import RandomLMSource, TinyModel

    class Tiny(TinyModel):
        def forward(self, *args, **kw):
            o = super().forward(*args, **kw)
            return _Output(loss=o.loss, logits=o.logits)

    torch.manual_seed(0)
    cfg = TrainConfig(task="mlm", max_steps=5, batch_size=8, grad_accum=4, lr=1e-2,
                      warmup_steps=1, eval_every=2, log_every=1, progress=False,
                      out=str(out), deterministic=True, fsdp=fsdp)
    Trainer(Tiny(task="mlm"), cfg, train_data=RandomLMSource(task="mlm"),
            eval_data=RandomLMSource(n=13, seed=1, task="mlm")).train()
    if torch.distributed.is_initialized():      # the Trainer joined the group; leave it,
        torch.distributed.barrier()             # every rank done first (llmcore.train.run)
        torch.distributed.destroy_process_group()


def _worker(phase: str, corpus: str, out: str) -> None:
    """One torchrun launch per phase: a process group is not joined twice in one process."""
    from llmcore.cli import main

    torch.set_num_threads(1)
    if phase == "start":
        _pretrain(main, Path(corpus), Path(out) / "clm", "--fsdp")
    elif phase == "resume":
        _resume(main, Path(out) / "clm")
    else:
        _tiny_mlm(Path(out) / "mlm", fsdp=True)


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(50)) + "." for _ in range(300)]
    p = tmp_path / "docs.txt"
    p.write_text("\n\n\n".join(docs))
    return p


def _events(run: Path) -> list[tuple]:
    return [(e["event"], e["step"], e.get("loss", e.get("eval_loss")))
            for e in map(json.loads, (run / "metrics.jsonl").open())]


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def _assert_same_run(one: Path, two: Path) -> None:
    e1, e2 = _events(one), _events(two)
    assert [e[:2] for e in e1] == [e[:2] for e in e2]
    for (kind, step, a), (_, _, b) in zip(e1, e2):
        assert a == pytest.approx(b, rel=1e-4), (kind, step)
    w1, w2 = _final_weights(one), _final_weights(two)
    assert sorted(w1) == sorted(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume(tmp_path, corpus, monkeypatch):
    from llmcore.cli import main

    monkeypatch.setenv("LLMCORE_BACKEND", "torch")
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMCORE_BACKEND": "torch"}
    for phase in ("start", "resume", "mlm"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", "2", __file__, phase, str(corpus), str(two)],
                           env=env, capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).parent)
        assert r.returncode == 0, (phase, r.stderr[-3000:])
    s2 = json.loads((two / "clm" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["steps"] == 6
    ckpt = json.loads((two / "clm" / "checkpoints" / "step-00000006" / "config.json")
                      .read_text())
    assert ckpt["fsdp"] is True

    # an FSDP checkpoint (name-keyed optimizer state) resumes without FSDP in one process
    plain = tmp_path / "plain"
    shutil.copytree(two / "clm", plain, ignore=shutil.ignore_patterns("step-00000006"))
    with open(plain / "metrics.jsonl") as f:
        kept = [line for line in f if json.loads(line)["step"] <= 3]
    (plain / "metrics.jsonl").write_text("".join(kept))
    assert main(["pretrain", "--out", str(plain), "--resume"]) == 0

    _pretrain(main, corpus, one / "clm")
    _resume(main, one / "clm")
    _tiny_mlm(one / "mlm", fsdp=False)
    _assert_same_run(one / "clm", two / "clm")
    _assert_same_run(one / "clm", plain)
    _assert_same_run(one / "mlm", two / "mlm")


def test_fsdp_rejects_fp16_and_fgm():
    from llmcore.train.config import TrainConfig

    with pytest.raises(ValueError, match="fsdp supports precision fp32 or bf16"):
        TrainConfig(fsdp=True, precision="fp16")
    with pytest.raises(ValueError, match="not supported with fsdp"):
        TrainConfig(fsdp=True, adversarial="fgm")


if __name__ == "__main__":     # the torchrun worker: python test_fsdp.py PHASE CORPUS OUT
    _worker(*sys.argv[1:])
