"""The training commands as functions: `pretrain`, `finetune`, `evaluate`, `generate`.

The CLI parses arguments into a TrainConfig and calls these; scripts can call them too, or build
the model, data and `Trainer` themselves (examples/pretrain_custom.py).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llmcore.data import collate
from llmcore.data.tokenizer import Tokenizer
from llmcore.train import data as tdata
from llmcore.train import distributed as dist
from llmcore.train.config import TrainConfig
from llmcore.train.trainer import (LM_TASKS, Trainer, TrainingError, evaluate_model,
                                   seed_everything, set_deterministic)

_HEAD = {"clm": "clm", "mlm": "mlm", "classify": "seq_cls", "tokens": "token_cls"}
_RUN_MARKERS = ("config.json", "summary.json", "checkpoints", "metrics.jsonl")
# TransformerConfig fields a fine-tuning run may change on a pretrained model
_FINETUNE_OPTIONS = ("dropout", "attn_dropout", "pooling", "activation_checkpointing", "backend")


def default_out(kind: str) -> str:
    """runs/<kind>-YYYYmmdd-HHMMSS: a fresh directory per run."""
    return os.path.join("runs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check the run directory: --resume needs an existing run; otherwise an existing non-empty
    directory needs --overwrite (and must look like an llmcore run before it is deleted)."""
    if resume:
        if not (out / "config.json").is_file():
            raise TrainingError(f"--resume: {out} holds no llmcore run to resume "
                                "(no config.json); start a new run without --resume")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise TrainingError(f"the output directory {out} already exists; pass --resume to "
                                "continue that run or --overwrite to replace it")
        if not out.is_dir() or not any((out / m).exists() for m in _RUN_MARKERS):
            raise TrainingError(f"--overwrite: {out} does not look like an llmcore run "
                                "directory; refusing to delete it")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test"):
            pass
    except OSError as exc:
        raise TrainingError(f"cannot write to the output directory {out}: "
                            f"{exc.strerror or exc}") from None


def _setup(cfg: TrainConfig) -> dist.DistInfo:
    set_deterministic(cfg.deterministic)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    return dist.init(cfg.device)


def _start(cfg: TrainConfig, info: dist.DistInfo, resume: bool, overwrite: bool) -> Path:
    out = Path(cfg.out)
    for paths in (cfg.data, cfg.eval_data):     # a typo in a path fails before anything is written
        tdata.check_paths(paths)
    err = None
    if info.is_main:
        try:
            prepare_out_dir(out, resume=resume, overwrite=overwrite)
        except TrainingError as exc:
            err = str(exc)
        if err is None and not resume:
            cfg.save(out / "config.json")       # marks the directory as an llmcore run
    err = dist.broadcast_object(err, info)
    if err:
        raise TrainingError(err)
    return out


def build_model(cfg: TrainConfig, vocab_size: int, pad_id: int | None, *,
                num_labels: int | None = None, base=None):
    """A Transformer for the task: the preset (or `base`, an existing TransformerConfig) with
    the run's vocabulary, head and options."""
    from llmcore.models import Transformer, preset

    fields = dict(vocab_size=vocab_size, head=_HEAD[cfg.task], backend=cfg.backend,
                  activation_checkpointing=cfg.activation_checkpointing, pad_token_id=pad_id)
    if num_labels is not None:
        fields["num_labels"] = num_labels
    if cfg.dropout is not None:
        fields["dropout"] = cfg.dropout
    if base is None:
        mcfg = preset(cfg.preset, **{**cfg.model, **fields})
    else:
        # the pretrained shape stays; only options that do not change weights may be overridden
        fields.pop("vocab_size")
        options = {k: v for k, v in cfg.model.items() if k in _FINETUNE_OPTIONS}
        mcfg = base.replace(**{**options, **fields})
    if mcfg.max_seq_len < cfg.seq_len:
        if mcfg.position == "learned" and base is not None:
            raise ValueError(f"--max-length {cfg.seq_len} exceeds the model's "
                             f"{mcfg.max_seq_len} learned positions")
        mcfg = mcfg.replace(max_seq_len=cfg.seq_len)
    if cfg.task == "mlm" and mcfg.causal:
        raise ValueError(f"--objective mlm needs an encoder preset (e.g. tiny-bert), "
                         f"{cfg.preset!r} is causal")
    return Transformer(mcfg)


# --------------------------------------------------------------------------- pretrain

def _finish(info) -> None:
    """Every rank waits for the others before the process group is destroyed (the `finally`
    of a run): a rank that tore down gloo while its peer still had the last collective's
    connection open aborted the peer's exit ("terminate called without an active exception",
    SIGABRT: 2 of about 20 launches of tests/train/test_fsdp.py's workers on a 2-vCPU VM). On the error path
    there is no barrier: a failed rank's peer must not wait for it."""
    dist.barrier(info)


def pretrain(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
             callbacks=()) -> dict:
    """MLM or CLM pretraining per `cfg`; returns the summary (also OUT/summary.json)."""
    if cfg.task not in LM_TASKS:
        raise ValueError(f"pretrain runs task 'clm' or 'mlm', got {cfg.task!r}")
    info = _setup(cfg)
    try:
        out = _start(cfg, info, resume, overwrite)
        tok, train, evals = tdata.build_lm_sources(cfg, out / "data", is_main=info.is_main,
                                                   sync=lambda: dist.barrier(info))
        seed_everything(cfg.seed)
        model = build_model(cfg, tok.vocab_size, tok.pad_id)
        trainer = Trainer(model, cfg, train_data=train, eval_data=evals, tokenizer=tok,
                          out=out, resume=resume, dist_info=info, callbacks=callbacks)
        summary = trainer.train()
        _finish(info)
        return summary
    finally:
        dist.shutdown(info)


# --------------------------------------------------------------------------- finetune

def find_latest_pretrain(root: str | os.PathLike = "runs") -> Path | None:
    """The newest runs/pretrain-*/ with a final model, or None."""
    cands = [p for p in Path(root).glob("pretrain*") if (p / "final" / "config.json").is_file()]
    return max(cands, key=lambda p: (p / "final").stat().st_mtime) if cands else None


def _init_source(init: str):
    """(model config, state_dict, tokenizer) from an llmcore run directory (its final model),
    a saved model directory, or `hf:PATH` (a Hugging Face checkpoint via from_hf)."""
    from llmcore.models import Transformer, from_hf

    if init.startswith("hf:"):
        path = Path(init[3:])
        if not path.exists():
            raise FileNotFoundError(f"--init {init}: {path} does not exist")
        model = from_hf(str(path))
        return model.config, model.state_dict(), Tokenizer.load(path)
    path = Path(init)
    for cand in (path / "final", path):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            model = Transformer.load(cand)
            tok_path = cand if (cand / "tokenizer.json").is_file() else path / "data"
            return model.config, model.state_dict(), Tokenizer.load(tok_path)
    raise FileNotFoundError(f"--init {init}: no llmcore model there (expected {path}/final/ "
                            "with config.json and model.safetensors, from `llmcore pretrain`)")


def load_backbone(model, state: dict) -> None:
    """Load every pretrained weight except the old task head; the new head stays freshly
    initialised. Fails loudly when anything but head weights is missing or left over."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items()
              if k in own and own[k].shape == v.shape and not k.startswith("head.")}
    missing, _ = model.load_state_dict(usable, strict=False)
    bad = [k for k in missing if not k.startswith(("head.", "pooler."))]
    if bad:
        raise ValueError(f"the pretrained model lacks weights this model needs: {bad[:5]}")


def finetune(cfg: TrainConfig, *, from_scratch: bool = False, resume: bool = False,
             overwrite: bool = False, callbacks=()) -> dict:
    """Sequence or token classification per `cfg`: initialised from `cfg.init` (an llmcore run
    or hf:PATH) unless `from_scratch`. Returns the summary."""
    if cfg.task not in ("classify", "tokens"):
        raise ValueError(f"finetune runs task 'classify' or 'tokens', got {cfg.task!r}")
    info = _setup(cfg)
    try:
        out = _start(cfg, info, resume, overwrite)
        train_ex, eval_ex = tdata.labelled_examples(cfg)
        label_map = tdata.label_map_for(cfg, train_ex)
        base = state = None
        if cfg.init:
            base, state, tok = _init_source(cfg.init)
        elif (out / "final" / "tokenizer.json").is_file() and resume:
            tok = Tokenizer.load(out / "final")
        else:
            from llmcore.data.tokenizer import train_tokenizer
            tok_file = out / "data" / "tokenizer.json"
            if tok_file.is_file():
                tok = Tokenizer.load(tok_file)
            else:
                texts = [e.text if isinstance(e.text, str) else " ".join(e.text) for e in train_ex]
                tok = train_tokenizer(texts, "bpe", cfg.vocab_size)
                if info.is_main:
                    tok.save(out / "data")
        train, evals = tdata.build_labelled_sources(cfg, tok, label_map, train_ex, eval_ex)
        seed_everything(cfg.seed)
        model = build_model(cfg, tok.vocab_size, tok.pad_id, num_labels=len(label_map), base=base)
        if state is not None and not from_scratch:
            load_backbone(model, state)
        trainer = Trainer(model, cfg, train_data=train, eval_data=evals, tokenizer=tok,
                          label_map=label_map, out=out, resume=resume, dist_info=info,
                          callbacks=callbacks)
        summary = trainer.train()
        summary["init"] = "scratch" if (from_scratch or not cfg.init) else cfg.init
        if info.is_main:
            from llmcore.train.metrics import write_summary
            write_summary(out, summary)
        _finish(info)
        return summary
    finally:
        dist.shutdown(info)


# --------------------------------------------------------------------------- evaluate / generate

def load_run(run: str | os.PathLike, device: str = "auto"):
    """(model, tokenizer, train config, label map or None) of a finished run's final model."""
    from llmcore.models import Transformer

    run = Path(run)
    final = run / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"{run} has no final model (expected {final}/config.json); "
                                "did the run finish?")
    cfg = TrainConfig.load(final / "train_config.json")
    dev = dist.pick_device(device)
    model = Transformer.load(final, device=dev)
    tok = Tokenizer.load(final)
    lm = final / "label_map.json"
    label_map = json.loads(lm.read_text()) if lm.is_file() else None
    return model, tok, cfg, label_map


def evaluate(run: str | os.PathLike, data=None, *, device: str = "auto",
             batch_size: int | None = None) -> dict:
    """Metrics of a run's final model on `data` (files), or on the run's own eval split."""
    model, tok, cfg, label_map = load_run(run, device)
    cfg = cfg.replace(progress=False)
    micro = batch_size or cfg.batch_size
    if cfg.task in LM_TASKS:
        with tempfile.TemporaryDirectory() as tmp:
            if data:
                from llmcore.data.shards import TokenStream, write_shards
                paths = write_shards(tdata.iter_documents(data, cfg.text_field), tok, tmp,
                                     prefix="eval")
                wrap = (tok.cls_id, tok.sep_id) if cfg.task == "mlm" else None
                masker = None
                if cfg.task == "mlm":
                    masker = collate.MLMMasker(tok.vocab_size, tok.mask_id, tok.special_ids,
                                               mlm_probability=cfg.mlm_probability)
                source = tdata.LMSource(collate.BlockDataset(TokenStream(paths), cfg.seq_len,
                                                             wrap), cfg.task, masker, cfg.seed + 1)
                max_items = None
            else:
                _, _, source = tdata.build_lm_sources(cfg, Path(run) / "data", is_main=True,
                                                      sync=lambda: None)
                max_items = cfg.eval_batches * cfg.batch_size
            return evaluate_model(model, source, task=cfg.task, micro=micro,
                                  max_items=max_items)
    if data:
        cfg = cfg.replace(eval_data=list(data))
        load = (collate.load_classification if cfg.task == "classify"
                else collate.load_token_classification)
        kw = (dict(text_field=cfg.text_field, label_field=cfg.label_field)
              if cfg.task == "classify" else dict(tokens_field=cfg.tokens_field,
                                                  tags_field=cfg.tags_field))
        eval_ex = [e for p in data for e in load(p, **kw)]
    else:
        _, eval_ex = tdata.labelled_examples(cfg)
    _, source = tdata.build_labelled_sources(cfg, tok, label_map, eval_ex[:1], eval_ex)
    return evaluate_model(model, source, task=cfg.task, micro=micro, label_map=label_map)


def generate(run: str | os.PathLike, prompt: str, *, max_new_tokens: int = 50,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, device: str = "auto") -> str:
    """The prompt continued by a CLM run's final model."""
    model, tok, cfg, _ = load_run(run, device)
    if model.config.head != "clm":
        raise ValueError(f"generate needs a causal LM run; {run} is a {cfg.task!r} run")
    ids = tok.encode(prompt) if prompt else []
    if not ids:
        ids = [tok.eos_id if tok.eos_id is not None else tok.pad_id]
    budget = model.config.max_seq_len - len(ids)
    if model.config.position == "learned" and max_new_tokens > budget:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's context of {model.config.max_seq_len}")
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    from llmcore.models import generate as gen
    out = gen(model, torch.tensor([ids], device=dev), max_new_tokens, temperature, top_k, top_p,
              eos_token_id=tok.eos_id, generator=g)
    new = out[0, len(ids):].tolist()
    if tok.eos_id is not None and tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    return prompt + tok.decode(new)
