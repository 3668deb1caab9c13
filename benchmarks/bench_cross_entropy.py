"""Benchmark cross_entropy and the fused linear cross-entropy.

A thin wrapper over the llmcore harness: `python benchmarks/bench_cross_entropy.py --help` takes the
same options as `llmcore bench` (--device, --quick, --providers, --dtypes, --modes, --out, ...),
with the ops preset to cross_entropy,linear_cross_entropy.
"""
import sys

from llmcore.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], ops=["cross_entropy", "linear_cross_entropy"]))
