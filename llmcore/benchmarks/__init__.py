"""The llmcore benchmark suite: every kernel and a whole training step against eager PyTorch and
the best peers. `llmcore bench --help` (or the thin scripts in benchmarks/) runs it; the harness
is in harness.py, one module per op family defines what is measured, report.py writes the
markdown tables and plots. Importing this package imports nothing heavy."""
