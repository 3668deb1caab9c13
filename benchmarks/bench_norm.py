"""Benchmark layer_norm and rms_norm, with and without the fused residual add.

A thin wrapper over the llmcore harness: `python benchmarks/bench_norm.py --help` takes the
same options as `llmcore bench` (--device, --quick, --providers, --dtypes, --modes, --out, ...),
with the ops preset to layer_norm,rms_norm.
"""
import sys

from llmcore.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], ops=["layer_norm", "rms_norm"]))
