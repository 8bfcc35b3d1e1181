"""The shipped FSDP config and checkpoint layouts across launch modes, on this CPU machine.

FSDP itself needs GPUs (torch's FSDP and Accelerate's plugin both refuse CPU-only machines), so here:
the config parses and is refused with one clear error naming the fix, a checkpoint's launch layout is
recorded, resuming across layouts (FSDP <-> DDP/single) is refused with the way to continue, and that
way (--init-from a training checkpoint) works. The FSDP run itself is in scripts/gpu_checks.sh."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dit.training import list_checkpoints, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--model", "DiT-Micro/4", "--image-size", "16", "--batch-size", "8",
        "--sample-steps", "2", "--no-preview"]


def test_fsdp_config_wraps_the_studio_blocks():
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_xl.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_use_orig_params"] is True
    import dit.dynamic
    import dit.model

    for name in cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert hasattr(dit.model, name) or hasattr(dit.dynamic, name), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fsdp_on_cpu_is_one_clear_error(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_xl.yaml").read_text())
    cfg.update(num_processes=2, mixed_precision="no")
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_DISABLE_RICH="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
                           "--main_process_port", "29547", str(ROOT / "train.py"), *TINY, "--max-steps", "2",
                           "--output-dir", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: FSDP needs GPUs")]
    assert len(errors) == 2  # one line per rank, naming the fix
    assert "--multi_gpu" in errors[0] and "Traceback" not in proc.stderr.split("error: FSDP")[0]


def test_resume_across_launch_layouts_is_refused_and_init_from_continues(tmp_path):
    out = tmp_path / "run"
    train(parse_args(TINY + ["--max-steps", "2", "--checkpointing-steps", "2", "--output-dir", str(out)]))
    ckpt = list_checkpoints(out)[-1]
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["distributed"] == "DDP/single" and state["num_processes"] == 1
    state["distributed"] = "FSDP"  # as if written under the FSDP config
    (ckpt / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"saved under FSDP, this run is DDP/single.*Fix:.*--init-from"):
        train(parse_args(TINY + ["--max-steps", "4", "--output-dir", str(out), "--resume-from", "latest"]))
    # the way the message names: a new run initialised from the checkpoint's weights
    from safetensors.torch import load_file

    new = tmp_path / "continued"
    export = train(parse_args(TINY + ["--max-steps", "1", "--output-dir", str(new), "--init-from", str(ckpt),
                                      "--lr", "1e-12", "--ema-decay", "0"]))
    before = load_file(str(ckpt / "model.safetensors"))
    after = load_file(str(export / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
