"""Grafting (dit.graft): layer specs, replacement, stage-1 distillation, the stage-1 file, restructuring, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit.attention import BlockContext
from dit.graft import GraftError, LayerSpecError, Replacement, build_grafted, graft_config, parse_layers
from dit.graft.distill import distill_units, load_stage1, record_activations, save_stage1
from dit.graft.replace import restructure_config, source_config, units_for, unit_forward
from dit.model import DiT
from dit.schedulers import get_objective

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=4, num_classes=10,
            learn_sigma=False)


def tiny_source(seed: int = 0) -> DiT:
    """A tiny DiT whose blocks all contribute (adaLN-Zero would make every update zero at init)."""
    torch.manual_seed(seed)
    model = DiT(**TINY)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval().requires_grad_(False)


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=gen).clamp(-1, 1), torch.randint(0, 10, (n,), generator=gen)


# ------------------------------------------------------------------ layer specs and replacement specs
@pytest.mark.parametrize("spec,depth,expected", [
    ("all", 4, [0, 1, 2, 3]), ("odd", 8, [1, 3, 5, 7]), ("even", 5, [0, 2, 4]), ("0-2", 8, [0, 1, 2]),
    ("3,7,9", 10, [3, 7, 9]), ("0-1,5", 8, [0, 1, 5]), ("50%", 8, [1, 3, 5, 7]), ("75%", 8, [1, 2, 3, 5, 6, 7]),
    ("50%", 28, list(range(1, 28, 2))), ("100%", 3, [0, 1, 2]), (" ODD ", 4, [1, 3])])
def test_layer_specs(spec: str, depth: int, expected: list[int]) -> None:
    assert parse_layers(spec, depth) == expected


@pytest.mark.parametrize("spec,match", [("8", "out of range.*0-7"), ("2-9", "out of range"), ("", "selects no block"),
                                        ("5%", "selects no block"), ("150%", r"\(0, 100\]"), ("x", "cannot read"),
                                        ("5-2", "backwards")])
def test_layer_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(LayerSpecError, match=match):
        parse_layers(spec, 8)


def test_replacement_specs() -> None:
    assert Replacement.parse("attention=window").operator == "window"
    rep = Replacement.parse("mlp=mlp:6")
    assert (rep.kind, rep.operator, rep.ratio) == ("mlp", "mlp", 6.0)
    with pytest.raises(GraftError, match="valid: .*linear"):
        Replacement.parse("attention=nope")
    with pytest.raises(GraftError, match="KIND=OPERATOR"):
        Replacement.parse("linear")


def test_graft_config_per_block_and_weights_copied() -> None:
    src = tiny_source()
    cfg = graft_config(source_config(src), [Replacement.parse("attention=linear"), Replacement.parse("mlp=mlp:2")],
                       [1, 3])
    assert cfg["attention"] == ["softmax", "linear", "softmax", "linear"]
    assert cfg["mlp_ratio"] == [4.0, 2.0, 4.0, 2.0]
    units = units_for([1, 3], [Replacement.parse("attention=linear"), Replacement.parse("mlp=mlp:2")], False, 4)
    model, info = build_grafted(src, cfg, units)
    assert model.blocks[1].mlp.fc1.out_features == 64
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)  # inherited by shape
    assert "blocks.1.mlp.fc1.weight" in info["fresh"]


# ------------------------------------------------------------------ stage 1
def _distil(op: str, init: str, steps: int) -> tuple[dict, dict]:
    src = tiny_source()
    layers = [0, 1, 2, 3]
    reps = [Replacement.parse(f"attention={op}")]
    cfg = graft_config(source_config(src), reps, layers, {"window_size": 3})
    units = units_for(layers, reps, False, 4)
    model, _ = build_grafted(src, cfg, units, init, seed=1)
    images, labels = data()
    cache = record_activations(src, units, images, labels, get_objective("flow"), 256, batch_size=64, progress=False,
                               log=lambda m: None)
    out = distill_units(model, units, cache, (4, 4), steps, batch_size=64, lr=3e-3, progress=False, log=lambda m: None)
    return out, {"model": model, "units": units, "cache": cache, "src": src}


def test_stage1_makes_the_new_operator_reproduce_the_original() -> None:
    out, _ = _distil("linear", "random", 100)
    for row in out["units"]:
        assert row["after"]["relative_l1"] < 0.6 * row["before"]["relative_l1"], row
        assert row["after"]["mse"] < 0.5 * row["before"]["mse"], row


def test_self_graft_softmax_reinitialised_recovers_the_original() -> None:
    out, ctx = _distil("softmax", "random", 200)  # held-out cached samples: the table's numbers
    for row in out["units"]:
        assert row["before"]["relative_l1"] > 0.5                       # re-initialised: far from the original
        assert row["after"]["relative_l1"] < min(0.2, 0.15 * row["before"]["relative_l1"]), row
    # the grafted model, as a whole, is close to the original again on the cached (held-out) distribution
    assert ctx["model"].blocks[2].attn.name == "softmax"


def test_stage1_file_loads_or_fails_loudly_naming_the_key(tmp_path: Path) -> None:
    src = tiny_source()
    reps = [Replacement.parse("attention=window")]
    cfg = graft_config(source_config(src), reps, [1, 3], {"window_size": 3})
    units = units_for([1, 3], reps, False, 4)
    model, _ = build_grafted(src, cfg, units, "random")
    path = save_stage1(model, units, tmp_path / "s1.safetensors", "abc", cfg)
    fresh, _ = build_grafted(src, cfg, units, "random", seed=5)
    load_stage1(fresh, units, path, "abc")
    torch.testing.assert_close(fresh.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    with pytest.raises(GraftError, match="another model"):
        load_stage1(fresh, units, path, "other")
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    del tensors["blocks.3.attn.proj.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(GraftError, match=r"missing key 'blocks.3.attn.proj.weight'"):
        load_stage1(fresh, units, tmp_path / "missing.safetensors")
    tensors["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    tensors["blocks.3.attn.proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(GraftError, match=r"unexpected key 'blocks.9.attn.qkv.weight'.*\n.*blocks.3.attn.proj.weight"):
        load_stage1(fresh, units, tmp_path / "bad.safetensors")


# ------------------------------------------------------------------ restructure
def test_restructure_halves_depth_starts_from_the_pair_and_samples(tmp_path: Path) -> None:
    from dit.schedulers import sample

    src = tiny_source()
    cfg = restructure_config(source_config(src))
    units = units_for(list(range(4)), [], True, 4)
    model, _ = build_grafted(src, cfg, units)
    assert len(model.blocks) == 2 and model.config.parallel_branches == 2
    torch.testing.assert_close(model.blocks[1].branches[1].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    model.save_pretrained(tmp_path / "par")
    loaded = DiT.from_pretrained(tmp_path / "par").eval()
    x = sample(loaded, torch.tensor([1, 2]), [0, 1], (1, 8, 8), "flow-euler", 3, 2.0, "flow", False, 10, progress=False)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(GraftError, match="odd number"):
        restructure_config({**source_config(src), "depth": 3})


def test_stratified_timesteps_cover_every_stratum_over_the_global_batch() -> None:
    from dit.dynamic import stratify_timesteps

    sigmas = []
    for rank in range(4):  # per-rank batch 1: per-rank stratification would only ever draw stratum 0
        objective = stratify_timesteps(get_objective("flow"), 4, batch_size=1, rank=rank, world=4)
        sigmas.append(float(objective.sample_sigmas(1, torch.device("cpu"))))
    assert sorted(int(s * 4) for s in sigmas) == [0, 1, 2, 3]


# ------------------------------------------------------------------ CLI, end to end (tiny, a few steps)
def tiny_digits_checkpoint(folder: Path) -> Path:
    """A tiny digits-shaped checkpoint (16 tokens) that says it was trained for 40 steps at batch 8."""
    from dit.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=10,
                learn_sigma=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.normal_(0, 0.05)
    meta = {"objective": "flow", "default_scheduler": "flow-euler", "default_steps": 4, "default_cfg_scale": 2.0,
            "data": "digits", "training": {"steps": 40, "command": "python train.py --batch-size 8"}}
    return save_checkpoint(model, folder, meta)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return tiny_digits_checkpoint(tmp_path / "src")


def test_cli_grafts_end_to_end_and_refuses_bad_input(tiny_checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    from dit.graft.__main__ import main

    before = {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()}
    out = tmp_path / "out"
    assert main([str(tiny_checkpoint), str(out), "--replace", "attention=window", "--options",
                 '{"window_size": 3}', "--layers", "odd", "--stage1-samples", "32", "--stage1-batch-size", "16",
                 "--no-eval", "--no-bench", "--no-progress"]) == 0
    report = json.loads((out / "graft_report.json").read_text())
    assert report["compute"]["stage1_steps"] + report["compute"]["stage2_steps"] == 4  # 10% of 40 steps
    assert report["layout"]["grafted"][1]["attention"] == "window"
    assert (out / "model_card.md").exists() and (out / "stage1" / "graft_stage1.safetensors").exists()
    model = DiT.from_pretrained(out)
    assert model.block_attention == ["softmax", "window"]
    # bad input: clear errors, nothing written, the source untouched
    assert main([str(tiny_checkpoint), str(out), "--replace", "attention=linear"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([str(tiny_checkpoint), str(tmp_path / "o2"), "--replace", "attention=linear", "--layers", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([str(tiny_checkpoint), str(tmp_path / "o3"), "--replace", "attention=window",
                 "--options", '{"window_size": 4}']) == 2
    assert "cannot take this model's blocks" in capsys.readouterr().err
    assert main([str(tiny_checkpoint), str(tmp_path / "o4"), "--replace", "attention=window",
                 "--stage1", str(tmp_path / "nope.safetensors")]) == 2
    studio = tiny_checkpoint / "studio.json"
    no_data = tmp_path / "no-data"
    no_data.mkdir()
    for f in tiny_checkpoint.iterdir():
        (no_data / f.name).write_bytes(f.read_bytes())
    (no_data / "studio.json").write_text(json.dumps({**json.loads(studio.read_text()), "data": None}))
    assert main([str(no_data), str(tmp_path / "o5"), "--replace", "attention=linear"]) == 2
    assert "names no training data" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in (2, 3, 4, 5))
    assert {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()} == before


def test_cli_adds_dydit_routers_to_a_trained_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from dit.dynamic import DynamicDiTBlock
    from dit.graft.__main__ import main

    out = tmp_path / "dyn"
    assert main([str(tiny_checkpoint), str(out), "--dynamic", '{"target": 0.7}', "--eval-per-class", "2",
                 "--no-bench", "--no-progress"]) == 0
    model = DiT.from_pretrained(out)
    assert model.config.dynamic["target"] == 0.7 and isinstance(model.blocks[0], DynamicDiTBlock)
    report = json.loads((out / "graft_report.json").read_text())
    assert report["compute"]["stage1_steps"] == 0 and report["compute"]["stage2_steps"] == 4
    assert "--stratify-timesteps 4" in report["stage2"]["command"]
    assert 0 < report["dynamic"]["block_flops_ratio"] <= 1 and "grafted" in report["quality"]
