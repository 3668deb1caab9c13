import subprocess
import sys

import pytest
import torch

import llmcore
from llmcore import backends


def test_available_backends_reports_every_family_and_reason():
    report = llmcore.available_backends()
    assert set(report) == {"norm", "cross_entropy", "attention", "rope", "swiglu", "gelu",
                           "linear"}
    cpu = report["norm"]["cpu"]
    assert cpu["torch"] == {"available": True, "reason": None}
    assert "flash_attn" in report["attention"]["cpu"]
    for family in report:
        for name, st in report[family]["cpu"].items():
            if name == "auto":
                assert st in backends.BACKENDS
            elif not st["available"]:
                assert isinstance(st["reason"], str) and st["reason"]
    fa = report["attention"]["cpu"]["flash_attn"]
    assert not fa["available"] and fa["reason"]


def test_auto_on_cpu_never_picks_the_interpreter():
    for family in backends.FAMILIES:
        assert backends.resolve(family, "auto", "cpu") in ("native", "torch")


def test_import_prints_nothing_and_needs_no_extension():
    code = ("import sys; sys.modules['llmcore._native'] = None; import llmcore; "
            "assert llmcore.available_backends()['norm']['cpu']['native']['available'] is False")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""


def test_cli_info_runs():
    res = subprocess.run([sys.executable, "-m", "llmcore", "info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"torch {torch.__version__}" in res.stdout
    assert "norm / cpu: auto ->" in res.stdout


def test_native_attention_is_cpu_only(monkeypatch):
    monkeypatch.setattr(backends, "_native_has_cuda", lambda: True)
    if backends.native_module() is None:
        pytest.skip("llmcore._native is not built here")
    assert backends._why_not("attention", "native", "cuda").startswith("llmcore._native has no CUDA")
    assert backends._why_not("norm", "native", "cuda") is None
