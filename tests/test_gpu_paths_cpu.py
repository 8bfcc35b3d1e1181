"""The GPU-oriented code paths, checked on the CPU: the sync-free non-finite guard, the multi-tensor EMA,
cost-proportional previews, mask-free shifted windows, the bf16 linear-attention kernel, xformers' one-line
error, and `python -m dit.bench gpu` refusing (or dry-running) without CUDA."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit.attention import build_attention
from dit.attention.linear import linear_attention_kernel, linear_attention_kernel_bf16
from dit.attention.proxy import shift_region_mask, window_layout, window_partition
from dit.ema import EMA
from dit.nonfinite import NonFiniteGuard
from dit.training import parse_args, preview_plan, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--model", "DiT-Micro/4", "--image-size", "16", "--batch-size", "16",
        "--sample-steps", "4", "--lr", "1e-3", "--ema-decay", "0.9"]


# ---------------------------------------------------------------- guard and EMA
def test_guard_skips_a_poisoned_step_on_the_device_and_reports_it_later():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    ema = EMA(model, 0.5)
    guard = NonFiniteGuard(opt, torch.device("cpu"))
    x = torch.randn(8, 4)

    def one_step(step: int, poison: bool) -> None:
        loss = model(x).square().mean() * (float("nan") if poison else 1.0)
        guard.train_step(loss, model, opt, ema, step)

    one_step(1, False)
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    steps = [opt.state[p]["step"].clone() for p in model.parameters()]
    shadow = [p.clone() for p in ema.model.parameters()]
    one_step(2, True)
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)                                   # the bad loss never reached the weights
    for p, m, s in zip(model.parameters(), moments, steps):
        assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["step"], s)
    for p, e in zip(ema.model.parameters(), shadow):
        assert torch.equal(p, e)                                   # nor the EMA
    one_step(3, False)                                             # training goes on until the next check
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2;.*skipped.*last good"):
        guard.check("the last good checkpoint is X")


def test_multi_tensor_ema_matches_the_per_tensor_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 2))
    ema = EMA(model, 0.9)
    expected = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for e, p in zip(expected, model.parameters()):
        e.lerp_(p.detach(), 0.1)
    for a, b in zip(ema.model.parameters(), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_device_flag_keeps_or_applies_the_update_exactly(dtype):
    """The guarded step's EMA update with the device flag `keep`: 0 leaves the EMA exactly as it was; 1 equals the
    plain update bit for bit in fp32 (a bf16 copy takes its weight rounded to bf16: within one bf16 step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2)).to(dtype)
    plain, flagged = EMA(model, 0.9), EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = [p.detach().clone() for p in flagged.model.parameters()]
    flagged.update(model, keep=torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(flagged.model.parameters(), before))
    plain.update(model)
    flagged.update(model, keep=torch.tensor(1.0))
    for a, b in zip(flagged.model.parameters(), plain.model.parameters()):
        if dtype == torch.float32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=8e-3, atol=8e-3)


def test_training_with_a_nan_batch_stops_naming_the_step_and_writes_nothing_after_it(tmp_path, monkeypatch):
    import dit.schedulers.objectives as objectives

    calls = {"n": 0}
    original = objectives.DDPMObjective.training_losses if hasattr(objectives, "DDPMObjective") else None
    if original is None:
        pytest.skip("objective class renamed")

    def poisoned(self, model, x, y, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            x = x * float("nan")
        return original(self, model, x, y, *a, **k)

    monkeypatch.setattr(objectives.DDPMObjective, "training_losses", poisoned)
    out = tmp_path / "run"
    args = parse_args(TINY + ["--max-steps", "8", "--checkpointing-steps", "2", "--log-every", "4",
                              "--output-dir", str(out)])
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3;.*checkpoint-2"):
        train(args)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # nothing after the bad step
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(out / "checkpoint-2" / "ema.safetensors")).values())


def test_metrics_log_images_per_second(tmp_path):
    out = tmp_path / "run"
    train(parse_args(TINY + ["--max-steps", "4", "--log-every", "2", "--checkpointing-steps", "4",
                             "--output-dir", str(out), "--no-preview"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_sec"] for r in rows if "images_per_sec" in r]
    assert speeds and all(s > 0 for s in speeds)
    assert not (out / "samples").exists()  # --no-preview


def test_training_loop_reads_nothing_back_between_logging_steps(tmp_path, monkeypatch):
    """The loop's host reads of device values (`.item()`, `bool(t)`, `int(t)`: what stalls a GPU every step)
    happen only at logging / checkpoint / preview steps: steps 3 to 9 of a 12-step run with logging at 12 make
    none (a dispatch mode sees every `_local_scalar_dense`, the op behind them; on CUDA, tests/test_gpu.py
    checks the same loop with torch's sync debug mode, which also catches synchronising copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads: list[str] = []

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                import traceback

                reads.append("".join(traceback.format_stack(limit=6)[:-1]))
            return func(*args, **(kwargs or {}))

    mode, record = HostReads(), NonFiniteGuard.record

    def record_and_watch(self, step, keep):
        record(self, step, keep)
        if step == 2:
            mode.__enter__()
        elif step == 9:
            mode.__exit__(None, None, None)

    monkeypatch.setattr(NonFiniteGuard, "record", record_and_watch)
    train(parse_args(TINY + ["--max-steps", "12", "--log-every", "12", "--checkpointing-steps", "12",
                             "--output-dir", str(tmp_path / "run"), "--no-preview"]))
    assert not reads, f"{len(reads)} host read(s) per quiet stretch; the first from:\n{reads[0]}"


# ---------------------------------------------------------------- previews
def test_preview_cost_follows_the_run():
    short = parse_args(["--max-steps", "3"])
    labels, steps = preview_plan(10, short, trained_images=3 * 32)
    assert len(labels) * steps * 2 <= 0.1 * 3 * 96 * 2 + 8 * 2 * 2  # within the budget, or at the floor
    assert len(labels) == 8 and steps == 2
    long = parse_args(["--max-steps", "2000"])
    labels, steps = preview_plan(10, long, trained_images=2000 * 32)
    assert len(labels) == 60 and steps == 25                           # the full grid for a real run
    forced = parse_args(["--preview-images", "20", "--preview-steps", "7"])
    labels, steps = preview_plan(10, forced, trained_images=96)
    assert labels.tolist() == [c for c in range(10) for _ in range(2)] and steps == 7
    few = parse_args(["--preview-images", "3"])
    assert preview_plan(10, few, None)[0].tolist() == [0, 3, 6]


def test_short_run_preview_is_small_and_announced(tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args(TINY + ["--max-steps", "2", "--checkpointing-steps", "2", "--output-dir", str(out),
                             "--sample-steps", "25"]))
    text = capsys.readouterr().out
    assert "preview: 8 images x 2" in text
    assert (out / "samples" / "step-0000002.png").exists()


# ---------------------------------------------------------------- proxy: mask-free shifted windows
def _masked_reference(op, h, grid, win):
    """The previous implementation: roll by -window//2, partition, additive region mask, one attention."""
    n, t, d = h.shape
    gh, gw = grid
    rows = (torch.arange(gh) + win[0] // 2) % gh
    cols = (torch.arange(gw) + win[1] // 2) % gw
    order = window_partition((rows[:, None] * gw + cols[None, :]).reshape(1, t, 1), grid, win).reshape(-1)
    p = win[0] * win[1]
    qkv = op.shift_qkv(h.index_select(1, order)).reshape(n * (t // p), p, 3, op.num_heads, op.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = shift_region_mask(grid, win).unsqueeze(1).repeat(n, 1, 1, 1)
    att = ((q @ k.transpose(-2, -1)) * op.head_dim ** -0.5 + mask).softmax(-1) @ v
    out = op.shift_proj(att.transpose(1, 2).reshape(n, t, d))
    return out.index_select(1, torch.argsort(order))


@pytest.mark.parametrize("grid,win", [((8, 8), (2, 2)), ((6, 9), (3, 3)), ((12, 8), (4, 2)), ((4, 4), (4, 4)),
                                      ((16, 16), (2, 2))])
def test_mask_free_shifted_windows_equal_the_masked_path(grid, win):
    torch.manual_seed(0)
    op = build_attention("proxy", 32, 4, window=list(win)).eval()
    for p in op.parameters():
        torch.nn.init.normal_(p, std=0.2)
    h = torch.randn(2, grid[0] * grid[1], 32)
    with torch.no_grad():
        new = op._window_attention(h, op.shift_qkv, op.shift_proj, grid, win, shifted=True)
        old = _masked_reference(op, h, grid, win)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    order, groups = window_layout(grid, win, True)
    assert sorted(order.tolist()) == list(range(grid[0] * grid[1]))  # a permutation
    assert sum(c * s for c, s in groups) == grid[0] * grid[1] and len(groups) <= 9


# ---------------------------------------------------------------- linear attention, bf16 kernel
def test_bf16_linear_attention_kernel_is_close_to_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 32) for _ in range(3))
    ref = linear_attention_kernel(q, k, v)
    out = linear_attention_kernel_bf16(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_bf16_linear_attention_normaliser_stays_fp32_under_autocast():
    """Under bf16 autocast (training on CUDA goes through the bf16 kernel) the normaliser is still an fp32
    product: the kernel gives the same numbers inside and outside autocast."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 32).bfloat16() for _ in range(3))
    plain = linear_attention_kernel_bf16(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = linear_attention_kernel_bf16(q, k, v)
    assert torch.equal(plain, under)


def test_bf16_linear_attention_layer_path_matches_fp32(monkeypatch):
    """The CUDA bf16 layer path (heads laid out once, kernel, depthwise conv in bf16), forced on the CPU: the same
    function as the fp32 path within bf16 rounding, for a batch > 1 (a head/batch layout slip would not be)."""
    import dit.attention.linear as linear

    torch.manual_seed(0)
    op = build_attention("linear", 64, 4, linear_heads=2).eval()
    with torch.no_grad():
        for p in op.parameters():
            p.normal_(0, 0.1)
    h = torch.randn(3, 48, 64)
    with torch.no_grad():
        ref = op(h, (6, 8))
        monkeypatch.setattr(linear, "use_bf16_kernel", lambda x: x.dtype == torch.bfloat16)
        out = op.to(torch.bfloat16)(h.bfloat16(), (6, 8)).float()
    assert ((out - ref).norm() / ref.norm()) < 2e-2


def test_linear_attention_on_cpu_keeps_the_fp32_path():
    torch.manual_seed(0)
    op = build_attention("linear", 64, 4).eval()
    h = torch.randn(1, 64, 64)
    with torch.no_grad():
        a = op(h, (8, 8))
        b = op(h.bfloat16().float(), (8, 8))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, op(h, (8, 8)))  # deterministic, unchanged CPU path
    assert b.shape == a.shape


# ---------------------------------------------------------------- xformers: one line naming the fix
def test_broken_xformers_gives_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    from dit.attention import softmax

    pkg = tmp_path / "xformers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import sys, warnings\n"
        "print('WARNING[XFORMERS]: xFormers can\\'t load C++/CUDA extensions. xFormers was built for:\\n'\n"
        "      '    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.13.0+cpu)\\n' + 'x' * 2000, file=sys.stderr)\n"
        "__version__ = '0.0.35'\n")
    (pkg / "ops.py").write_text("raise ImportError('xFormers wasn\\'t built with CUDA support\\n' + 'dump\\n' * 50)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("xformers")]:
        monkeypatch.delitem(sys.modules, name)
    softmax.xformers_problem.cache_clear()
    try:
        with pytest.raises(ValueError) as err:
            softmax.check_backend("xformers")
        message = str(err.value)
        assert "\n" not in message and "Fix:" in message and "--attention-backend sdpa" in message
        assert "xformers cannot be imported" in message and "wasn't built with CUDA support" in message
        assert capsys.readouterr().err == ""  # the dump was swallowed
        assert not softmax.xformers_available()
    finally:
        softmax.xformers_problem.cache_clear()
        for name in [m for m in sys.modules if m.startswith("xformers")]:
            del sys.modules[name]


# ---------------------------------------------------------------- the GPU benchmark without a GPU
def test_gpu_benchmark_refuses_on_cpu_and_dry_runs():
    env_cmd = [sys.executable, "-m", "dit.bench", "gpu"]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "needs a CUDA GPU" in errors[0] and "--dry-run" in errors[0]


def test_gpu_benchmark_dry_run_exercises_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dit.bench", "gpu", "--dry-run", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert payload["dry_run"] and not payload["errors"]
    sections = {r["section"] for r in payload["rows"]}
    assert sections == {"forward", "train", "variants", "sampling"}
    jobs = {r.get("job") for r in payload["rows"] if r["section"] == "sampling"}
    assert jobs == {"studio eager", "studio compiled", "diffusers DiTPipeline eager"}
    assert (tmp_path / "gpu.png").exists()


def test_gpu_benchmark_profile_and_compiled_variants_dry_run(tmp_path):
    """The optional parts: `--sections profile` writes the top-kernel tables, `--variants-compile` adds a
    compiled row (with its own speed-up against compiled softmax) for every variant and token count."""
    proc = subprocess.run([sys.executable, "-m", "dit.bench", "gpu", "--dry-run", "--sections", "variants", "profile",
                           "--variants-compile", "--no-plot", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    compiled = [r for r in rows if r["section"] == "variants" and r.get("compiled")]
    assert {r["attention"] for r in compiled} == {"softmax", "linear", "proxy"} and len(compiled) == 6
    assert all(r["speedup_vs_softmax"] > 0 for r in compiled)
    text = (tmp_path / "gpu_profile.txt").read_text()
    assert all(f"=== {v}:" in text for v in ("softmax", "linear", "proxy")) and "addmm" in text
