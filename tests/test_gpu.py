"""CUDA tests (`@pytest.mark.gpu`): skipped where no GPU is present (CI); run by scripts/gpu_checks.sh.

Tolerances are stated per test: bf16 has an 8-bit mantissa (~0.4% per rounding), fp16 10 bits.
"""
from __future__ import annotations

import pytest
import torch

from dit.attention import build_attention
from dit.attention.linear import linear_attention_kernel, linear_attention_kernel_bf16
from dit.compile import compile_model
from dit.config import model_kwargs
from dit.model import DiT

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def small(**kw) -> DiT:
    torch.manual_seed(0)
    model = DiT(**model_kwargs("DiT-S/2", depth=4, input_size=16, **kw)).to(CUDA).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def test_low_precision_sampling_matches_fp32():
    """Whole DDIM sampling (20 steps, CFG 4) in bf16 / fp16 weights vs fp32: relative L2 of the latents
    below 5% (bf16) / 2% (fp16); errors compound over steps, per-step forwards agree far tighter."""
    from dit.schedulers import sample

    model = small()
    labels, seeds = torch.tensor([1, 7, 300, 999]), [0, 1, 2, 3]
    shape = (4, 16, 16)
    ref = sample(model, labels, seeds, shape, "ddim", 20, 4.0, device=CUDA, dtype=torch.float32, progress=False)
    for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.02)):
        low = torch.nn.Module.to(small(), dtype=dtype)
        out = sample(low, labels, seeds, shape, "ddim", 20, 4.0, device=CUDA, dtype=dtype, progress=False)
        assert torch.isfinite(out).all()
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < tol, (dtype, rel)


@pytest.mark.parametrize("attention", ["softmax", "linear", "proxy"])
def test_compiled_and_eager_agree_on_cuda(attention):
    model = small(attention=attention)
    x = torch.randn(8, 4, 16, 16, device=CUDA)
    t = torch.randint(0, 1000, (8,), device=CUDA)
    y = torch.randint(0, 1000, (8,), device=CUDA)
    with torch.no_grad():
        eager = model(x, t, y)
        report = compile_model(model)
        out = model(x, t, y)
    assert report.enabled, report.failures
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)  # TF32 / fusion reorderings
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(model(x, t, y)).all()


def _train_setup(batch: int = 16):
    from dit.ema import EMA
    from dit.nonfinite import NonFiniteGuard
    from dit.schedulers import get_objective

    model = DiT(**model_kwargs("DiT-S/2", depth=2, input_size=16)).to(CUDA).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ema = EMA(model, 0.9)
    guard = NonFiniteGuard(opt, CUDA)
    objective = get_objective("ddpm")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, device=CUDA, generator=g).clamp(-2, 2)
    y = torch.randint(0, 1000, (batch,), device=CUDA, generator=g)
    return model, opt, ema, guard, objective, x, y


def _step(model, opt, ema, guard, objective, x, y, i):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = objective.training_losses(model, x, y)["loss"].mean()
    guard.train_step(loss, model, opt, ema, i)
    return loss.detach()


def test_cuda_training_lowers_the_loss_and_the_guard_stops_a_poisoned_step():
    torch.manual_seed(0)
    model, opt, ema, guard, objective, x, y = _train_setup()
    losses = [_step(model, opt, ema, guard, objective, x, y, i) for i in range(1, 61)]
    first, last = torch.stack(losses[:10]).mean().item(), torch.stack(losses[-10:]).mean().item()
    assert last < 0.8 * first, (first, last)
    guard.check("test")  # nothing bad so far
    weights = [p.detach().clone() for p in model.parameters()]
    shadow = [p.detach().clone() for p in ema.model.parameters()]
    _step(model, opt, ema, guard, objective, x * float("nan"), y, 61)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(p, w) for p, w in zip(ema.model.parameters(), shadow))
    with pytest.raises(FloatingPointError, match="step 61"):
        guard.check("test")


def test_linear_attention_bf16_at_16384_tokens_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16384, 72, device=CUDA) * 3 for _ in range(3))
    ref = linear_attention_kernel(q, k, v)
    out = linear_attention_kernel_bf16(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    op = build_attention("linear", 1152, 16, linear_heads=4).to(CUDA).eval()
    h = torch.randn(1, 16384, 1152, device=CUDA)
    with torch.no_grad():
        full = op(h, (128, 128))
        half = torch.nn.Module.to(op, dtype=torch.bfloat16)(h.bfloat16(), (128, 128))
    assert torch.isfinite(half).all()
    assert ((half.float() - full).norm() / full.norm()).item() < 2e-2


def test_proxy_attention_bf16_matches_fp32():
    torch.manual_seed(0)
    op = build_attention("proxy", 384, 6).to(CUDA).eval()
    with torch.no_grad():
        for p in op.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(2, 4096, 384, device=CUDA)
    with torch.no_grad():
        ref = op(x, (64, 64))
        low = torch.nn.Module.to(op, dtype=torch.bfloat16)(x.bfloat16(), (64, 64))
    assert ((low.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_xformers_agrees_with_sdpa_or_gives_one_line():
    from dit.attention import softmax

    problem = softmax.xformers_problem()
    if problem is not None:
        with pytest.raises(ValueError) as err:
            softmax.check_backend("xformers")
        assert "\n" not in str(err.value) and "--attention-backend sdpa" in str(err.value)
        pytest.skip(f"xformers cannot run here (one-line error checked): {problem}")
    q, k, v = (torch.randn(2, 8, 256, 64, device=CUDA, dtype=torch.float16) for _ in range(3))
    a = softmax.scaled_dot_product(q, k, v, "xformers")
    b = softmax.scaled_dot_product(q, k, v, "sdpa")
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_train_loop_has_no_host_sync_between_logging_steps(tmp_path, monkeypatch):
    """train.py's own loop (digits on the GPU, bf16, fused AdamW, guard, EMA, clipping): from step 3 to step 10
    (no logging, checkpoint or preview due) any synchronising CUDA call raises (torch's sync debug mode)."""
    from dit import training
    from dit.nonfinite import NonFiniteGuard

    record = NonFiniteGuard.record

    def record_and_watch(self, step, keep):
        record(self, step, keep)
        torch.cuda.set_sync_debug_mode("error" if 2 <= step < 10 else "default")

    monkeypatch.setattr(NonFiniteGuard, "record", record_and_watch)
    try:
        training.main(["--data", "digits", "--model", "DiT-S/4", "--image-size", "16", "--batch-size", "32",
                       "--max-steps", "12", "--log-every", "12", "--checkpointing-steps", "12", "--no-preview",
                       "--mixed-precision", "bf16", "--output-dir", str(tmp_path / "run")])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (tmp_path / "run" / "checkpoint-12").is_dir()


def test_ddim_sampling_steps_do_not_synchronise():
    """The sampler loop (CFG, bf16 weights, DDIM): between the first and the last step no call waits for the GPU
    (the schedule stays on the CPU and the model gets t by a fill), so the host queues steps ahead."""
    from dit.schedulers import sample

    model = torch.nn.Module.to(small(), dtype=torch.bfloat16)

    def watch(step, total, x):
        torch.cuda.set_sync_debug_mode("error" if 1 <= step < total - 1 else "default")

    try:
        x = sample(model, torch.tensor([1, 2, 3, 4]), [0, 1, 2, 3], (4, 16, 16), "ddim", 10, 4.0, device=CUDA,
                   dtype=torch.bfloat16, callback=watch, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


def test_fused_linear_gelu_matches_linear_then_gelu(monkeypatch):
    """bf16 inference on CUDA runs fc1 + GELU(tanh) as one cuBLASLt matmul with a GELU epilogue: within bf16
    rounding (2 ulp, rel. 1e-2 of max) of Linear then GELU, for the MLP alone and a whole model's output."""
    import dit.mlp as mlp

    torch.manual_seed(0)
    layer = mlp.Mlp(1152).to(CUDA, torch.bfloat16)
    x = torch.randn(4, 256, 1152, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        assert mlp.fused_gelu_applies(x, layer.fc1)
    assert not mlp.fused_gelu_applies(x, layer.fc1)  # with autograd on: Linear then GELU (the op has no backward)
    model = torch.nn.Module.to(small(), dtype=torch.bfloat16)
    xs = torch.randn(4, 4, 16, 16, device=CUDA, dtype=torch.bfloat16)
    t, y = torch.tensor([1, 200, 500, 999], device=CUDA), torch.tensor([0, 1, 2, 3], device=CUDA)
    with torch.no_grad():
        fused, fused_model = layer(x), model(xs, t, y)
        monkeypatch.setattr(mlp, "FUSED_GELU", False)
        plain, plain_model = layer(x), model(xs, t, y)
        monkeypatch.setattr(mlp, "FUSED_GELU", True)
        report = compile_model(model)  # the fused op inside Inductor's graph
        compiled_model = model(xs, t, y)
    assert report.enabled, report.failures
    for a, b in ((fused, plain), (fused_model, plain_model), (compiled_model, plain_model)):
        assert torch.isfinite(a).all()
        assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rowwise_scaled_mm_on_cuda_matches_its_simulation(dtype):
    """W8A8 (E4M3 per-channel weights, per-token activations) as a real FP8 GEMM on SM 8.9+ equals the
    dequantize-then-matmul simulation within bf16 output rounding; older GPUs keep the simulation."""
    from dit.quant import QuantLinear, WeightSpec
    from dit.quant.observers import scales_from_amax, weight_amax

    torch.manual_seed(0)
    lin = torch.nn.Linear(1152, 4608).to(CUDA)
    spec = WeightSpec("e4m3", "channel")
    layer = QuantLinear.from_linear(lin, spec, scales_from_amax(weight_amax(lin.weight, spec), spec), "e4m3").to(CUDA)
    x = torch.randn(4, 256, 1152, device=CUDA, dtype=dtype)
    layer.scaled_mm = False
    reference = layer(x.float()).float()
    layer.scaled_mm = "auto"  # the FP8 GEMM where the GPU has one
    if torch.cuda.get_device_capability() < (8, 9):
        assert not layer._use_scaled_mm(x)
        pytest.skip("no FP8 tensor cores (SM < 8.9): the simulation is the path")
    assert layer._use_scaled_mm(x)
    out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() <= 2e-2 * reference.abs().max()
