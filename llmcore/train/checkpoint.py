"""Atomic checkpoints with a manifest, retention, and resume from the newest complete one.

Layout: `OUT/checkpoints/step-00000042/` holding
    model.safetensors    the model's state_dict
    trainer.pt           optimizer, scheduler, RNG states, data position, counters
    config.json          the TrainConfig of the run
    manifest.json        written last: step, and per file its size and sha256

Writing goes to a hidden temporary directory next to the final one; every file is fsynced, the
manifest written last, then the directory is renamed into place and its parent fsynced. A crash
at any moment leaves either the previous newest checkpoint or the new complete one. Loading
verifies sizes and checksums against the manifest; a checkpoint that fails is skipped with a
warning and the previous one is tried.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one could not be written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    """A state_dict safetensors can store: contiguous CPU tensors, shared storage cloned.
    `model`: a module, or a state dict already gathered from an FSDP model."""
    out, seen = {}, {}
    state = model if isinstance(model, dict) else model.state_dict()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[k] = t.clone() if ptr in seen else t
        seen[ptr] = k
    return out


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write (a full disk, a lost permission) raises on the way out: OSError from
    plain writes and fsync, RuntimeError from torch.save ("PytorchStreamWriter failed writing
    file ..."), SafetensorError from safetensors ("IoError(... StorageFull ...)")."""
    from safetensors import SafetensorError
    return (OSError, RuntimeError, SafetensorError)


def error_reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def save_checkpoint(root: str | os.PathLike, step: int, *, model: torch.nn.Module | dict,
                    trainer_state: dict, config: dict, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically under `root` (OUT/checkpoints) and delete all but the
    newest `keep_last` complete checkpoints. Returns the checkpoint's directory. `model`: the
    module, or its full state dict (gathered from an FSDP model)."""
    from safetensors.torch import save_file

    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync_path(f)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        manifest = tmp / MANIFEST
        with open(manifest, "w") as fh:
            json.dump({"step": step, "files": files}, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_path(tmp)
        if final.exists():                   # an older checkpoint of the same step (a rerun)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
    except write_errors() as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {error_reason(exc)}") from exc
    prune(root, keep_last)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint directory under `root`, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found, reverse=True)


def verify(ckpt: Path) -> str | None:
    """None when `ckpt` is complete and intact, else why not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (the write did not finish)"
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for name in ("model.safetensors", "trainer.pt", "config.json"):
        if name not in files:
            return f"manifest lacks {name}"
    for name, meta in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} fails its sha256 checksum"
    return None


def latest_complete(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported with a warning."""
    for _, ckpt in list_checkpoints(root):
        reason = verify(ckpt)
        if reason is None:
            return ckpt
        warnings.warn(f"skipping checkpoint {ckpt}: {reason}; trying the previous one",
                      stacklevel=2)
    return None


def load_checkpoint(ckpt: Path, model: torch.nn.Module, *, load_state=None) -> dict:
    """Load the model weights into `model` and return the trainer state. `load_state(state)`
    replaces `model.load_state_dict(state)` (FSDP: each rank keeps its shard of the full
    state)."""
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    (load_state or model.load_state_dict)(state)
    return torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temp dirs. An
    incomplete directory newer than the kept ones is left for inspection."""
    root = Path(root)
    complete = [d for _, d in list_checkpoints(root) if (d / MANIFEST).is_file()]
    for d in complete[keep_last:]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-step-*"):
        if not d.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(d, ignore_errors=True)
