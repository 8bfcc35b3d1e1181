"""Bad input to sample.py / train.py: one readable error line, nothing overwritten (found on a fresh-clone review)."""
from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dit.cli.sample import main as sample_main
from dit.training import TRAIN_STATE_FILE, resolve_resume


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        sample_main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_steps_zero_is_refused_not_replaced_by_default(capsys, tmp_path):
    line = _error_line(capsys, ["--steps", "0", "--labels", "1", "--output", str(tmp_path / "o")])
    assert "--steps must be at least 1" in line
    assert not (tmp_path / "o").exists()


def test_params_from_a_non_image(capsys, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert "cannot read" in _error_line(capsys, ["--params-from", str(bad), "--output", str(tmp_path / "o")])


def test_params_from_an_adapter_image_needs_the_adapter(capsys, tmp_path):
    params = {"class_label": 1, "seed": 0, "steps": 2, "cfg_scale": 2.0, "scheduler": "flow-euler",
              "model": "dit-digits", "extras": {"adapters": [{"file": "adapter.safetensors", "scale": 0.5,
                                                             "sha256": "abc"}]}}
    info = PngInfo()
    info.add_text("parameters", json.dumps(params))
    png = tmp_path / "img.png"
    Image.new("L", (4, 4)).save(png, pnginfo=info)
    line = _error_line(capsys, ["--params-from", str(png), "--output", str(tmp_path / "o")])
    assert "adapter.safetensors" in line and "--adapter" in line


def test_output_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "x.npz"
    f.write_bytes(b"keep me")
    assert "is a file" in _error_line(capsys, ["--labels", "1", "--steps", "1", "--output", str(f)])
    assert f.read_bytes() == b"keep me"


def test_fresh_training_run_refuses_a_folder_with_checkpoints(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / TRAIN_STATE_FILE).write_text("{}")
    with pytest.raises(ValueError, match="--resume-from latest"):
        resolve_resume(argparse.Namespace(resume_from=None, output_dir=str(tmp_path)))
    assert resolve_resume(argparse.Namespace(resume_from=None, output_dir=str(tmp_path / "new"))) is None
