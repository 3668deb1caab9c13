"""The training commands end to end on the real model (tiny shapes): pretrain CLM and MLM,
finetune from a pretrain run and from scratch, evaluate, generate, resume after kill -9,
torchrun with 2 processes, and clear one-line errors for user mistakes."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmcore.cli import main

WORDS = ("alpha beta gamma delta return value file object stream open close read write "
         "socket thread lock queue path string bytes").split()
TINY = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--set", "eval_batches=2", "--no-progress", "--batch-size", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(50)) + "." for _ in range(300)]
    p = tmp_path_factory.mktemp("data") / "docs.txt"
    p.write_text("\n\n\n".join(docs))
    return p


@pytest.fixture(scope="module")
def classify_files(tmp_path_factory):
    """A task a model can learn: the label says which of two word groups dominates."""
    rng = random.Random(1)
    d = tmp_path_factory.mktemp("cls")
    groups = {"io": WORDS[4:12], "concurrency": WORDS[12:]}
    for name, n in (("train", 120), ("eval", 40)):
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                label = rng.choice(sorted(groups))
                text = " ".join(rng.choice(groups[label]) for _ in range(12))
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    return d / "train.jsonl", d / "eval.jsonl"


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("runs") / "clm"
    rc = main(["pretrain", "--data", str(corpus_file), "--out", str(out), "--max-steps", "8",
               "--eval-every", "4", "--seq-len", "32", "--vocab-size", "300", *TINY])
    assert rc == 0
    return out


def test_pretrain_clm_outputs(clm_run, capsys):
    s = json.loads((clm_run / "summary.json").read_text())
    for k in ("steps", "tokens", "wall_seconds", "final_train_loss", "eval_loss",
              "eval_perplexity", "device", "backends"):
        assert s.get(k) is not None, k
    assert s["steps"] == 8 and s["tokens"] == 8 * 4 * 32
    assert s["eval_loss"] < s["initial_eval_loss"]
    for f in ("final/model.safetensors", "final/config.json", "final/tokenizer.json",
              "loss.png", "metrics.jsonl", "checkpoints"):
        assert (clm_run / f).exists(), f
    events = [json.loads(x) for x in (clm_run / "metrics.jsonl").open()]
    assert {e["event"] for e in events} == {"train", "eval"}
    assert all("step" in e and ("loss" in e or "eval_loss" in e) for e in events)


def test_evaluate_and_generate(clm_run, corpus_file, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--run", str(clm_run)]) == 0
    m = json.loads(capsys.readouterr().out)
    s = json.loads((clm_run / "summary.json").read_text())
    assert m["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-5)
    small = clm_run.parent / "small.txt"
    small.write_text(corpus_file.read_text()[:3000])
    assert main(["evaluate", "--run", str(clm_run), "--data", str(small), "--batch-size",
                 "32"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_perplexity"] > 1
    assert main(["generate", "--run", str(clm_run), "--prompt", "open the", "--max-new-tokens",
                 "5", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("open the") and len(text.strip()) > len("open the")
    # greedy is deterministic
    main(["generate", "--run", str(clm_run), "--prompt", "open the", "--max-new-tokens", "5",
          "--temperature", "0"])
    assert capsys.readouterr().out == text


def test_pretrain_mlm(tmp_path, corpus_file, capsys):
    out = tmp_path / "mlm"
    assert main(["pretrain", "--objective", "mlm", "--data", str(corpus_file), "--out", str(out),
                 "--max-steps", "4", "--eval-every", "2", "--seq-len", "32", "--vocab-size",
                 "300", *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "mlm" and s["steps"] == 4 and s["eval_loss"] is not None
    assert json.loads((out / "final/config.json").read_text())["head"] == "mlm"
    capsys.readouterr()
    assert main(["generate", "--run", str(out), "--prompt", "x"]) == 2
    assert "needs a causal LM run" in capsys.readouterr().err


def test_finetune_from_pretrain_and_scratch(tmp_path, clm_run, classify_files, capsys):
    train, evals = classify_files
    common = ["--data", str(train), "--eval-data", str(evals), "--max-steps", "12",
              "--eval-every", "6", "--max-length", "24", *TINY]
    out = tmp_path / "ft"
    assert main(["finetune", "--init", str(clm_run), "--out", str(out), *common]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["init"] == str(clm_run) and 0.0 <= s["eval_accuracy"] <= 1.0
    assert json.loads((out / "final/label_map.json").read_text()) == {"concurrency": 0, "io": 1}
    cfg = json.loads((out / "final/config.json").read_text())
    assert cfg["head"] == "seq_cls" and cfg["num_labels"] == 2
    assert "eval_accuracy" in capsys.readouterr().out
    # evaluate the fine-tuned run on a file, and a label it never saw
    assert main(["evaluate", "--run", str(out), "--data", str(evals)]) == 0
    assert json.loads(capsys.readouterr().out)["eval_accuracy"] == pytest.approx(
        s["eval_accuracy"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "open", "label": "io"}\n{"text": "x", "label": "network"}\n')
    assert main(["evaluate", "--run", str(out), "--data", str(bad)]) == 2
    assert "bad.jsonl:2: label 'network' was not seen in training" in capsys.readouterr().err
    # from scratch, same architecture and tokenizer as the init
    scratch = tmp_path / "scratch"
    assert main(["finetune", "--init", str(clm_run), "--from-scratch", "--out", str(scratch),
                 *common]) == 0
    assert json.loads((scratch / "summary.json").read_text())["init"] == "scratch"


def test_finetune_token_classification(tmp_path, clm_run):
    rng = random.Random(2)
    p = tmp_path / "tags.jsonl"
    with open(p, "w") as f:
        for _ in range(60):
            words = [rng.choice(WORDS) for _ in range(8)]
            tags = ["IO" if w in WORDS[4:12] else "O" for w in words]
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    out = tmp_path / "tok"
    assert main(["finetune", "--task", "tokens", "--init", str(clm_run), "--data", str(p),
                 "--out", str(out), "--max-steps", "4", "--set", "eval_fraction=0.3",
                 *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "tokens" and s["eval_accuracy"] is not None


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_user_errors_are_one_line(tmp_path, clm_run, corpus_file, capsys):
    assert "already exists; pass --resume" in _err(
        capsys, ["pretrain", "--data", str(corpus_file), "--out", str(clm_run)])
    assert "does not exist" in _err(
        capsys, ["pretrain", "--data", str(tmp_path / "missing.txt"), "--out",
                 str(tmp_path / "o1")])
    assert not (tmp_path / "o1").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n')
    assert "bad.jsonl:2: not valid JSON" in _err(
        capsys, ["finetune", "--from-scratch", "--data", str(bad), "--out", str(tmp_path / "o2")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write to the output directory" in _err(
        capsys, ["pretrain", "--data", str(corpus_file), "--out", str(blocker / "run")])
    assert "--resume needs --out" in _err(capsys, ["pretrain", "--resume"])
    assert "no final model" in _err(capsys, ["generate", "--run", str(tmp_path)])
    assert "lr: cannot read 'x' as float" in _err(
        capsys, ["pretrain", "--set", "lr=x", "--out", str(tmp_path / "o3")])
    notrun = tmp_path / "notrun"
    notrun.mkdir()
    (notrun / "precious.txt").write_text("keep me")
    assert "does not look like an llmcore run" in _err(
        capsys, ["pretrain", "--data", str(corpus_file), "--out", str(notrun), "--overwrite"])
    assert (notrun / "precious.txt").exists()


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMCORE_BACKEND": "torch"}
    return subprocess.Popen([sys.executable, "-m", "llmcore", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "final" / "model.safetensors"))


def _losses(run: Path) -> list:
    return [(e["step"], e.get("loss"), e.get("eval_loss"))
            for e in map(json.loads, (run / "metrics.jsonl").open())]


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path, corpus_file):
    args = ["pretrain", "--data", str(corpus_file), "--max-steps", "16", "--save-every", "2",
            "--eval-every", "5", "--seq-len", "32", "--vocab-size", "300", "--deterministic",
            "--set", "dropout=0.1", *TINY]
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = _run([*args, "--out", str(full)])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    p = _run([*args, "--out", str(cut)])
    deadline = time.time() + 300
    while not list((cut / "checkpoints").glob("step-*/manifest.json")):
        assert p.poll() is None and time.time() < deadline, "finished before the kill"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "final").exists()
    p = _run(["pretrain", "--out", str(cut), "--resume"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "resumed from step" in err
    a, b = _weights(full), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(full) == _losses(cut)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, corpus_file):
    # 2 micro-batches per rank: DDP's no_sync accumulation is exercised too
    args = ["pretrain", "--data", str(corpus_file), "--max-steps", "6", "--eval-every", "3",
            "--seq-len", "32", "--vocab-size", "300", "--deterministic", "--grad-accum", "2",
            *TINY]
    one, two = tmp_path / "one", tmp_path / "two"
    p = _run([*args, "--out", str(one)])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMCORE_BACKEND": "torch"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "llmcore", *args, "--out", str(two)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["tokens"] == s2["tokens"]
    for (st1, *v1), (st2, *v2) in zip(_losses(one), _losses(two), strict=True):
        assert st1 == st2
        for x, y in zip(v1, v2):
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-4))
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_finetune_from_hf_checkpoint(tmp_path, clm_run, classify_files):
    """--init hf:PATH: a Hugging Face GPT-2 directory (random weights, no download) with a
    tokenizer.json beside it."""
    transformers = pytest.importorskip("transformers")
    from llmcore.data import Tokenizer

    tok = Tokenizer.load(clm_run / "final")
    hf_dir = tmp_path / "hf-gpt2"
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2,
                                  n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf_dir)
    tok.save(hf_dir)
    train, evals = classify_files
    out = tmp_path / "ft-hf"
    assert main(["finetune", "--init", f"hf:{hf_dir}", "--data", str(train), "--eval-data",
                 str(evals), "--out", str(out), "--max-steps", "3", "--max-length", "24",
                 *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["init"] == f"hf:{hf_dir}" and s["eval_accuracy"] is not None
    assert json.loads((out / "final/config.json").read_text())["dim"] == 32
