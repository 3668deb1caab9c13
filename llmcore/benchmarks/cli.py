"""The `llmcore bench` subcommand (also used by the scripts in benchmarks/)."""
from __future__ import annotations

import argparse
import logging
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmcore.benchmarks.names import MODES, OPS, PROVIDERS, SIZE_SETS

    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="a few sizes per op (size set 'quick')")
    p.add_argument("--size-set", choices=SIZE_SETS, default=None,
                   help="tiny (smoke test), quick (same as --quick) or full (default)")
    p.add_argument("--ops", type=_csv, default=None,
                   help=f"comma-separated, default all: {','.join(OPS)}")
    p.add_argument("--providers", type=_csv, default=None,
                   help=f"comma-separated; default every available one, and a provider named "
                        f"here that cannot run is an error: {','.join(PROVIDERS)}")
    p.add_argument("--dtypes", type=_csv, default=None,
                   help="comma-separated float32,bfloat16,float16 (default: float32 on cpu, "
                        "bfloat16 on cuda)")
    p.add_argument("--modes", type=_csv, default=None, help=f"comma-separated: {','.join(MODES)}")
    p.add_argument("--variants", type=_csv, default=None,
                   help="comma-separated case variants to run (default all), e.g. gpt2,llama "
                        "for train_step")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new case after this many minutes; the cases not run are "
                        "listed as skipped")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def run_from_args(args) -> int:
    from llmcore.benchmarks.harness import BenchConfig, BenchError, run

    if args.quick and args.size_set not in (None, "quick"):
        print(f"llmcore bench: --quick contradicts --size-set {args.size_set}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(relativeCreated)8.0f ms  %(message)s", stream=sys.stderr)
    cfg = BenchConfig(device=args.device, size_set=args.size_set or ("quick" if args.quick else "full"),
                      ops=args.ops, providers=args.providers, dtypes=args.dtypes,
                      modes=args.modes, variants=args.variants, out=args.out,
                      memory=not args.no_memory, plots=not args.no_plots, threads=args.threads,
                      max_minutes=args.max_minutes)
    try:
        result = run(cfg)
    except BenchError as exc:
        print(f"llmcore bench: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result['records'])} results, {len(result['skipped'])} skipped providers, "
          f"{len(result['errors'])} errors -> {cfg.out}/results.json, results.md, *.png")
    for e in result["errors"]:
        print(f"error: {e['op']} / {e['provider']} {e['variant']} {e['dtype']} {e['mode']}: "
              f"{e['error']}", file=sys.stderr)
    return 1 if result["errors"] else 0


def add_bench_parser(sub) -> None:
    """Adds `bench` to the `llmcore` command's subparsers."""
    p = sub.add_parser("bench", help="benchmark the kernels and a train step against eager "
                                     "PyTorch and peers")
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None, *, ops: list[str] | None = None) -> int:
    """Entry point of the benchmarks/*.py scripts: `ops` preselects the ops."""
    p = argparse.ArgumentParser(prog="llmcore bench", description=__doc__)
    add_arguments(p)
    if ops is not None:
        p.set_defaults(ops=ops)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
