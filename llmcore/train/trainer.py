"""The Trainer: one loop for MLM/CLM pretraining and classification fine-tuning.

One optimiser step on a global batch of `batch_size` sequences, split over `world_size`
processes and `grad_accum` micro-batches each:

    loss = sum over all micro-batches m of all ranks of  mean_loss_m * n_m / N

where n_m counts the targets of micro-batch m and N = sum n_m over the global batch (all-reduced
before the backward). Each rank back-propagates mean_loss_m * n_m * world / N, because DDP
(and FSDP2's reduce-scatter, with `fsdp`) averages gradients over ranks. So the gradient is that of the mean over every valid target of
the global batch, however the batch is split: 1 process x 2 micro-batches, 2 processes x 1, or
one batch of 16 give the same step up to float rounding.

Then: gradient clipping, AdamW and the lr schedule step. The host reads nothing from the device
between log steps: losses, gradient norms and token counts accumulate on the device and are
read once per log step (and before a checkpoint, an evaluation and the summary). Non-finite
steps: on a log step the loss and gradient norm are read, and a non-finite value skips the
update without counting as a step (`max_nonfinite` in a row stops the run with a clear
message). Between log steps the check stays on the device: the fused AdamW skips the update
(parameters and optimizer state untouched, as GradScaler's found_inf does) but the step counts
toward max_steps and the lr schedule; the skips, and the longest run of them, are read at the
next log step, which stops the run if a run reached `max_nonfinite` (naming the step where it
did). With an optimizer that cannot skip on the device (not fused), every step is read. Periodic evaluation, checkpoints, early stopping and the final
model. Everything a resume needs (model, optimiser, scheduler, RNG states of every rank, the
data position) is in the checkpoint, so `resume=True` continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from llmcore.data.collate import IGNORE_INDEX
from llmcore.models.compile import compile_model
from llmcore.train import checkpoint as ckpt
from llmcore.train import distributed as dist
from llmcore.train.data import EpochSampler, count_hints, valid_count
from llmcore.train.metrics import MetricsLogger, peak_flops, write_summary
from llmcore.train.optim import build_optimizer, build_scheduler

LM_TASKS = ("clm", "mlm")


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite losses, a bad run directory); the message says why."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (and cuBLAS workspace) so reruns are bit-identical."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def input_embedding(model: torch.nn.Module) -> torch.nn.Embedding:
    """The token embedding (for FGM): `get_input_embeddings()`, `tok_emb`, or the only
    nn.Embedding whose rows match the vocabulary."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    if isinstance(getattr(model, "tok_emb", None), torch.nn.Embedding):
        return model.tok_emb
    embs = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if not embs:
        raise ValueError("adversarial training needs a model with an nn.Embedding")
    return max(embs, key=lambda e: e.num_embeddings)


class Trainer:
    """Train `model` on `train_data` (a batch source, see llmcore.train.data) per `config`.

    model: takes (input_ids, attention_mask=None, labels=None) and returns an object with
    `.loss` (mean over valid targets) and `.logits`. out: the run directory (config.out if
    None). tokenizer / label_map: saved with the final model. callbacks: `fn(trainer)` called
    after every optimiser step (for tests and custom logging)."""

    def __init__(self, model, config, *, train_data, eval_data=None, tokenizer=None,
                 label_map=None, out=None, resume: bool = False, dist_info=None,
                 callbacks=()):
        self.cfg = config
        self.info = dist_info or dist.init(config.device)
        self.device = self.info.device
        self.out = Path(out or config.out)
        self.task = config.task
        self.model = model.to(self.device)
        self._takes_hints = _accepts(model, "num_tokens")    # an llmcore Transformer does
        self.train_data, self.eval_data = train_data, eval_data
        self.tokenizer, self.label_map = tokenizer, label_map
        self.callbacks = list(callbacks)
        self.resume = resume
        if config.batch_size % (self.info.world_size * config.grad_accum):
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by "
                             f"world_size x grad_accum ({self.info.world_size} x "
                             f"{config.grad_accum})")
        self.micro = config.batch_size // (self.info.world_size * config.grad_accum)
        self.total_steps = config.max_steps
        if config.epochs is not None:
            per_epoch = len(train_data) / config.batch_size
            self.total_steps = max(1, min(config.max_steps, math.ceil(config.epochs * per_epoch)))
        self.precision = self._precision()
        # FSDP2 shards the parameters in place, so before the optimizer sees them
        self.fsdp = config.fsdp and self.info.enabled
        if self.fsdp:
            dist.wrap_fsdp(self.model, self.info,
                           bf16=self.precision == "bf16" and self.device.type == "cuda")
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.scaler = (torch.amp.GradScaler("cuda") if self.precision == "fp16" else None)
        self.sampler = EpochSampler(len(train_data), config.seed)
        engine = compile_model(self.model) if config.compile else self.model
        self.engine = engine if self.fsdp else dist.wrap_ddp(engine, self.info)
        # counters (all saved in checkpoints)
        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self.nonfinite_in_row = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.wall_before = 0.0
        self.last_eval: dict = {}
        self.last_eval_step: int | None = None
        self.initial_eval: dict | None = None
        self.last_train_loss: float | None = None
        self.stopped_early = False
        self.window = [0.0, 0]              # train loss sum and count since the last log line
        # since the last host read, on the device: see _accumulate
        self._dev = self._fresh_counters()
        # fused optimizers skip a step on the device (found_inf), GradScaler's way
        self._device_skip = getattr(self.optimizer, "_step_supports_amp_scaling", False)
        self._last_ckpt_step: int | None = None

    # ------------------------------------------------------------------ set-up helpers

    def _precision(self) -> str:
        p = self.cfg.precision
        if p == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        if p == "fp16" and self.device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use fp32 or bf16 on the CPU")
        return p

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _model_inputs(self, batch: dict, labels: bool = True) -> dict:
        """A host batch on the device, plus the counts an llmcore model takes to run it without
        a host sync (count_hints), when the model takes them."""
        inputs = self._to_device(batch if labels else
                                 {k: v for k, v in batch.items() if k != "labels"})
        if self._takes_hints:
            inputs.update(count_hints(self.task if labels else "", batch))
        return inputs

    def _fresh_counters(self) -> torch.Tensor:
        # loss sum and count of the finite steps, tokens, skipped steps, the trailing and the
        # longest run of non-finite steps, the step where a run reached max_nonfinite (-1:
        # none), the last finite gradient norm
        return torch.tensor([0.0, 0, 0, 0, self.nonfinite_in_row, 0, -1, float("nan")],
                            dtype=torch.float64, device=self.device)

    # ------------------------------------------------------------------ loss

    def _loss(self, batch: dict) -> torch.Tensor:
        """Mean loss over the batch's valid targets: the model's own. With label smoothing, the
        model's own loss with its `label_smoothing` option (llmcore models: the fused
        linear_cross_entropy of the LM heads, cross_entropy of the classifiers); a model
        without that option gets llmcore.cross_entropy over its logits."""
        ls = self.cfg.label_smoothing
        if ls == 0.0:
            return self.engine(**batch).loss
        if _accepts(self.model, "label_smoothing"):
            return self.engine(**batch, label_smoothing=ls).loss
        from llmcore.ops.cross_entropy import cross_entropy

        labels = batch["labels"]
        out = self.engine(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out.logits
        if self.task == "clm":                   # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, label_smoothing=ls).float()

    def _zero_loss(self, batch: dict) -> torch.Tensor:
        """A zero that touches every parameter: a micro-batch with no valid target still takes
        part in DDP's gradient reduction. Under FSDP every rank must run the same forwards and
        backwards (they all-gather and reduce-scatter), so the zero is 0 * sum(logits) of a
        forward without labels."""
        if self.fsdp:
            out = self.engine(**self._model_inputs(batch, labels=False))
            return out.logits.float().sum() * 0.0
        return sum(p.reshape(-1)[0] * 0.0 for p in self.model.parameters() if p.requires_grad)

    def _backward_pass(self, batches, counts, n_global: torch.Tensor) -> torch.Tensor:
        """Forward + backward over this rank's micro-batches; returns this rank's share of the
        global mean loss (detached). DDP reduces gradients on the last micro-batch only."""
        world = self.info.world_size
        share = torch.zeros((), device=self.device)
        for m, (batch, n) in enumerate(zip(batches, counts)):
            last = m == len(batches) - 1
            if self.fsdp:                  # FSDP2: reduce-scatter on the last micro-batch only
                self.model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if (last or not self.info.enabled) \
                    else self.engine.no_sync()
            with sync:
                if n == 0 and not self.info.enabled:
                    continue
                with self._autocast():
                    if n == 0:
                        loss = scaled = self._zero_loss(batch)
                    else:
                        loss = self._loss(self._model_inputs(batch))
                        scaled = loss * (n * world / n_global)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                if n:
                    share += loss.detach().float() * (n / n_global)
        return share

    def _fgm(self, batches, counts, n_global) -> None:
        """FGM (Miyato et al., 2017): add r = eps * g / ||g|| to the embedding table, where g is
        its gradient, accumulate the gradient of the loss at the perturbed point, restore."""
        emb = input_embedding(self.model).weight
        g = emb.grad
        if g is None:
            return
        r = self.cfg.adversarial_epsilon * g / g.norm().clamp_min(1e-12)
        with torch.no_grad():
            emb.add_(r)
        self._backward_pass(batches, counts, n_global)
        with torch.no_grad():
            emb.sub_(r)

    # ------------------------------------------------------------------ one step

    def _next_batches(self):
        """This rank's micro-batches of the next global batch, and their valid counts."""
        B, world, rank = self.cfg.batch_size, self.info.world_size, self.info.rank
        indices = self.sampler.take(B)
        per_rank = B // world
        mine = indices[rank * per_rank:(rank + 1) * per_rank]
        rows = np.arange(rank * per_rank, (rank + 1) * per_rank)
        batches = [self.train_data.batch(mine[i:i + self.micro], self.step, rows[i:i + self.micro])
                   for i in range(0, per_rank, self.micro)]
        counts = [valid_count(self.task, b) for b in batches]
        return batches, counts

    def _log_due(self) -> bool:
        """Whether the next step ends on a log step (or the last step): its values are read."""
        nxt = self.step + 1
        return not self._device_skip or nxt % self.cfg.log_every == 0 or nxt >= self.total_steps

    def train_step(self, read: bool = True) -> tuple[float, float] | None:
        """One optimiser step. read=True (log steps): returns (loss, grad_norm) read from the
        device, or None when the step was skipped as non-finite; this one read also takes in
        what the steps since the last read accumulated on the device (see flush). read=False:
        nothing is read; the step's values accumulate on the device; returns None."""
        self.engine.train()
        batches, counts = self._next_batches()
        # host tensors from the collator: counted with numpy, no device read
        n_tokens = sum(int(np.count_nonzero(b["attention_mask"].numpy())) if "attention_mask" in b
                       else b["input_ids"].numel() for b in batches)
        totals = torch.tensor([float(sum(counts)), float(n_tokens)], device=self.device)
        dist.all_reduce_sum(totals, self.info)
        n_global = totals[0].clamp_min(1.0)
        share = self._backward_pass(batches, counts, n_global)
        if self.cfg.adversarial == "fgm":
            self._fgm(batches, counts, n_global)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = dist.local_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
        dist.all_reduce_sum(share, self.info)
        if not read:
            self._device_step(share, norm, totals[1])
            return None
        # the one host read: this step's loss, gradient norm and token count, and the counters
        # of the steps since the last read
        values = torch.cat([self._dev, torch.stack([share, norm.float(), totals[1]]).double()])
        loss, gnorm, tokens = self.flush(values.tolist())
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            self.skipped_steps += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.max_nonfinite:
                raise TrainingError(
                    f"the loss or gradient was not finite for {self.nonfinite_in_row} steps in "
                    f"a row (at step {self.step}); lower --lr, raise --warmup-steps, or check "
                    "the data")
            return None
        self.nonfinite_in_row = 0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(tokens)
        return loss, gnorm

    def _device_step(self, share, norm, tokens) -> None:
        """The end of a step that reads nothing: the update is skipped on the device when the
        loss or gradient norm is not finite (the fused optimizer's found_inf, or GradScaler's),
        and the step's values go into the device counters."""
        finite = torch.isfinite(share) & torch.isfinite(norm)
        bad = (~finite).to(torch.float64)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)       # skips on its own found_inf (inf/nan grads)
            self.scaler.update()
        else:
            self.optimizer.grad_scale = None
            self.optimizer.found_inf = bad.float()          # 0-dim, as the step counters
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        d = self._dev
        run = (d[4] + 1) * bad
        reached = (run >= self.cfg.max_nonfinite) & (d[6] < 0)
        self._dev = torch.stack([
            d[0] + torch.where(finite, share.double(), 0.0), d[1] + 1 - bad,
            d[2] + tokens.double(), d[3] + bad, run, torch.maximum(d[5], run),
            torch.where(reached, float(self.step), d[6]),
            torch.where(finite, norm.double(), d[7])])
        self.step += 1

    def flush(self, values=None) -> tuple[float, float] | None:
        """Reads the device counters of the steps since the last read into the host ones
        (tokens, skipped steps, the non-finite run, the loss window), one host read; stops the
        run if a run of non-finite steps reached max_nonfinite. `values`: the counters already
        read, followed by (loss, grad_norm, tokens) of the current step, which are returned."""
        if values is None:
            values = self._dev.tolist()
        lsum, n_ok, tokens, skipped, run, _longest, reached, _gnorm = values[:8]
        self._dev = self._fresh_counters()
        self.tokens += int(tokens)
        self.skipped_steps += int(skipped)
        self.window[0] += lsum
        self.window[1] += int(n_ok)
        if n_ok or skipped:                      # the run went on from nonfinite_in_row
            self.nonfinite_in_row = int(run)
        if reached >= 0:
            raise TrainingError(
                f"the loss or gradient was not finite for {self.cfg.max_nonfinite} steps in a "
                f"row (at step {int(reached)}); lower --lr, raise --warmup-steps, or check the "
                "data")
        return tuple(values[8:]) if len(values) > 8 else None

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, data=None) -> dict:
        """Eval metrics of the current model on `data` (the eval data by default); see
        `evaluate_model`. Identical on every rank."""
        data = data if data is not None else self.eval_data
        if data is None:
            return {}
        max_items = (self.cfg.eval_batches * self.cfg.batch_size if self.task in LM_TASKS
                     else None)
        return evaluate_model(self.model, data, task=self.task, micro=self.micro,
                              label_map=self.label_map, info=self.info,
                              autocast=self._autocast, max_items=max_items,
                              lockstep=self.fsdp)

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict:
        return {
            "step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
            "nonfinite_in_row": self.nonfinite_in_row, "best": self.best,
            "best_step": self.best_step, "bad_evals": self.bad_evals,
            "wall_seconds": self.wall_before + (time.perf_counter() - self._t0),
            "optimizer": (dist.full_optimizer_state(self.model, self.optimizer) if self.fsdp
                          else self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "sampler": self.sampler.state_dict(),
            "rng": dist.gather_objects(_rng_state(), self.info),
            "last_eval": self.last_eval, "last_eval_step": self.last_eval_step,
            "initial_eval": self.initial_eval, "window": list(self.window),
        }

    def save_checkpoint(self) -> Path | None:
        state = self._trainer_state()         # every rank joins the RNG gather
        model = dist.full_model_state(self.model) if self.fsdp else self.model
        path = None
        self._last_ckpt_step = self.step
        if self.info.is_main:
            path = ckpt.save_checkpoint(self.out / "checkpoints", self.step, model=model,
                                        trainer_state=state, config=self.cfg.to_dict(),
                                        keep_last=self.cfg.keep_last)
        dist.barrier(self.info)
        return path

    def _restore(self) -> int:
        """Load the newest complete checkpoint (every rank reads it). Returns its step, or 0
        when there is none."""
        found = ckpt.latest_complete(self.out / "checkpoints")
        if found is None:
            n = len(ckpt.list_checkpoints(self.out / "checkpoints"))
            if n:                            # starting over would silently throw the run away
                raise TrainingError(
                    f"--resume: no intact checkpoint in {self.out / 'checkpoints'}: all {n} "
                    "checkpoint(s) failed verification (see the warnings); restore one, or "
                    "start again with --overwrite")
            return 0
        state = ckpt.load_checkpoint(
            found, self.model,
            load_state=(lambda sd: dist.load_full_model_state(self.model, sd)) if self.fsdp
            else None)
        if dist.keyed_by_name(state["optimizer"]):       # written by an FSDP run
            dist.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        for k in ("step", "tokens", "skipped_steps", "nonfinite_in_row", "best", "best_step",
                  "bad_evals", "last_eval", "last_eval_step", "initial_eval", "window"):
            setattr(self, k, state[k])
        self.wall_before = state["wall_seconds"]
        self._last_ckpt_step = self.step
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            _set_rng_state(rngs[self.info.rank])
        else:                                # another world size: reseed, data stays exact
            seed_everything(self.cfg.seed * 1000 + self.info.rank + self.step)
        return self.step

    # ------------------------------------------------------------------ the loop

    def _better(self, metrics: dict) -> tuple[float, bool]:
        if self.task in LM_TASKS:
            v = metrics["eval_loss"]
            return v, self.best is None or v < self.best
        v = metrics["eval_accuracy"]
        return v, self.best is None or v > self.best

    def _on_eval(self, metrics: dict, log: MetricsLogger) -> bool:
        """Log, track the best model; True when early stopping says stop."""
        self.last_eval, self.last_eval_step = metrics, self.step
        log.log({"event": "eval", "step": self.step, **metrics})
        log.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        value, improved = self._better(metrics)
        if improved:
            self.best, self.best_step, self.bad_evals = value, self.step, 0
            full = dist.full_model_state(self.model) if self.fsdp else None
            if self.info.is_main:
                self._save_model(self.out / "best", full)
        else:
            self.bad_evals += 1
        if self.cfg.patience and self.bad_evals >= self.cfg.patience:
            log.write(f"early stopping: no improvement in {self.bad_evals} evaluations "
                      f"(best at step {self.best_step})")
            return True
        return False

    def _save_model(self, directory: Path, full_state: dict | None = None) -> None:
        """`_publish_model`, with a failed write (a full disk) turned into a CheckpointError and
        the temporary directory removed; `directory` keeps its previous content."""
        try:
            self._publish_model(directory, full_state)
        except ckpt.write_errors() as exc:
            shutil.rmtree(directory.with_name(f".{directory.name}.tmp{os.getpid()}"),
                          ignore_errors=True)
            raise ckpt.CheckpointError(f"could not write the model to {directory}: "
                                       f"{ckpt.error_reason(exc)}") from exc

    def _publish_model(self, directory: Path, full_state: dict | None = None) -> None:
        """Model (safetensors + config), tokenizer, label map and run config, published by
        renaming a complete temporary directory. full_state: the model's state gathered from
        FSDP shards (`dist.full_model_state`), written instead of `model.state_dict()`."""
        import json

        tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if full_state is None and hasattr(self.model, "save"):
            self.model.save(tmp)
        else:
            from safetensors.torch import save_file
            save_file(ckpt.model_state(self.model if full_state is None else full_state),
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if hasattr(getattr(self.model, "config", None), "to_json"):    # as Transformer.save
                (tmp / "config.json").write_text(self.model.config.to_json())
        if self.tokenizer is not None:
            self.tokenizer.save(tmp)
        if self.label_map is not None:
            (tmp / "label_map.json").write_text(json.dumps(self.label_map, indent=2) + "\n")
        self.cfg.save(tmp / "train_config.json")
        old = directory.with_name(f".{directory.name}.old{os.getpid()}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)

    def train(self) -> dict:
        """Run to `total_steps` (or early stop). Returns the summary (also OUT/summary.json)."""
        cfg, info = self.cfg, self.info
        self._t0 = time.perf_counter()
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")
        start = self._restore() if self.resume else 0
        self._dev = self._fresh_counters()        # the run of non-finite steps may go on
        if start == 0:
            # dropout streams differ per rank; data order and masks do not use them
            seed_everything(cfg.seed * 1000 + info.rank)
        self._t0 = time.perf_counter()
        log = MetricsLogger(self.out, enabled=info.is_main, total_steps=self.total_steps,
                            start_step=start, progress=cfg.progress)
        flops_per_token = (self.model.estimate_flops_per_token(cfg.seq_len)
                           if hasattr(self.model, "estimate_flops_per_token") else None)
        peak = peak_flops(self.device)
        if start:
            log.write(f"resumed from step {start} in {self.out / 'checkpoints'}")
        if start == 0 and self.eval_data is not None and cfg.eval_every:
            self._on_eval_start(log)
        t_log, tok_log = time.perf_counter(), self.tokens
        try:
            while self.step < self.total_steps:
                read = self._log_due()
                result = self.train_step(read=read)
                if read and result is None:
                    log.write(f"step {self.step}: non-finite loss, update skipped "
                              f"({self.nonfinite_in_row} in a row)")
                    continue
                if read:
                    loss, gnorm = result
                    self.window[0] += loss
                    self.window[1] += 1
                    self.last_train_loss = loss
                if read and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    now = time.perf_counter()
                    tps = (self.tokens - tok_log) / max(now - t_log, 1e-9)
                    event = {"event": "train", "step": self.step,
                             "loss": self.window[0] / max(self.window[1], 1),
                             "lr": self.scheduler.get_last_lr()[0], "grad_norm": gnorm,
                             "tokens": self.tokens, "tokens_per_s": tps}
                    postfix = {"loss": f"{event['loss']:.3f}", "lr": f"{event['lr']:.2e}",
                               "tok/s": f"{tps:,.0f}"}
                    if peak and flops_per_token:
                        event["mfu"] = flops_per_token * tps / (peak * info.world_size)
                        postfix["mfu"] = f"{100 * event['mfu']:.1f}%"
                    log.log(event)
                    log.progress(self.step, postfix)
                    self.window, t_log, tok_log = [0.0, 0], now, self.tokens
                stop = False
                if (self.eval_data is not None and cfg.eval_every
                        and self.step % cfg.eval_every == 0 and self.step < self.total_steps):
                    self.flush()
                    stop = self._on_eval(self.evaluate(), log)
                    t_log = time.perf_counter()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.flush()                   # the checkpoint holds the host counters
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb(self)
                if stop:
                    self.stopped_early = True
                    break
            self.flush()
            if self.eval_data is not None:
                if self.last_eval_step != self.step:
                    self._on_eval(self.evaluate(), log)
            if self._last_ckpt_step != self.step:
                self.save_checkpoint()
            wall = self.wall_before + (time.perf_counter() - self._t0)
            summary = self._summary(wall)
            full = dist.full_model_state(self.model) if self.fsdp else None
            if info.is_main:
                self._save_model(self.out / "final", full)
                log.plot()
                write_summary(self.out, summary)
            dist.barrier(info)
            return summary
        finally:
            log.close()

    def _on_eval_start(self, log: MetricsLogger) -> None:
        """The eval metrics before any training, logged at step 0 (the baseline of the curve)."""
        metrics = self.evaluate()
        log.log({"event": "eval", "step": 0, **metrics})
        log.write("step 0: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        self.initial_eval = metrics

    def _summary(self, wall: float) -> dict:
        from llmcore import backends

        ev = self.last_eval
        used = {}
        for m in self.model.modules():
            b = getattr(m, "backend", None)
            if isinstance(b, str):
                used[type(m).__name__] = b
        s = {
            "task": self.task, "steps": self.step, "tokens": self.tokens,
            "wall_seconds": round(wall, 3), "final_train_loss": self.last_train_loss,
            "skipped_steps": self.skipped_steps, "stopped_early": self.stopped_early,
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})"
                                          if self.device.type == "cuda" else ""),
            "world_size": self.info.world_size, "precision": self.precision,
            "backends": used or {f: backends.resolve(f, self.cfg.backend, self.device)
                                 for f in backends.FAMILIES},
            "best_step": self.best_step, "out": str(self.out),
        }
        for k, v in ev.items():
            s[k] = v
        if self.task in LM_TASKS:
            s.setdefault("eval_loss", None)
            s.setdefault("eval_perplexity", None)
            if self.initial_eval:
                s["initial_eval_loss"] = self.initial_eval["eval_loss"]
        else:
            s.setdefault("eval_accuracy", None)
        return s


@torch.no_grad()
def evaluate_model(model, data, *, task: str, micro: int, label_map=None, info=None,
                   autocast=contextlib.nullcontext, max_items: int | None = None,
                   lockstep: bool = False) -> dict:
    """eval_loss (mean over every valid target) and eval_perplexity for LM tasks; eval_loss,
    eval_accuracy and eval_macro_f1 for classification. The first `max_items` items of `data`
    are split into contiguous slices over the ranks and summed with all-reduce. lockstep (FSDP,
    whose forward is a collective): every rank runs the same number of forwards, repeating its
    first micro-batch with weight 0 where its slice is shorter or has no valid target."""
    info = info or dist.DistInfo()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(data) if max_items is None else min(len(data), max_items)
    lo, hi = info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size
    sums = torch.zeros(2, device=device, dtype=torch.float64)           # loss * count, count
    n_cls = len(label_map) if label_map else 0
    confusion = torch.zeros(n_cls * n_cls, device=device, dtype=torch.float64)
    want_logits = _accepts_return_logits(model)
    starts = list(range(lo, hi, micro))
    if lockstep:                        # the longest slice has ceil(n / world) items
        n_fwd = math.ceil(math.ceil(n / info.world_size) / micro)
        starts += [None] * (n_fwd - len(starts))
    for start in starts:
        idx = np.arange(lo, min(lo + micro, hi)) if start is None \
            else np.arange(start, min(start + micro, hi))
        if len(idx) == 0:               # lockstep, an empty slice: any valid item will do
            idx = np.arange(0, 1)
        batch = data.batch(idx, 0, idx)
        count = 0 if start is None else valid_count(task, batch)
        if count == 0 and not lockstep:
            continue
        hints = count_hints(task, batch) if _accepts(model, "num_tokens") else {}
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            if not want_logits:
                out = model(**batch, **hints)
            else:   # LM tasks need only the loss: no (tokens, V) logits in eval mode either
                out = model(**batch, **hints, return_logits=task not in LM_TASKS)
        if count == 0:
            continue
        sums[0] += out.loss.double() * count
        sums[1] += count
        if task not in LM_TASKS:
            labels = batch["labels"]
            keep = labels != IGNORE_INDEX
            pred = out.logits.argmax(-1)
            confusion += torch.bincount(labels[keep] * n_cls + pred[keep],
                                        minlength=n_cls * n_cls).double()
    if lockstep:
        dist.reshard(model)
    dist.all_reduce_sum(sums, info)
    eval_loss = (sums[0] / sums[1].clamp_min(1)).item()
    metrics = {"eval_loss": eval_loss}
    if task in LM_TASKS:
        metrics["eval_perplexity"] = math.exp(min(eval_loss, 700.0))
    else:
        dist.all_reduce_sum(confusion, info)
        metrics.update(classification_metrics(confusion.view(n_cls, n_cls).cpu()))
    model.train(was_training)
    return metrics


def _accepts(model, name: str) -> bool:
    """Whether model.forward takes a keyword argument `name`."""
    import inspect
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _accepts_return_logits(model) -> bool:
    import inspect
    try:
        return "return_logits" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def classification_metrics(confusion: torch.Tensor) -> dict:
    """Accuracy and macro-F1 from a (true, predicted) count matrix. Macro-F1 averages
    F1_c = 2 TP / (2 TP + FP + FN) over the classes present in the labels or predictions."""
    c = confusion.double()
    total = c.sum().item()
    tp = c.diag()
    fp = c.sum(0) - tp
    fn = c.sum(1) - tp
    present = (c.sum(0) + c.sum(1)) > 0
    f1 = (2 * tp / (2 * tp + fp + fn).clamp_min(1e-12))[present]
    return {"eval_accuracy": (tp.sum().item() / total) if total else 0.0,
            "eval_macro_f1": f1.mean().item() if present.any() else 0.0,
            "eval_examples": int(total)}
