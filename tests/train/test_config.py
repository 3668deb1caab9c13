"""TrainConfig: presets, typed overrides, validation, save/load, the CLI merge rule."""
import pytest

from llmcore.train import config as C


def test_presets_and_roundtrip(tmp_path):
    for name in C.PRESETS:
        cfg = C.preset(name)
        cfg.save(tmp_path / f"{name}.json")
        assert C.TrainConfig.load(tmp_path / f"{name}.json") == cfg
    assert C.preset("pretrain-mlm").task == "mlm"
    with pytest.raises(ValueError, match="unknown training preset"):
        C.preset("nope")


def test_string_overrides_are_typed():
    cfg = C.apply_overrides(C.pretrain_clm(), C.parse_overrides(
        ["lr=3e-4", "max_steps=7", "deterministic=true", "dropout=none", "data=a.txt,b.txt",
         "model.dim=64", "epochs=1.5"]))
    assert (cfg.lr, cfg.max_steps, cfg.deterministic, cfg.dropout) == (3e-4, 7, True, None)
    assert cfg.data == ["a.txt", "b.txt"] and cfg.epochs == 1.5
    assert cfg.model["dim"] == 64 and cfg.model["n_layers"] == 4      # merged, not replaced


@pytest.mark.parametrize("items, match", [
    (["nope=1"], "unknown training option"),
    (["lr=fast"], "lr: cannot read 'fast' as float"),
    (["deterministic=maybe"], "cannot read 'maybe' as bool"),
    (["max_steps=0"], "max_steps must be an int >= 1"),
    (["schedule=step"], "schedule must be one of"),
    (["lr"], "must look like key=value"),
])
def test_bad_overrides(items, match):
    with pytest.raises(ValueError, match=match):
        C.apply_overrides(C.pretrain_clm(), C.parse_overrides(items))


def test_from_cli_resume_reads_the_saved_config(tmp_path):
    cfg = C.from_cli("pretrain-clm", {"out": str(tmp_path), "lr": 1e-4, "max_steps": None})
    assert cfg.lr == 1e-4 and cfg.max_steps == C.pretrain_clm().max_steps
    cfg.replace(max_steps=3).save(tmp_path / "config.json")
    resumed = C.from_cli("pretrain-clm", {"out": str(tmp_path), "max_steps": 9}, resume=True)
    assert resumed.lr == 1e-4 and resumed.max_steps == 9
    with pytest.raises(ValueError, match="--resume needs --out"):
        C.from_cli("pretrain-clm", {}, resume=True)
    with pytest.raises(ValueError, match="no llmcore run to resume"):
        C.from_cli("pretrain-clm", {"out": str(tmp_path / "x")}, resume=True)
