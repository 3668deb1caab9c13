"""Benchmark attention (causal and not, head dims 64/128, GQA) and packed varlen attention.

A thin wrapper over the llmcore harness: `python benchmarks/bench_attention.py --help` takes the
same options as `llmcore bench` (--device, --quick, --providers, --dtypes, --modes, --out, ...),
with the ops preset to attention,attention_varlen.
"""
import sys

from llmcore.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], ops=["attention", "attention_varlen"]))
