"""Checkpoints: atomic layout, manifest checks, retention, fallback past broken ones."""
import json
import os

import pytest
import torch

from llmcore.train import checkpoint as C
from train_helpers import TinyModel


def _save(root, step, model, keep=2):
    return C.save_checkpoint(root, step, model=model, trainer_state={"step": step},
                             config={"seed": 0}, keep_last=keep)


def test_layout_manifest_and_load(tmp_path):
    m = TinyModel()
    d = _save(tmp_path, 5, m)
    assert d.name == "step-00000005"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["step"] == 5
    assert set(manifest["files"]) == {"model.safetensors", "trainer.pt", "config.json"}
    for name, meta in manifest["files"].items():
        assert (d / name).stat().st_size == meta["bytes"] and len(meta["sha256"]) == 64
    assert C.verify(d) is None
    m2 = TinyModel()
    state = C.load_checkpoint(d, m2)
    assert state == {"step": 5}
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_tied_weights_are_saved(tmp_path):
    m = TinyModel(task="mlm")
    m.out.weight = m.tok_emb.weight
    d = _save(tmp_path, 1, m)
    m2 = TinyModel(task="mlm")
    m2.out.weight = m2.tok_emb.weight
    C.load_checkpoint(d, m2)
    assert torch.equal(m2.out.weight, m.tok_emb.weight)


def test_keep_last(tmp_path):
    m = TinyModel()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, m, keep=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [4, 3]


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing_file", "no_manifest"])
def test_broken_newest_falls_back_with_warning(tmp_path, damage):
    m = TinyModel()
    _save(tmp_path, 1, m, keep=5)
    newest = _save(tmp_path, 2, m, keep=5)
    target = newest / "model.safetensors"
    if damage == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "missing_file":
        os.remove(newest / "trainer.pt")
    else:
        os.remove(newest / "manifest.json")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000002"):
        found = C.latest_complete(tmp_path)
    assert found is not None and found.name == "step-00000001"


def test_nothing_usable(tmp_path):
    assert C.latest_complete(tmp_path / "none") is None
    (tmp_path / "step-00000003").mkdir()             # a crash before the manifest
    with pytest.warns(UserWarning, match="no manifest"):
        assert C.latest_complete(tmp_path) is None


def test_unwritable_root_raises_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(C.CheckpointError, match="could not write checkpoint"):
        _save(blocker / "ckpts", 1, TinyModel())
