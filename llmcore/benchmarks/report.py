"""results.md (tables with speed-ups against the baselines) and one PNG plot per op."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from llmcore.benchmarks.harness import MODES, load_op


def _key(rec: dict, provider: str) -> tuple:
    return (rec["op"], rec["variant"], repr(sorted(rec["shape"].items())), rec["dtype"],
            rec["mode"], provider)


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if not isinstance(v, bool)) or "-"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def header(result: dict) -> list[str]:
    m, v, g = result["machine"], result["versions"], result["git"]
    commit = (g["commit"] or g.get("note", "unknown")) + (" (with uncommitted changes)"
                                                           if g.get("dirty") else "")
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    cfg = result["config"]
    return [
        f"- date: {result['created']}",
        f"- device: {cfg['device']}; machine: {m['summary']}; platform: {m['platform']}; "
        f"CPUs: {m['cpu_count']}, torch threads: {m['torch_threads']}, "
        f"1-minute load average at start: {m['load_avg_1m']}",
        f"- versions: {vers}",
        f"- commit: {commit}",
        f"- size set: {cfg['size_set']}; peak memory: {result['memory_method'] or 'not measured'}",
    ]


def summary(result: dict, modes=("fwd+bwd", "step")) -> list[str]:
    """One compact table: per op, variant and shape (fwd+bwd and train-step rows only), each
    provider's median time and its speed-up against the op's first baseline (wall time; on the
    CPU also CPU time)."""
    recs = [r for r in result["records"] if r["mode"] in modes]
    if not recs:
        return []
    providers = list(dict.fromkeys(r["provider"] for r in recs))
    rows = defaultdict(dict)
    for r in recs:
        rows[(r["op"], r["variant"], _shape_text(r["shape"]), r["dtype"], r["mode"])][r["provider"]] = r
    cpu = result["config"]["device"] == "cpu"
    lines = ["| op | variant | shape | dtype | mode | " + " | ".join(providers) + " |",
             "|" + "---|" * (5 + len(providers))]
    for (op, variant, shape, dtype, mode), by_p in rows.items():
        base = by_p.get(load_op(op).baselines[0])
        cells = []
        for p in providers:
            r = by_p.get(p)
            if r is None:
                cells.append("-")
                continue
            text = f"{r['ms']:.3g} ms"
            if base is not None and r is not base:
                text += f" ({base['ms'] / r['ms']:.2f}x"
                if cpu and r.get("cpu_ms") and base.get("cpu_ms"):
                    text += f", CPU {base['cpu_ms'] / r['cpu_ms']:.2f}x"
                text += ")"
            cells.append(text)
        lines.append(f"| {op} | {variant} | {shape} | {dtype} | {mode} | " + " | ".join(cells) + " |")
    return lines


def memory_summary(result: dict, modes=("fwd+bwd", "step")) -> list[str]:
    """Peak MB of each provider for the fwd+bwd and train-step rows."""
    recs = [r for r in result["records"] if r["mode"] in modes]
    if not recs or all(r["peak_mb"] is None for r in recs):
        return []
    providers = list(dict.fromkeys(r["provider"] for r in recs))
    rows = defaultdict(dict)
    for r in recs:
        rows[(r["op"], r["variant"], _shape_text(r["shape"]), r["dtype"], r["mode"])][r["provider"]] = r
    lines = ["| op | variant | shape | dtype | mode | " + " | ".join(providers) + " |",
             "|" + "---|" * (5 + len(providers))]
    for key, by_p in rows.items():
        cells = [_num(by_p[p]["peak_mb"], ".1f") if p in by_p else "-" for p in providers]
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    lines = ["# llmcore benchmark results", ""] + header(result) + [""]
    lines += ["Times are the median wall-clock time of one call over repeated calls, with the "
              "20th-80th percentile range; CPU ms (CPU runs) the median CPU time of the process "
              "per call; peak MB is the memory one call needs above what it already held; "
              "`vs X` is X's median time divided by this provider's (above 1 is faster), "
              "`mem vs X` this provider's peak memory over X's, `CPU time vs X` the same ratio "
              "of CPU times.", ""]
    if result["skipped"]:
        lines += ["## Skipped providers", "", "| op | provider | why |", "|---|---|---|"]
        lines += [f"| {s['op']} | {s['provider']} | {s['reason']} |" for s in result["skipped"]]
        lines.append("")
    if result["errors"]:
        lines += ["## Errors", "", "| op | provider | variant | shape | dtype | mode | error |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['op']} | {e['provider']} | {e['variant']} | {_shape_text(e['shape'])} | "
                  f"{e['dtype']} | {e['mode']} | {e['error'].replace('|', '/')} |"
                  for e in result["errors"]]
        lines.append("")
    table = summary(result)
    if table:
        lines += ["## Summary (fwd+bwd and train step; speed-up against eager `torch`)", ""]
        lines += table + [""]
    table = memory_summary(result)
    if table:
        lines += ["## Peak memory in MB (fwd+bwd and train step)", ""] + table + [""]
    by_key = {_key(r, r["provider"]): r for r in result["records"]}
    by_op = defaultdict(list)
    for r in result["records"]:
        by_op[r["op"]].append(r)
    for op, recs in by_op.items():
        bench = load_op(op)
        unit = recs[0]["throughput_unit"]
        extra_mfu = any(r.get("mfu") is not None for r in recs)
        extra_real = any(r.get("real_tokens_per_s") is not None for r in recs)
        extra_backends = any(r.get("backends") for r in recs)
        has_cpu = any(r.get("cpu_ms") is not None for r in recs)
        lines += [f"## {op}", ""]
        tables = defaultdict(list)
        for r in recs:
            tables[(r["dtype"], r["mode"])].append(r)
        for (dtype, mode), rows in tables.items():
            base_cols = [b for b in bench.baselines if any(r["provider"] == b for r in rows)]
            cols = ["variant", "shape", "provider", "ms (p20-p80)"] + (["CPU ms"] if has_cpu else [])
            cols += [unit] + (["real tokens/s"] if extra_real else []) + ["peak MB"]
            cols += (["MFU"] if extra_mfu else []) + (["llmcore backends"] if extra_backends else [])
            cols += [f"vs {b}" for b in base_cols]
            cols += [f"mem vs {b}" for b in base_cols]
            cols += [f"CPU time vs {b}" for b in base_cols[:1] if has_cpu]
            lines += [f"### {dtype}, {mode}", "", "| " + " | ".join(cols) + " |",
                      "|" + "---|" * len(cols)]
            for r in rows:
                cells = [r["variant"], _shape_text(r["shape"]), r["provider"],
                         f"{r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f})"]
                cells += [_num(r.get("cpu_ms"), ".3f")] if has_cpu else []
                cells.append(_num(r["throughput"], ".3g"))
                cells += [_num(r.get("real_tokens_per_s"), ".3g")] if extra_real else []
                cells.append(_num(r["peak_mb"], ".1f"))
                if extra_mfu:
                    cells.append(_num(r.get("mfu"), ".1%"))
                if extra_backends:
                    cells.append(", ".join(f"{k}={v}" for k, v in (r.get("backends") or {}).items())
                                 or "-")
                for b in base_cols:
                    base = by_key.get(_key(r, b))
                    cells.append(f"{base['ms'] / r['ms']:.2f}x" if base else "-")
                for b in base_cols:
                    base = by_key.get(_key(r, b))
                    ok = base and base["peak_mb"] and r["peak_mb"] is not None
                    cells.append(f"{r['peak_mb'] / base['peak_mb']:.2f}" if ok else "-")
                for b in base_cols[:1] if has_cpu else []:
                    base = by_key.get(_key(r, b))
                    ok = base and base.get("cpu_ms") and r.get("cpu_ms")
                    cells.append(f"{base['cpu_ms'] / r['cpu_ms']:.2f}x" if ok else "-")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plots(result: dict, out: Path) -> list[Path]:
    """One PNG per op: throughput against the swept size, one line per provider, one panel per
    (variant, dtype, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_op = defaultdict(list)
    for r in result["records"]:
        by_op[r["op"]].append(r)
    for op, recs in by_op.items():
        bench = load_op(op)
        if not bench.x_key:  # nothing swept (the overhead op): the tables say it all
            continue
        # panels in the order the records came (variants as swept), modes in MODES order
        panels = list(dict.fromkeys((r["variant"], r["dtype"], r["mode"]) for r in recs))
        variants = list(dict.fromkeys(r["variant"] for r in recs))
        panels.sort(key=lambda p: (variants.index(p[0]), p[1], MODES.index(p[2])))
        ncols = min(3, len(panels))
        nrows = -(-len(panels) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
        for ax, (variant, dtype, mode) in zip(axes.flat, panels):
            lines = defaultdict(list)
            for r in recs:
                if (r["variant"], r["dtype"], r["mode"]) == (variant, dtype, mode):
                    lines[r["provider"]].append((r["shape"][bench.x_key], r["throughput"]))
            xs = set()
            for provider, pts in lines.items():
                pts.sort()
                xs.update(p[0] for p in pts)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(xs), [str(x) for x in sorted(xs)])
            ax.minorticks_off()
            ax.set_xlabel(bench.x_key)
            ax.set_ylabel(recs[0]["throughput_unit"])
            ax.set_title(f"{variant}, {dtype}, {mode}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        cfg = result["config"]
        fig.suptitle(f"{op} on {cfg['device']} ({result['machine']['summary']})", fontsize=10)
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
