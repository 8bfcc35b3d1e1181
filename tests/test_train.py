"""train.py: loss falls, exact resume, 2-rank Accelerate job, NaN guard, bad data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit.training import list_checkpoints, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--model", "DiT-Micro/4", "--image-size", "16", "--batch-size", "16",
        "--sample-steps", "4", "--lr", "1e-3", "--ema-decay", "0.9"]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def test_short_digits_run_loss_falls_and_exports(tmp_path):
    out = tmp_path / "run"
    export = train(parse_args(TINY + ["--max-steps", "80", "--log-every", "10", "--checkpointing-steps", "40",
                                      "--output-dir", str(out)]))
    curve = losses(out)
    assert curve[80] < 0.6 * curve[10], curve
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-40", "checkpoint-80"]
    assert (export / "config.json").exists() and (export / "studio.json").exists()
    assert (out / "samples" / "step-0000080.png").exists()
    from dit.model import DiT

    model = DiT.from_pretrained(export)
    assert model.config.num_classes == 10 and model.config.input_size == 16


def test_resume_continues_step_count_and_matches_uninterrupted_run(tmp_path):
    common = TINY + ["--log-every", "1", "--checkpointing-steps", "5", "--lr-warmup-steps", "8"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(parse_args(common + ["--max-steps", "12", "--output-dir", str(full)]))
    train(parse_args(common + ["--max-steps", "5", "--output-dir", str(part)]))
    train(parse_args(common + ["--max-steps", "12", "--output-dir", str(part), "--resume-from", "latest"]))
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 13))  # the step count continued from 5, not from 0
    for step in range(6, 13):  # same batches, noise, LR schedule, optimizer state
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    from safetensors.torch import load_file

    ema_a = load_file(str(full / "checkpoint-12" / "ema.safetensors"))
    ema_b = load_file(str(part / "checkpoint-12" / "ema.safetensors"))
    assert all(torch.allclose(ema_a[k], ema_b[k], atol=1e-6) for k in ema_a)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    args = parse_args(TINY + ["--max-steps", "40", "--checkpointing-steps", "2", "--output-dir", str(out),
                              "--lr", "1e12", "--max-grad-norm", "0", "--log-every", "1"])
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+.*last good checkpoint"):
        train(args)
    ckpts = list_checkpoints(out)
    assert ckpts, "a checkpoint written before the failure must survive"
    assert not list(out.glob(".checkpoint-*.tmp"))


def _write_folder(root: Path, corrupt: bool) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")


def test_image_folder_bad_images_listed_or_skipped(tmp_path):
    data = tmp_path / "data"
    _write_folder(data, corrupt=True)
    base = ["--data", str(data), "--model", "DiT-Micro/4", "--image-size", "16", "--batch-size", "4",
            "--max-steps", "2", "--sample-steps", "2", "--output-dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"(?s)1 unreadable or corrupt image.*broken\.png.*--skip-bad-images"):
        train(parse_args(base))
    export = train(parse_args(base + ["--skip-bad-images"]))
    meta = json.loads((export / "studio.json").read_text())
    assert meta["class_names"] == ["cats", "dogs"]


def test_empty_dataset_and_bad_arguments(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        train(parse_args(["--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")]))
    with pytest.raises(ValueError, match="Unknown model preset 'DiT-Q/3'.*DiT-S/2"):
        train(parse_args(["--model", "DiT-Q/3", "--output-dir", str(tmp_path / "o2")]))
    with pytest.raises(SystemExit):
        parse_args(["--objective", "flow", "--sample-scheduler", "ddpm"])
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        train(parse_args(TINY + ["--resume-from", str(tmp_path), "--output-dir", str(tmp_path / "o3")]))


def test_flow_objective_trains(tmp_path):
    out = tmp_path / "flow"
    train(parse_args(TINY + ["--objective", "flow", "--max-steps", "40", "--log-every", "10",
                             "--output-dir", str(out)]))
    curve = losses(out)
    assert curve[40] < curve[10]
    meta = json.loads((out / "final" / "studio.json").read_text())
    assert meta["objective"] == "flow" and meta["default_scheduler"] == "flow-euler"


@pytest.mark.slow
def test_two_rank_accelerate_launch_is_one_job(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on this CPU machine: one gloo job of world size 2."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_DISABLE_RICH="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(ROOT / "train.py"), *TINY, "--max-steps", "6", "--log-every", "2", "--checkpointing-steps", "3",
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert {m["num_processes"] for m in metrics if "num_processes" in m} == {2}
    final = [m for m in metrics if "param_checksums" in m][-1]["param_checksums"]
    # Ranks saw different batches and noise; identical weights prove gradients were all-reduced every step.
    assert len(final) == 2 and final[0] == final[1]
    assert sorted(p.name for p in (out / "checkpoint-6").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_resume_with_different_variant_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    train(parse_args(TINY + ["--max-steps", "2", "--checkpointing-steps", "2", "--output-dir", str(out)]))
    with pytest.raises(ValueError, match=r"(?s)different settings.*--attention: checkpoint 'softmax', now 'linear'"):
        train(parse_args(TINY + ["--max-steps", "4", "--attention", "linear", "--output-dir", str(out),
                                 "--resume-from", "latest"]))


def test_latent_training_with_a_local_vae_and_sampling_from_the_export(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from dit.cli.sample import main as sample_main

    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=16).save_pretrained(vae_dir)
    data = tmp_path / "data"
    _write_folder(data, corrupt=False)
    out = tmp_path / "latent"
    export = train(parse_args(["--data", str(data), "--vae", str(vae_dir), "--image-size", "16",
                               "--model", "DiT-Micro/4", "--batch-size", "4", "--max-steps", "3",
                               "--sample-steps", "2", "--output-dir", str(out)]))
    assert (out / "latents.safetensors").exists()
    from dit.model import DiT

    model = DiT.from_pretrained(export)
    assert model.config.in_channels == 4 and model.config.input_size == 8  # 16 px through a 2x VAE
    samples = tmp_path / "samples"
    sample_main(["--checkpoint", str(export), "--steps", "2", "--output", str(samples), "--no-grid"])
    with Image.open(samples / "0000-class0-seed0.png") as im:
        assert im.size == (16, 16) and im.mode == "RGB"
        first = np.asarray(im)
    # --compile: the model and the VAE are warmed up first (reported apart); the image is the same
    monkeypatch.setenv("DIT_COMPILE_BACKEND", "aot_eager")
    sample_main(["--checkpoint", str(export), "--steps", "2", "--output", str(tmp_path / "compiled"), "--no-grid",
                 "--compile"])
    with Image.open(tmp_path / "compiled" / "0000-class0-seed0.png") as im:
        assert np.array_equal(np.asarray(im), first)


def test_gradient_checkpointing_gives_the_same_gradients():
    from dit.model import DiT

    torch.manual_seed(0)
    m = DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            class_dropout_prob=0.0)
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 600]), torch.tensor([1, 2])
    m.train()
    m(x, t, y).square().mean().backward()
    ref = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    m.zero_grad()
    m.enable_gradient_checkpointing()
    assert m.gradient_checkpointing
    m(x, t, y).square().mean().backward()
    got = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref, got))


def test_linear_student_inherits_from_softmax_teacher_and_distils(tmp_path):
    teacher = train(parse_args(TINY + ["--max-steps", "30", "--output-dir", str(tmp_path / "teacher")]))
    student = TINY + ["--max-steps", "15", "--log-every", "15", "--attention", "linear", "--init-from",
                      str(teacher), "--init-attention", "none", "--teacher", str(teacher)]
    final = {}
    for name, weight in (("plain", "0"), ("distilled", "5")):
        export = train(parse_args(student + ["--distill-eps", weight, "--distill-var", weight,
                                             "--output-dir", str(tmp_path / name)]))
        final[name] = [m for m in read_metrics(tmp_path / name) if "loss" in m][-1]
    # the distillation term pulls the student's outputs toward the teacher's
    assert final["distilled"]["distill_eps"] < final["plain"]["distill_eps"]
    from safetensors.torch import load_file

    from dit.checkpoint import weights_file

    t, s = load_file(str(weights_file(teacher))), load_file(str(weights_file(export)))
    assert json.loads((export / "config.json").read_text())["attention"] == "linear"
    assert "blocks.0.attn.dwc.weight" in s and "blocks.0.attn.dwc.weight" not in t
