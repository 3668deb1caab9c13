"""Benchmark a whole training step (forward, backward, AdamW) of the gpt2 and bert flavours.

A thin wrapper over the llmcore harness: `python benchmarks/bench_train_step.py --help` takes the
same options as `llmcore bench` (--device, --quick, --providers, --dtypes, --modes, --out, ...),
with the ops preset to train_step.
"""
import sys

from llmcore.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], ops=["train_step"]))
