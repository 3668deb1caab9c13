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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and which backends can run here")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
