"""The interior tile loop of each attention kernel before and after, from two JSON reports of
`python -m llmcore.kernels.triton.aot --json F`: instructions / integer instructions per loop
iteration (per thread), registers, resident warps per SM, spill bytes.

    python compare.py triton-3.6.0-before.json triton-3.6.0.json > compare.md
"""
import json
import sys

CASES = ("attention D128 causal", "attention D128 full", "attention D64 causal")


def key(row):
    return (row["case"], row["kernel"], tuple(sorted(
        (k, v) for k, v in row["config"].items() if k not in ("PAD_D", "PAD_DV"))))


def interior(row):
    # the forward and dQ kernels list their interior loop first; the dK/dV kernel under a
    # causal mask has three (boundary, interior, boundary), without one two (interior first)
    loops = row["loops"]
    return loops[1] if "dkdv" in row["kernel"] and len(loops) > 2 else loops[0]


def main(before, after):
    old = json.load(open(before))["rows"]
    new = {key(r): r for r in json.load(open(after))["rows"]}
    print("| case | kernel | tile (M x N, warps, stages) | interior loop: instructions / integer | "
          "registers | warps/SM | spill bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in old:
        if r["case"] not in CASES or not r["loops"] or "delta" in r["kernel"]:
            continue
        c = r["config"]
        n = new.get(key(r))
        if n is None:  # a table entry that changed: the same tile with other stages
            n = next((x for x in new.values() if x["case"] == r["case"]
                      and x["kernel"] == r["kernel"]
                      and (x["config"]["BLOCK_M"], x["config"]["BLOCK_N"]) ==
                      (c["BLOCK_M"], c["BLOCK_N"])), None)
        if n is None:
            continue
        a, b = interior(r), interior(n)
        tile = f"{c['BLOCK_M']}x{c['BLOCK_N']}, {c['num_warps']}, {c['num_stages']}"
        if n["config"]["num_stages"] != c["num_stages"]:
            tile += f" -> {n['config']['num_stages']}"
        print(f"| {r['case'].replace('attention ', '')} | {r['kernel'][6:-7]} | {tile} | "
              f"{a['instructions']} / {a.get('int', 0)} -> {b['instructions']} / "
              f"{b.get('int', 0)} ({b['instructions'] / a['instructions'] - 1:+.0%}) | "
              f"{r['regs']} -> {n['regs']} | {r['warps_per_sm']} -> {n['warps_per_sm']} | "
              f"{r['spill']} -> {n['spill']} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
