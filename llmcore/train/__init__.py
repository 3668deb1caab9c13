"""The training engine: configs and presets, the Trainer, checkpoints, metrics, torchrun DDP,
and the pretrain / finetune / evaluate / generate commands as functions."""
from llmcore.train.checkpoint import CheckpointError
from llmcore.train.config import TrainConfig, apply_overrides, parse_overrides, preset
from llmcore.train.run import build_model, evaluate, finetune, generate, pretrain
from llmcore.train.trainer import Trainer, TrainingError, evaluate_model

__all__ = [
    "TrainConfig", "apply_overrides", "parse_overrides", "preset", "Trainer", "TrainingError",
    "CheckpointError", "evaluate_model", "build_model", "pretrain", "finetune", "evaluate",
    "generate",
]
