"""The `llmcore` command (also `python -m llmcore`)."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    import torch

    import llmcore
    from llmcore import backends

    lines = [
        f"llmcore {llmcore.__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    for pkg in ("triton", "flash-attn", "transformers", "tokenizers", "liger-kernel"):
        lines.append(f"{pkg} {_version(pkg)}")
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("CUDA devices: none")
    native = backends.native_module()
    lines.append(f"llmcore._native: {'built' if native else 'not built'}"
                 + (f" (CUDA kernels: {'yes' if native.has_cuda() else 'no'})" if native else ""))
    lines.append("backends (op family / device: backend -> available or why not):")
    for family, per_dev in backends.available_backends().items():
        for dev, entry in per_dev.items():
            lines.append(f"  {family} / {dev}: auto -> {entry['auto']}")
            for name, st in entry.items():
                if name == "auto":
                    continue
                lines.append(f"    {name:<10} {'yes' if st['available'] else 'no: ' + st['reason']}")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- training
# Thin: parse the flags, build a TrainConfig (llmcore.train.config.from_cli), call llmcore.train.
# User mistakes (missing files, bad data lines, an existing run directory) print one line and
# exit with status 2; LLMCORE_DEBUG=1 shows the traceback instead.

def _user_errors(fn):
    import functools

    @functools.wraps(fn)
    def run(args):
        import os

        from llmcore.data import DataError, ShardError
        from llmcore.train import CheckpointError, TrainingError

        import logging
        logging.basicConfig(format="%(message)s")
        logging.getLogger("llmcore.train").setLevel(logging.INFO)      # the trainer's messages
        try:
            return fn(args)
        except (DataError, ShardError, CheckpointError, TrainingError, ValueError, TypeError,
                FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            if os.environ.get("LLMCORE_DEBUG"):
                raise
            print(f"llmcore {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"llmcore {args.command}: interrupted", file=sys.stderr)
            return 130
    return run


def _train_flags(args, names) -> dict:
    flags = {n: getattr(args, n) for n in names}
    for n in ("data", "eval_data"):
        if n in flags and flags[n] is not None:
            flags[n] = list(flags[n])
    return flags


_COMMON = ("out", "max_steps", "batch_size", "lr", "seed", "save_every", "eval_every",
           "device", "backend", "data", "eval_data", "epochs", "weight_decay", "warmup_steps",
           "schedule", "grad_accum", "precision", "dropout", "log_every", "patience",
           "keep_last", "tokenizer", "fsdp")


def _finish(kind: str, summary: dict) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    out = summary["out"]
    keys = (("eval_loss", "eval_perplexity") if kind == "pretrain"
            else ("eval_accuracy", "eval_macro_f1"))
    metrics = ", ".join(f"{k} {summary[k]:.4g}" for k in keys if summary.get(k) is not None)
    start = summary.get("initial_eval_loss")
    print(f"{kind} finished: {summary['steps']} steps, {summary['tokens']:,} tokens in "
          f"{summary['wall_seconds']:.0f} s on {summary['device']}; {metrics}"
          + (f" (eval loss at start {start:.4g})" if start is not None else ""))
    print(f"run directory: {out}  (final model: {out}/final, metrics: {out}/metrics.jsonl, "
          f"plot: {out}/loss.png, summary: {out}/summary.json)")


def _announce(kind: str, cfg, from_scratch: bool = False) -> None:
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        data = ", ".join(cfg.data) if cfg.data else "the embedded stdlib corpus" \
            if kind == "pretrain" else "the embedded stdlib task"
        init = ""
        if kind == "finetune" and cfg.init:
            init = (f", random init in the shape of {cfg.init}" if from_scratch
                    else f", init {cfg.init}")
        print(f"llmcore {kind}: {cfg.task}, model {cfg.preset}{init}, data {data} -> {cfg.out}",
              flush=True)


@_user_errors
def cmd_pretrain(args) -> int:
    from llmcore.train import config, run

    flags = _train_flags(args, _COMMON + ("seq_len", "vocab_size", "mlm_probability",
                                          "deterministic", "compile",
                                          "activation_checkpointing", "progress"))
    flags["task"] = args.objective
    flags["preset"] = args.preset
    if args.out is None and not args.resume:
        flags["out"] = run.default_out(f"pretrain-{args.objective or 'clm'}")
    name = f"pretrain-{args.objective or 'clm'}"
    cfg = config.from_cli(name, flags, args.set, resume=args.resume)
    if args.objective == "mlm" and args.preset is None and not args.resume:
        cfg = cfg.replace(preset="tiny-bert")
    _announce("pretrain", cfg)
    _finish("pretrain", run.pretrain(cfg, resume=args.resume, overwrite=args.overwrite))
    return 0


@_user_errors
def cmd_finetune(args) -> int:
    from llmcore.train import config, run

    flags = _train_flags(args, _COMMON + ("deterministic", "label_smoothing", "adversarial",
                                          "text_field", "label_field", "init", "progress"))
    flags["task"] = args.task
    flags["seq_len"] = args.max_length
    flags["preset"] = args.preset
    if args.out is None and not args.resume:
        flags["out"] = run.default_out(f"finetune-{args.task or 'classify'}")
    if args.init is None and not args.from_scratch and not args.resume:
        latest = run.find_latest_pretrain()
        if latest is None:
            raise ValueError("no --init given and no finished pretrain run under runs/; run "
                             "`llmcore pretrain` first, pass --init RUN_DIR|hf:PATH, or "
                             "--from-scratch")
        print(f"initialising from {latest} (the newest pretrain run)")
        flags["init"] = str(latest)
    cfg = config.from_cli(f"finetune-{args.task or 'classify'}", flags, args.set,
                          resume=args.resume)
    _announce("finetune", cfg, args.from_scratch)
    summary = run.finetune(cfg, from_scratch=args.from_scratch, resume=args.resume,
                           overwrite=args.overwrite)
    _finish("finetune", summary)
    return 0


@_user_errors
def cmd_evaluate(args) -> int:
    import json

    from llmcore.train import run

    metrics = run.evaluate(args.run, args.data, device=args.device, batch_size=args.batch_size)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


@_user_errors
def cmd_generate(args) -> int:
    from llmcore.train import run

    print(run.generate(args.run, args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, device=args.device))
    return 0


def _add_run_flags(p) -> None:
    """Flags shared by pretrain and finetune; every default is None = "the preset's value"."""
    a = p.add_argument
    a("--preset", help="model preset (tiny-gpt, tiny-bert, tiny-llama, gpt2-small, ...)")
    a("--data", nargs="+", metavar="PATH", help="training files or directories "
      "(default: the embedded stdlib corpus / task)")
    a("--eval-data", nargs="+", metavar="PATH", help="eval files (default: a hash split)")
    a("--out", metavar="DIR", help="run directory (default: runs/<command>-<time>)")
    a("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    a("--overwrite", action="store_true", help="replace an existing run in --out")
    a("--max-steps", type=int, metavar="N")
    a("--epochs", type=float, metavar="N")
    a("--batch-size", type=int, metavar="N", help="global batch (sequences)")
    a("--grad-accum", type=int, metavar="N", help="micro-batches per step and process")
    a("--lr", type=float, metavar="X")
    a("--weight-decay", type=float, metavar="X")
    a("--warmup-steps", type=int, metavar="N")
    a("--schedule", choices=("cosine", "linear", "constant", "wsd"))
    a("--dropout", type=float, metavar="P")
    a("--seed", type=int, metavar="N")
    a("--deterministic", action="store_true", default=None,
      help="deterministic kernels: reruns and resumes are bit-identical")
    a("--save-every", type=int, metavar="N", help="checkpoint every N steps (0: at the end)")
    a("--keep-last", type=int, metavar="K", help="checkpoints to keep")
    a("--eval-every", type=int, metavar="N")
    a("--log-every", type=int, metavar="N")
    a("--patience", type=int, metavar="N", help="early stopping after N evals without gain")
    a("--device", choices=("auto", "cpu", "cuda"))
    a("--backend", choices=("auto", "triton", "native", "torch"))
    a("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    a("--fsdp", action="store_true", default=None,
      help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) "
      "instead of DDP")
    a("--tokenizer", metavar="PATH", help="tokenizer.json or HF tokenizer dir to use")
    a("--no-progress", dest="progress", action="store_false", default=None,
      help="no progress bar")
    a("--set", action="append", metavar="KEY=VALUE",
      help="any TrainConfig field, e.g. --set min_lr_ratio=0.05 --set model.dim=256")


def _add_training_parsers(sub) -> None:
    p = sub.add_parser("pretrain", help="MLM or CLM pretraining (default: a tiny GPT on the "
                       "embedded stdlib corpus, a few minutes on a CPU)")
    p.add_argument("--objective", choices=("clm", "mlm"))
    _add_run_flags(p)
    p.add_argument("--seq-len", type=int, metavar="N")
    p.add_argument("--vocab-size", type=int, metavar="N")
    p.add_argument("--mlm-probability", type=float, metavar="P")
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="sequence or token classification, from a pretrain "
                       "run, a Hugging Face checkpoint, or scratch (default: the embedded task)")
    p.add_argument("--task", choices=("classify", "tokens"))
    p.add_argument("--init", metavar="RUN_DIR|hf:PATH")
    p.add_argument("--from-scratch", action="store_true")
    _add_run_flags(p)
    p.add_argument("--max-length", type=int, metavar="N")
    p.add_argument("--text-field", metavar="NAME")
    p.add_argument("--label-field", metavar="NAME")
    p.add_argument("--label-smoothing", type=float, metavar="X")
    p.add_argument("--adversarial", choices=("fgm",))
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="metrics of a run's final model")
    p.add_argument("--run", required=True, metavar="DIR")
    p.add_argument("--data", nargs="+", metavar="PATH")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="continue a prompt with a CLM run's final model")
    p.add_argument("--run", required=True, metavar="DIR")
    p.add_argument("--prompt", default="", metavar="TEXT")
    p.add_argument("--max-new-tokens", type=int, default=50, metavar="N")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and which backends can run here")
    p.set_defaults(func=cmd_info)
    _add_training_parsers(sub)
    from llmcore.benchmarks.cli import add_bench_parser   # argparse only; the harness loads lazily
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
