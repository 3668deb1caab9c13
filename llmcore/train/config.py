"""Training configuration: one typed dataclass, named preset functions, and overrides.

A run is fully described by a `TrainConfig`; it is saved as `OUT/config.json` and read back by
`--resume`, `evaluate` and `generate`. Presets are plain functions (`pretrain_clm()`); overrides
come from keyword arguments or `key=value` strings (the CLI's `--set`), converted to the field's
type, with a clear error for unknown keys or bad values.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("clm", "mlm", "classify", "tokens")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    # --- what to train
    task: str = "clm"                   # clm | mlm (pretraining), classify | tokens (fine-tuning)
    preset: str = "tiny-gpt"            # model preset name (llmcore.models.config.PRESETS)
    model: dict = field(default_factory=dict)   # TransformerConfig field overrides
    init: str | None = None             # fine-tuning: an llmcore run dir, or "hf:PATH"
    # --- data
    data: list = field(default_factory=list)        # files/dirs; empty: the embedded default
    eval_data: list = field(default_factory=list)   # empty: a hash split of the training data
    eval_fraction: float = 0.02
    tokenizer: str | None = None        # a tokenizer.json / HF dir to load instead of training
    vocab_size: int = 4096              # for a trained tokenizer
    seq_len: int = 128                  # block length (LM) / max length (fine-tuning)
    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    mlm_probability: float = 0.15
    whole_word: bool = False
    # --- optimisation
    max_steps: int = 600                # optimiser steps; with `epochs`, the smaller one wins
    epochs: float | None = None
    batch_size: int = 16                # global batch (sequences), over all processes
    grad_accum: int = 1                 # micro-batches per step on each process
    lr: float = 2e-3
    min_lr_ratio: float = 0.1           # floor of the decayed lr, as a fraction of lr
    warmup_steps: int = 30
    schedule: str = "cosine"
    decay_fraction: float = 0.2         # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0              # 0 disables clipping
    dropout: float | None = None        # overrides the model's dropout
    label_smoothing: float = 0.0
    adversarial: str | None = None      # None | "fgm"
    adversarial_epsilon: float = 1.0
    max_nonfinite: int = 5              # stop after this many non-finite steps in a row
    # --- evaluation, logging, checkpoints
    eval_every: int = 100               # steps; 0: only at the end
    eval_batches: int = 20              # LM eval batches (classification: the whole eval set)
    log_every: int = 10
    save_every: int = 0                 # steps; 0: only at the end
    keep_last: int = 2
    patience: int = 0                   # evals without improvement before stopping; 0: off
    # --- runtime
    out: str = "runs/run"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"             # bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False                  # under torchrun: FSDP2 (sharded) instead of DDP
    num_threads: int = 0                # CPU intra-op threads; 0: torch's default
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        need(self.schedule in SCHEDULES,
             f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.precision in PRECISIONS,
             f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        need(self.adversarial in (None, "fgm"),
             f"adversarial must be None or 'fgm', got {self.adversarial!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_batches",
                     "log_every", "keep_last", "max_nonfinite"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "patience", "num_threads"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"{name} must be an int >= 0, got {v!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0,
             f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0.0 < self.decay_fraction <= 1.0,
             f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        need(0.0 <= self.eval_fraction < 1.0,
             f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        need(0.0 <= self.label_smoothing < 1.0,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.dropout is None or 0.0 <= self.dropout < 1.0,
             f"dropout must be in [0, 1), got {self.dropout}")
        need(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(isinstance(self.model, dict), f"model must be a dict of overrides, got {self.model!r}")
        if self.fsdp:
            need(self.precision != "fp16", "fsdp supports precision fp32 or bf16, not fp16 "
                 "(its GradScaler does not handle sharded gradients)")
            need(self.adversarial is None, "adversarial training (fgm) is not supported with "
                 "fsdp: it perturbs the full embedding table, which fsdp shards")

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no training config at {str(path)!r}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **overrides) -> "TrainConfig":
        return apply_overrides(self, overrides)


_TYPES = typing.get_type_hints(TrainConfig)


def _convert(name: str, value, hint):
    """`value` (a string from the command line, or a Python value) as field `name`'s type."""
    if not isinstance(value, str):
        return value
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and value.lower() in ("none", "null", ""):
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    try:
        if base is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            return int(value)
        if base is float:
            return float(value)
        if base in (list, dict):
            out = json.loads(value) if value[:1] in "[{" else (
                value.split(",") if base is list else _kv_dict(value))
            if not isinstance(out, base):
                raise ValueError(value)
            return out
    except ValueError:
        kind = getattr(base, "__name__", base)
        raise ValueError(f"{name}: cannot read {value!r} as {kind}") from None
    return value


def _kv_dict(text: str) -> dict:
    """'dim=128,n_layers=4' -> {'dim': 128, 'n_layers': 4} (JSON values where they parse)."""
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise ValueError(item)
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def parse_overrides(items: list[str]) -> dict:
    """['lr=1e-3', 'model.dim=128'] -> {'lr': '1e-3', 'model': {'dim': 128}}."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key.startswith("model."):
            try:
                v = json.loads(value)
            except ValueError:
                v = value
            out.setdefault("model", {})[key[len("model."):]] = v
        else:
            out[key] = value
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """A copy of `cfg` with `overrides` (values or strings) applied and validated; the `model`
    dict is merged, not replaced."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(fields)}")
    new = {}
    for k, v in overrides.items():
        v = _convert(k, v, _TYPES[k])
        if k == "model":
            v = {**cfg.model, **v}
        new[k] = v
    return dataclasses.replace(cfg, **new)


# ----------------------------------------------------------------------------- presets

# the default pretrain model; fine-tuning from scratch uses the same shape, for a fair comparison
_PRETRAIN_MODEL = dict(dim=128, n_layers=4, n_heads=4, max_seq_len=128)


def pretrain_clm(**kw) -> TrainConfig:
    """The default pretrain: a small GPT (4 layers, width 128) on the embedded corpus with a 4k
    byte-level BPE; a few minutes on two CPU cores."""
    base = dict(task="clm", preset="tiny-gpt",
                model=dict(_PRETRAIN_MODEL), vocab_size=4096, seq_len=128, batch_size=16,
                max_steps=600, lr=2e-3, warmup_steps=30, eval_every=100, eval_batches=10,
                out="runs/pretrain-clm")
    return apply_overrides(TrainConfig(), {**base, **kw})


def pretrain_mlm(**kw) -> TrainConfig:
    """A small BERT with a 4k WordPiece vocabulary on the embedded corpus."""
    base = dict(task="mlm", preset="tiny-bert",
                model=dict(dim=128, n_layers=4, n_heads=4, max_seq_len=128),
                vocab_size=4096, seq_len=128, batch_size=16, max_steps=600, lr=2e-3,
                warmup_steps=30, eval_every=100, eval_batches=10, out="runs/pretrain-mlm")
    return apply_overrides(TrainConfig(), {**base, **kw})


def finetune_classify(**kw) -> TrainConfig:
    """Sequence classification (the embedded task by default)."""
    base = dict(task="classify", preset="tiny-gpt", model=dict(_PRETRAIN_MODEL), seq_len=128,
                batch_size=32, epochs=4.0, max_steps=100_000,
                lr=1e-3, warmup_steps=20, weight_decay=0.01, schedule="linear", min_lr_ratio=0.0,
                eval_every=50, log_every=10, eval_fraction=0.1, out="runs/finetune-classify")
    return apply_overrides(TrainConfig(), {**base, **kw})


def finetune_tokens(**kw) -> TrainConfig:
    """Token classification from JSONL tokens/tags."""
    base = dict(task="tokens", preset="tiny-gpt", model=dict(_PRETRAIN_MODEL), seq_len=128,
                batch_size=32, epochs=4.0, max_steps=100_000,
                lr=1e-3, warmup_steps=20, weight_decay=0.01, schedule="linear", min_lr_ratio=0.0,
                eval_every=50, log_every=10, eval_fraction=0.1, out="runs/finetune-tokens")
    return apply_overrides(TrainConfig(), {**base, **kw})


PRESETS = {
    "pretrain-clm": pretrain_clm,
    "pretrain-mlm": pretrain_mlm,
    "finetune-classify": finetune_classify,
    "finetune-tokens": finetune_tokens,
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


def from_cli(preset_name: str, flags: dict, sets: list[str] | None = None, *,
             resume: bool = False) -> TrainConfig:
    """The config of a command-line run: the named preset (or, with --resume, the run's saved
    config.json), then the flags that were given (None = not given), then `--set key=value`."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    out = overrides.get("out")
    if resume:
        if not out:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        saved = Path(out) / "config.json"
        if not saved.is_file():
            raise ValueError(f"--resume: {out} holds no llmcore run to resume (no config.json)")
        base = TrainConfig.load(saved)
    else:
        base = preset(preset_name)
    cfg = apply_overrides(base, overrides)
    if sets:
        cfg = apply_overrides(cfg, parse_overrides(sets))
    return cfg
