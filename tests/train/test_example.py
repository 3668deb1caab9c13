"""Smoke test: examples/pretrain_custom.py runs a few steps and writes a run."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pretrain_custom_example(tmp_path):
    rng = random.Random(0)
    words = "open read write close file stream socket thread lock path".split()
    data = tmp_path / "docs.txt"
    data.write_text("\n\n\n".join(" ".join(rng.choice(words) for _ in range(40))
                                  for _ in range(200)))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrain_custom.py"),
                        "--data", str(data), "--out", str(out), "--max-steps", "4",
                        "--seq-len", "16", "--vocab-size", "300"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval loss" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and (out / "final" / "model.safetensors").is_file()
