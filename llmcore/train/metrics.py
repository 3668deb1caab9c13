"""Run logging: metrics.jsonl, a tqdm progress bar, TensorBoard when installed, loss.png and
summary.json at the end, and MFU on GPUs.

metrics.jsonl holds one JSON object per event: {"event": "train", "step", "loss", "lr",
"tokens", "tokens_per_s", ...} or {"event": "eval", "step", "eval_loss", ...}. Only the main
process writes; the others get a logger whose methods do nothing. Messages for the user go
through the progress bar, or the "llmcore.train" logger when there is none.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

_log = logging.getLogger("llmcore.train")

# Dense bf16 tensor-core peak, FLOP/s, per GPU name fragment (vendor datasheets).
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, when it is a GPU we know; None otherwise (MFU then unreported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


class MetricsLogger:
    def __init__(self, out: Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True):
        self.out = Path(out)
        self.enabled = enabled
        self.history: list[dict] = []
        self._bar = None
        self._tb = None
        if not enabled:
            return
        self.path = self.out / "metrics.jsonl"
        self._truncate_after(start_step)
        self.history = self._read()
        self._f = open(self.path, "a", encoding="utf-8")
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, leave=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:       # tensorboard is optional
            self._tb = None

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def _truncate_after(self, step: int) -> None:
        """On resume, drop events logged after the checkpoint, so the log reads as if the run
        had never stopped."""
        if not self.path.is_file():
            return
        kept = [e for e in self._read() if e.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")

    def log(self, event: dict) -> None:
        if not self.enabled:
            return
        self.history.append(event)
        self._f.write(json.dumps(event) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in event.items():
                if k not in ("step", "event") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{event['event']}/{k}", v, event["step"])

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def write(self, message: str) -> None:
        """A line for the user that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            _log.info(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
        self._f.close()

    def plot(self) -> Path | None:
        """OUT/loss.png: train loss and eval loss against step (matplotlib, Agg backend)."""
        if not self.enabled:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = [(e["step"], e["loss"]) for e in self.history if e.get("event") == "train"]
        evals = [(e["step"], e["eval_loss"]) for e in self.history
                 if e.get("event") == "eval" and "eval_loss" in e]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def write_summary(out: Path, summary: dict) -> Path:
    path = Path(out) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
