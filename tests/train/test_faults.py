"""Faults in training (issue 9): damaged checkpoints on resume, injected non-finite losses, the
disk filling up while a checkpoint or the final model is written, and bad data lines.

Covered elsewhere, not repeated here: kill -9 then --resume bit-identical
(test_cli.py::test_kill_9_then_resume_is_bit_identical), each kind of damage seen by
`latest_complete` (test_checkpoint.py), NaN skip + stop after K in a row on the Trainer
(test_trainer.py), an unwritable --out, an existing run without --resume/--overwrite, a malformed
JSONL line and an unseen label at `llmcore evaluate` (test_cli.py::test_user_errors_are_one_line,
test_finetune_from_pretrain_and_scratch).
"""
import errno
import json
import logging
import math
import os
import random

import pytest
import torch

from llmcore.cli import main
from llmcore.data import collate
from llmcore.data.collate import DataError
from llmcore.train import CheckpointError, Trainer, TrainingError
from llmcore.train import checkpoint as C
from llmcore.train.config import TrainConfig
from train_helpers import RandomLMSource, TinyModel, poison_loss

def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _cfg(out, **kw):
    base = dict(task="clm", max_steps=8, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=0,
                log_every=1, save_every=2, keep_last=3, progress=False, out=str(out),
                deterministic=True)
    return TrainConfig(**{**base, **kw})


def _trainer(out, callbacks=(), resume=False, **kw):
    torch.manual_seed(0)
    model = TinyModel(dropout=0.1)                     # dropout: RNG state must resume exactly
    return Trainer(model, _cfg(out, **kw), train_data=RandomLMSource(), callbacks=callbacks,
                   resume=resume)


def _same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _events(run):
    return [(e["step"], e.get("loss")) for e in map(json.loads, (run / "metrics.jsonl").open())]


class _Crash(Exception):
    pass


def _crash_at(step):
    def cb(tr):
        if tr.step == step:
            raise _Crash
    return cb


def _damage(ckpt, how):
    target = ckpt / "model.safetensors"
    if how == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 3])
    elif how == "wrong_checksum":                      # same size, one byte changed
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif how == "missing_file":
        os.remove(ckpt / "trainer.pt")
    else:
        raise AssertionError(how)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted 8-step run every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("full") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)                  # as every test here runs (conftest): same sums
    try:
        t = _trainer(out)
        t.train()
    finally:
        torch.set_num_threads(n)
    return t, out


# ----------------------------------------------------------------------------- damaged checkpoints

@pytest.mark.parametrize("how", ["truncated", "wrong_checksum", "missing_file"])
def test_resume_skips_damaged_newest_checkpoint(tmp_path, full_run, how):
    """Crash after the step-4 checkpoint, damage it: resume warns, loads step 2, and still ends
    bit-identical (weights and logged losses) to the uninterrupted run."""
    out = tmp_path / "cut"
    with pytest.raises(_Crash):
        _trainer(out, callbacks=[_crash_at(5)]).train()
    assert [s for s, _ in C.list_checkpoints(out / "checkpoints")] == [4, 2]
    _damage(out / "checkpoints" / "step-00000004", how)
    resumed = _trainer(out, resume=True)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000004"):
        resumed.train()
    full, full_out = full_run
    _same_weights(full, resumed)
    assert _events(full_out) == _events(out)
    assert C.verify(out / "checkpoints" / "step-00000008") is None


def test_resume_with_every_checkpoint_damaged_stops_clearly(tmp_path):
    """No intact checkpoint left: resume refuses to silently start over from step 0."""
    out = tmp_path / "cut"
    with pytest.raises(_Crash):
        _trainer(out, callbacks=[_crash_at(5)]).train()
    for _, ckpt in C.list_checkpoints(out / "checkpoints"):
        _damage(ckpt, "wrong_checksum")
    before = (out / "metrics.jsonl").read_text()
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        with pytest.raises(TrainingError, match=r"no intact checkpoint .* 2 checkpoint"):
            _trainer(out, resume=True).train()
    assert (out / "metrics.jsonl").read_text() == before          # nothing overwritten
    assert not (out / "final").exists()


def test_resume_before_any_checkpoint_starts_from_zero(tmp_path, full_run):
    """Killed before the first checkpoint: nothing to load, so the run starts over (and still
    matches the uninterrupted run)."""
    out = tmp_path / "cut"
    with pytest.raises(_Crash):
        _trainer(out, callbacks=[_crash_at(1)]).train()
    assert C.list_checkpoints(out / "checkpoints") == []
    resumed = _trainer(out, resume=True)
    resumed.train()
    _same_weights(full_run[0], resumed)


# ----------------------------------------------------------------------------- non-finite loss

def test_nonfinite_counter_resets_after_a_finite_step(tmp_path, caplog):
    """K-1 NaNs, a finite step, K-1 NaNs: never K in a row, so the run finishes with every
    skip counted, finite weights, and the skips in the log and summary."""
    caplog.set_level(logging.INFO, logger="llmcore.train")
    t = _trainer(tmp_path / "r", max_steps=4, save_every=0, max_nonfinite=3)
    poison_loss(t.model, {2, 3, 5, 6})
    s = t.train()
    assert s["steps"] == 4 and s["skipped_steps"] == 4
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert "step 1: non-finite loss, update skipped (2 in a row)" in caplog.text
    assert "step 2: non-finite loss, update skipped (2 in a row)" in caplog.text
    losses = [loss for _, loss in _events(tmp_path / "r")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_nonfinite_stop_keeps_last_checkpoint_resumable(tmp_path):
    """K NaNs in a row after a checkpoint: a clear stop naming the step, and the checkpoint
    before the NaNs still verifies and loads."""
    t = _trainer(tmp_path / "r", max_nonfinite=2)
    poison_loss(t.model, set(range(4, 100)))               # steps 1-3 fine, then only NaN
    with pytest.raises(TrainingError, match=r"not finite for 2 steps in a row \(at step 3\)"):
        t.train()
    found = C.latest_complete(tmp_path / "r" / "checkpoints")
    assert found is not None and found.name == "step-00000002"
    assert C.load_checkpoint(found, TinyModel())["step"] == 2


# ----------------------------------------------------------------------------- disk full

def _disk_full(monkeypatch, where, full):
    """From the moment full["on"] is set, the write path `where` fails as a full disk makes it
    fail: the file is left half-written and the library's own exception type is raised."""
    if where == "safetensors":
        import safetensors.torch as st
        from safetensors import SafetensorError
        real = st.save_file

        def save_file(tensors, filename, metadata=None):
            if not full["on"]:
                return real(tensors, filename, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                  "StorageFull, message: \"No space left on device\" })")
        monkeypatch.setattr(st, "save_file", save_file)
    elif where == "torch.save":
        real = torch.save

        def save(obj, f, *a, **k):
            if not full["on"]:
                return real(obj, f, *a, **k)
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
                               "failed writing file data/0: file write failed")
        monkeypatch.setattr(torch, "save", save)
    elif where == "fsync":
        real = os.fsync

        def fsync(fd):
            if full["on"]:
                raise _enospc()
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        raise AssertionError(where)


def _fill_disk_at(step, full):
    def cb(tr):
        if tr.step == step:
            full["on"] = True
    return cb


@pytest.mark.parametrize("where", ["safetensors", "torch.save", "fsync"])
def test_disk_full_while_saving_checkpoint(tmp_path, monkeypatch, full_run, where):
    """The step-4 checkpoint hits a full disk: a CheckpointError naming it, no temporary or
    half-written directory left, step 2 still the newest and intact; after space is freed,
    --resume from step 2 ends bit-identical to the uninterrupted run."""
    full = {"on": False}
    _disk_full(monkeypatch, where, full)
    out = tmp_path / "r"
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000004"):
        _trainer(out, callbacks=[_fill_disk_at(3, full)]).train()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert C.latest_complete(root).name == "step-00000002"
    full["on"] = False
    resumed = _trainer(out, resume=True)
    resumed.train()
    _same_weights(full_run[0], resumed)
    assert _events(full_run[1]) == _events(out)


def test_disk_full_while_saving_final_model(tmp_path, monkeypatch):
    """The final model hits a full disk: a clear error, no final/ or temporary directory, and
    the last checkpoint (written before) intact."""
    full = {"on": False}
    _disk_full(monkeypatch, "safetensors", full)
    out = tmp_path / "r"
    t = _trainer(out, max_steps=4, callbacks=[_fill_disk_at(4, full)])
    with pytest.raises(CheckpointError, match=r"could not write .*final"):
        t.train()
    assert not (out / "final").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert C.latest_complete(out / "checkpoints").name == "step-00000004"


# ----------------------------------------------------------------------------- the CLI

WORDS = ("alpha beta gamma delta return value file object stream open close read write "
         "socket thread lock queue path string bytes").split()
TINY = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--set", "eval_batches=1", "--set", "eval_fraction=0.2", "--no-progress",
        "--batch-size", "4", "--lr", "3e-3", "--seq-len", "16", "--vocab-size", "300",
        "--eval-every", "0"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("docs") / "docs.txt"
    p.write_text("\n\n\n".join(" ".join(rng.choice(WORDS) for _ in range(50)) + "."
                               for _ in range(60)))
    return p


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_cli_disk_full_then_resume(tmp_path, monkeypatch, capsys, caplog, docs):
    """`llmcore pretrain` with the disk filling up at the second checkpoint: one line naming the
    checkpoint and the cause, the first checkpoint intact; `--resume` then finishes."""
    monkeypatch.setenv("LLMCORE_BACKEND", "torch")
    real = os.fsync

    def fsync(fd):                                  # only the step-4 checkpoint's files fail
        if "step-00000004" in os.readlink(f"/proc/self/fd/{fd}"):
            raise _enospc()
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(docs), "--out", str(out), "--max-steps", "4",
            "--save-every", "2", *TINY]
    err = _one_line_error(capsys, args)
    assert "could not write checkpoint" in err and "No space left on device" in err, err
    assert [s for s, _ in C.list_checkpoints(out / "checkpoints")] == [2]
    assert C.verify(out / "checkpoints" / "step-00000002") is None
    monkeypatch.setattr(os, "fsync", real)
    caplog.set_level(logging.INFO, logger="llmcore.train")
    assert main(["pretrain", "--out", str(out), "--resume"]) == 0
    assert "resumed from step 2" in caplog.text
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_cli_nonfinite_loss_stops_with_one_line(tmp_path, monkeypatch, capsys, docs):
    monkeypatch.setenv("LLMCORE_BACKEND", "torch")
    real = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, b: real(self, b) * float("nan"))
    err = _one_line_error(capsys, ["pretrain", "--data", str(docs), "--out",
                                   str(tmp_path / "run"), "--max-steps", "4",
                                   "--set", "max_nonfinite=2", *TINY])
    assert "not finite for 2 steps in a row" in err


def test_cli_resume_with_all_checkpoints_damaged(tmp_path, monkeypatch, capsys, docs):
    monkeypatch.setenv("LLMCORE_BACKEND", "torch")
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(docs), "--out", str(out), "--max-steps", "2",
                 "--save-every", "2", *TINY]) == 0
    _damage(out / "checkpoints" / "step-00000002", "truncated")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        err = _one_line_error(capsys, ["pretrain", "--out", str(out), "--resume"])
    assert "no intact checkpoint" in err


# ----------------------------------------------------------------------------- bad data lines

def test_malformed_csv_and_jsonl_lines_name_file_and_line(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nopen the file,io\nlock,the,queue,concurrency\n")
    with pytest.raises(DataError, match=r"d\.csv:3: more fields than the header"):
        collate.load_classification(csv)
    csv.write_text("text,kind\nopen the file,io\n")
    with pytest.raises(DataError, match=r"d\.csv:2: missing field 'label'"):
        collate.load_classification(csv)
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": "x"}\n\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: expected a JSON object"):
        collate.load_classification(jl)
    jl.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": [1]}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'label' must be"):
        collate.load_classification(jl)
    tags = tmp_path / "t.jsonl"
    tags.write_text('{"tokens": ["a", "b"], "tags": ["O", "O"]}\n'
                    '{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: 2 tokens but 1 tags"):
        collate.load_token_classification(tags)


def test_unseen_labels_reported_with_file_and_line(tmp_path):
    """Evaluation data with a label (or tag) the training data never had: a DataError naming
    the file and line, not an index error inside the loss."""
    from llmcore.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["open the file", "lock the queue"] * 20, "bpe", 300)
    csv = tmp_path / "eval.csv"
    csv.write_text("text,label\nopen the file,io\nlock the queue,network\n")
    examples = collate.load_classification(csv)
    with pytest.raises(DataError, match=r"eval\.csv:3: label 'network' was not seen in training"):
        collate.encode_classification(examples, tok, {"io": 0, "concurrency": 1}, 16)
    tags = tmp_path / "eval.jsonl"
    tags.write_text('{"tokens": ["open", "file"], "tags": ["V", "N"]}\n'
                    '{"tokens": ["lock"], "tags": ["ADJ"]}\n')
    examples = collate.load_token_classification(tags)
    with pytest.raises(DataError, match=r"eval\.jsonl:2: label 'ADJ' was not seen"):
        collate.encode_token_classification(examples, tok, {"V": 0, "N": 1}, 16)
