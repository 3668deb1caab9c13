#!/usr/bin/env bash
# The default `llmcore pretrain` (embedded corpus, tiny GPT, 2 threads here) on the native
# backend (what auto picks) and on the torch backend, alternating, 120 steps each; tokens/s =
# the median of metrics.jsonl's tokens_per_s at steps 70-120 (the earlier sessions' method).
# argv: rounds.
set -u
for r in $(seq "${1:-3}"); do
    for b in native torch; do
        d=$(mktemp -d)
        .venv/bin/llmcore pretrain --max-steps 120 --backend $b --no-progress --eval-every 1000 \
            --save-every 1000 --out "$d/run" > "$d/log" 2>&1
        tok=$(.venv/bin/python -c "
import json, statistics, sys
v = [r['tokens_per_s'] for r in map(json.loads, open(sys.argv[1]))
     if r.get('event') == 'train' and 70 <= r['step'] <= 120]
print(round(statistics.median(v)) if v else 'none')" "$d/run/metrics.jsonl")
        echo "$b $r $tok"
        rm -rf "$d"
    done
done
