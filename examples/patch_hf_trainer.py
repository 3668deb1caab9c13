"""Fine-tune a Hugging Face model with the HF Trainer after `llmcore.patch(model)`.

Runs offline: a small random Llama (or BERT / GPT-2) built from a config, a synthetic dataset of
token sequences, a few Trainer steps. `llmcore.patch` swaps in llmcore norms, the "llmcore"
attention function and llmcore (fused linear) cross-entropy; the Trainer sees the same model.

    python examples/patch_hf_trainer.py --model llama --steps 20
    python examples/patch_hf_trainer.py --model bert --task seq_cls --steps 10
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import llmcore


def build(model: str, task: str, vocab: int):
    import transformers as T

    if model == "llama":
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=176,
                            max_position_embeddings=128, num_labels=3)
        classes = {"clm": T.LlamaForCausalLM}
    elif model == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                           num_labels=3)
        classes = {"clm": T.GPT2LMHeadModel}
    else:
        cfg = T.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=128, num_labels=3)
        classes = {"mlm": T.BertForMaskedLM, "seq_cls": T.BertForSequenceClassification}
    if task not in classes:
        raise SystemExit(f"--task {task} is not available for --model {model}; "
                         f"choose from {sorted(classes)}")
    return classes[task](cfg)


class Synthetic(torch.utils.data.Dataset):
    """Random token rows with right padding; labels for the chosen task."""

    def __init__(self, n: int, seq_len: int, vocab: int, task: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq_len), generator=g)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)
        self.mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask                          # pad id 0
        if task == "seq_cls":
            self.labels = torch.randint(0, 3, (n,), generator=g)
        elif task == "mlm":
            pick = (torch.rand(n, seq_len, generator=g) < 0.15) & self.mask.bool()
            pick[:, 1] = True                                    # at least one target per row
            self.labels = torch.where(pick, self.ids, torch.full_like(self.ids, -100))
        else:
            self.labels = torch.where(self.mask.bool(), self.ids, torch.full_like(self.ids, -100))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama", "gpt2", "bert"), default="llama")
    parser.add_argument("--task", choices=("clm", "mlm", "seq_cls"), default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--no-patch", action="store_true", help="run the unpatched model")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    import transformers as T

    task = args.task or ("mlm" if args.model == "bert" else "clm")
    torch.manual_seed(0)
    vocab = 211
    model = build(args.model, task, vocab)
    if not args.no_patch:
        llmcore.patch(model)
    data = Synthetic(args.steps * args.batch_size, args.seq_len, vocab, task)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = T.TrainingArguments(
            output_dir=args.output_dir or tmp, max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, learning_rate=1e-3, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, seed=0)
        trainer = T.Trainer(model=model, args=training_args, train_dataset=data)
        result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"{args.model}/{task} patched={not args.no_patch}: {len(losses)} steps, "
          f"first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}, "
          f"train_loss {result.training_loss:.4f}")
    return losses


if __name__ == "__main__":
    main()
