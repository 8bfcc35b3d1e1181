"""FID-scale sampling (`sample.py --num-fid-samples N --fid-npz OUT.npz`): the same .npz for 1 and 2 ranks,
resume without redoing finished shards, settings recorded, and dit.eval reading the .npz."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--num-fid-samples", "10", "--fid-shard-size", "4", "--batch-size", "2", "--steps", "2",
          "--cfg-scale", "1.5", "--seed", "3", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_DISABLE_RICH="1", PYTHONPATH=str(ROOT))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _sample(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(ROOT / "sample.py"), *COMMON, "--fid-npz", str(out), *extra])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fid1") / "samples.npz"
    _sample(out)
    return out


def test_npz_layout_and_recorded_settings(one_rank):
    with np.load(one_rank) as f:
        arr, labels, seeds = f["arr_0"], f["labels"], f["seeds"]
        settings = json.loads(str(f["settings"]))
    assert arr.dtype == np.uint8 and arr.shape == (10, 32, 32, 3)       # ADM evaluator layout, RGB
    assert (arr[..., 0] == arr[..., 2]).all()                            # 1-channel digits repeated to RGB
    assert labels.tolist() == [i % 10 for i in range(10)] and seeds.tolist() == list(range(3, 13))
    assert settings["steps"] == 2 and settings["cfg_scale"] == 1.5 and settings["num_samples"] == 10
    assert json.loads(one_rank.with_suffix(".json").read_text())["scheduler"] == settings["scheduler"]
    assert arr.std() > 5  # real images, not a constant


def test_two_cpu_ranks_write_the_identical_npz(one_rank, tmp_path):
    out = tmp_path / "samples.npz"
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", "29533", str(ROOT / "sample.py"), *COMMON, "--fid-npz", str(out)])
    assert "over 2 process(es)" in proc.stdout + proc.stderr  # one 2-rank job, not two single runs
    with np.load(one_rank) as a, np.load(out) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["labels"], b["labels"])


def test_interrupted_run_resumes_without_redoing_finished_shards(one_rank, tmp_path):
    out = tmp_path / "samples.npz"
    _sample(out)
    parts = Path(str(out) + ".parts")
    kept = parts / "shard-000000.npz"
    before = kept.stat().st_mtime_ns
    os.utime(kept, ns=(before - 10**9, before - 10**9))  # mark it: a rewrite would change the time again
    marked = kept.stat().st_mtime_ns
    # simulate an interruption: shard 2 never finished, the final file never written, a torn temp file left
    (parts / "shard-000002.npz").unlink()
    out.unlink()
    (parts / ".shard-000002.npz.tmp-1234").write_bytes(b"torn")
    proc = _sample(out)
    assert "already done" in proc.stdout + proc.stderr
    assert kept.stat().st_mtime_ns == marked                  # finished shard not redone
    with np.load(one_rank) as a, np.load(out) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "samples.npz"
    _sample(out)
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), *COMMON[:-4], "--steps", "3", "--seed", "3",
                           "--device", "cpu", "--fid-npz", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 1
    assert "steps: saved 2, now 3" in proc.stderr and "Fix:" in proc.stderr


def test_eval_computes_fid_and_kid_from_the_npz(one_rank, tmp_path):
    from PIL import Image

    from dit.eval import main as eval_main

    real = tmp_path / "real"
    real.mkdir()
    with np.load(one_rank) as f:
        for i, im in enumerate(f["arr_0"][::-1]):
            Image.fromarray(im).save(real / f"{i}.png")
    res = tmp_path / "fid.json"
    assert eval_main(["--fake", str(one_rank), "--real", str(real), "--features", "pixels",
                      "--kid-subset-size", "5", "--kid-subsets", "4", "--out", str(res), "--no-progress"]) == 0
    results = json.loads(res.read_text())
    assert results["num_fake"] == results["num_real"] == 10
    assert results["fid"] == pytest.approx(0.0, abs=1e-6)  # the same 10 images, reordered: identical statistics
    assert eval_main(["--fake", str(one_rank), "--real", str(one_rank), "--features", "pixels",
                      "--kid-subset-size", "5", "--kid-subsets", "4", "--no-progress"]) == 0
