"""LiT linear attention and PT-DiT proxy-token attention: exact formulas, precision paths, documented
edge cases, batch ordering, errors, and tiny end-to-end train / save / reload / sample runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit.attention import BlockContext, build_attention
from dit.attention.linear import inherit_from_softmax, linear_attention_kernel
from dit.attention.proxy import default_window
from dit.model import DiT, DiTBlock

D, HEADS = 32, 2


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every parameter (zero-initialised ones included) random values, so no branch is trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


# ---------------------------------------------------------------------------------------------- linear
def explicit_linear_attention(op: torch.nn.Module, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The O(T^2) form: A = phi(Q) phi(K)^T; O = A V / (A 1 + eps) + DWC(V); proj (float64)."""
    n, t, d = h.shape
    heads = op.num_heads
    qkv = F.linear(h.double(), op.qkv.weight.double(), op.qkv.bias.double())
    q, k, v = qkv.reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = F.relu(q) @ F.relu(k).transpose(-2, -1)                       # (N, heads, T, T)
    out = (a @ v) / (a.sum(-1, keepdim=True) + op.eps)
    out = out.transpose(1, 2).reshape(n, t, d)
    v_img = v.transpose(1, 2).reshape(n, grid[0], grid[1], d).permute(0, 3, 1, 2)
    conv = F.conv2d(v_img, op.dwc.weight.double(), op.dwc.bias.double(), padding=2, groups=d)
    out = out + conv.flatten(2).transpose(1, 2)
    return F.linear(out, op.proj.weight.double(), op.proj.bias.double())


@pytest.mark.parametrize("linear_heads", [2, 4])
def test_linear_matches_explicit_kernel_formula(linear_heads: int) -> None:
    op = build_attention("linear", D, 8, backend="sdpa", linear_heads=linear_heads, unknown_option=1)
    assert op.num_heads == linear_heads  # the model's num_heads (8) is ignored on purpose
    randomize(op)
    grid = (4, 6)
    h = torch.randn(2, 24, D)
    out = op(h, grid)
    ref = explicit_linear_attention(op, h, grid)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert set(op.state_dict()) == {"qkv.weight", "qkv.bias", "dwc.weight", "dwc.bias", "proj.weight", "proj.bias"}


def test_linear_precision_paths_agree() -> None:
    """fp32 is the reference. Tolerances (relative to max |ref|): CPU autocast bf16 3e-2 (bf16 qkv/proj
    matmuls, 8-bit mantissa), explicit bf16 weights+inputs 5e-2, explicit fp16 weights+inputs 5e-3;
    the kernel itself always runs in fp32."""
    torch.manual_seed(0)
    op = build_attention("linear", D, HEADS, backend="sdpa")
    randomize(op)
    grid = (8, 8)
    h = torch.randn(2, 64, D)
    ref = op(h, grid)
    scale = ref.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = op(h, grid)
    assert out_ac.dtype == torch.bfloat16
    assert ((out_ac.float() - ref).abs().max() / scale) < 3e-2
    out_bf16 = op.to(torch.bfloat16)(h.bfloat16(), grid)
    assert out_bf16.dtype == torch.bfloat16 and torch.isfinite(out_bf16).all()
    assert ((out_bf16.float() - ref).abs().max() / scale) < 5e-2
    out_fp16 = op.to(torch.float16)(h.half(), grid)
    assert out_fp16.dtype == torch.float16 and torch.isfinite(out_fp16).all()
    assert ((out_fp16.float() - ref).abs().max() / scale) < 5e-3


def test_linear_kernel_fp32_avoids_fp16_overflow() -> None:
    """phi(K)^T V over 1024 tokens of magnitude ~30 exceeds fp16's 65504: a naive fp16 kernel gives inf/NaN."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(1, 1, 1024, 8, generator=g) * 30 for _ in range(3))
    naive = (q.half() @ (k.half().transpose(-2, -1) @ v.half())) / (q.half() @ k.half().sum(-2, keepdim=True).transpose(-2, -1))
    assert not torch.isfinite(naive).all()
    out = linear_attention_kernel(q.half(), k.half(), v.half())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    q, k, v = (z.half().double() for z in (q, k, v))   # the same fp16-rounded inputs, float64 reference
    ref = (q @ (k.transpose(-2, -1) @ v)) / (q @ k.sum(-2, keepdim=True).transpose(-2, -1) + 1e-6)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)


def test_linear_bad_heads_error() -> None:
    with pytest.raises(ValueError, match="linear_heads"):
        build_attention("linear", 30, 2, backend="sdpa", linear_heads=4)


# ----------------------------------------------------------------------------------------------- proxy
def test_proxy_default_windows() -> None:
    assert default_window((16, 16)) == (2, 2)
    assert default_window((32, 32)) == (4, 4)
    assert default_window((64, 64)) == (8, 8)
    assert default_window((128, 128)) == (16, 16)
    assert default_window((8, 8)) == (1, 1) and default_window((4, 4)) == (1, 1)  # grid/8 < 1 -> window 1
    assert default_window((28, 16)) == (4, 2)  # 28/8 is no divisor: 7 windows of 4 is nearest 8


def test_proxy_non_divisible_grid_error() -> None:
    op = build_attention("proxy", D, HEADS, backend="sdpa", window=(3, 3))
    with pytest.raises(ValueError, match=r"not divisible by the window 3x3.*heights for this grid: \[1, 2, 4\]"):
        op(torch.randn(1, 16, D), (4, 4))
    with pytest.raises(ValueError, match="Valid window heights"):
        op.pre_attention(torch.randn(1, 16, D), torch.randn(1, D), BlockContext(grid=(4, 4)))


def test_unknown_variant_error() -> None:
    with pytest.raises(ValueError, match="Unknown attention variant 'nope'.*linear.*proxy.*softmax"):
        build_attention("nope", D, HEADS, backend="sdpa")
    with pytest.raises(ValueError, match="Unknown attention variant"):
        DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=D, depth=1, num_heads=HEADS,
            num_classes=10, attention="nope")


def test_proxy_grid_equal_to_one_window() -> None:
    """Documented behaviour (dit/attention/proxy.py): one proxy = global mean, cross-attention adds the
    same vector to every token, WSA = full attention, SWSA = attention within the 4 original quadrants."""
    torch.manual_seed(0)
    op = build_attention("proxy", D, HEADS, backend="math", window=(4, 4))
    randomize(op)
    grid, n = (4, 4), 2
    x, c = torch.randn(n, 16, D), torch.randn(n, D)
    ctx = BlockContext(grid=grid)

    p = op.proxy_tokens(x, grid)
    torch.testing.assert_close(p, x.mean(1, keepdim=True))
    # proxy SA over one token = proj(v); cross-attention over one key = out(v) for every token
    p2 = p + op.proxy_proj(op.proxy_qkv(layer_norm(p))[..., 2 * D:])
    expected_delta = op.cross_out(op.cross_kv(layer_norm(p2))[..., D:])
    delta = op.pre_attention(x, c, ctx) - x
    torch.testing.assert_close(delta, expected_delta.expand_as(delta), rtol=1e-5, atol=1e-5)

    soft = build_attention("softmax", D, HEADS, backend="math")
    soft.load_state_dict({k: v for k, v in op.state_dict().items() if k.split(".")[0] in ("qkv", "proj")})
    torch.testing.assert_close(op(x, grid), soft(x, grid), rtol=1e-5, atol=1e-5)

    shift, scale, gate = (op.shift_modulation(c) + op.shift_table.reshape(1, -1)).chunk(3, dim=1)
    h = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
    q, k, v = op.shift_qkv(h).reshape(n, 16, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    quadrant = (rows >= 2) * 2 + (cols >= 2)
    mask = torch.zeros(16, 16).masked_fill(quadrant[:, None] != quadrant[None, :], float("-inf"))
    att = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5 + mask).softmax(-1) @ v
    expected = x + gate[:, None] * op.shift_proj(att.transpose(1, 2).reshape(n, 16, D))
    torch.testing.assert_close(op.post_attention(x, c, ctx), expected, rtol=1e-5, atol=1e-5)


def test_proxy_batch_ordering_per_sample_conditioning() -> None:
    """Different t per sample: a batch must equal each sample run alone (the reference's tiling bug fails this)."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=1, in_channels=1, hidden_size=D, depth=1, num_heads=HEADS,
                num_classes=10, attention="proxy", attention_options={"window": [4, 4]}).eval()
    randomize(model, std=0.1)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([3, 500, 990])
    y = torch.tensor([1, 2, 10])
    together = model(x, t, y)
    alone = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # and the conditioning matters (so the test above is not vacuous)
    assert (model(x, t.flip(0), y) - together).abs().max() > 1e-3


def test_proxy_block_batch_ordering_and_mask_cache() -> None:
    from dit.attention.constants import cached_keys, clear

    clear()
    torch.manual_seed(0)
    block = DiTBlock(D, HEADS, attention="proxy", attention_options={"window": [2, 2], "backend": "sdpa"})
    randomize(block, std=0.1)
    c = torch.randn(2, D)
    for grid in [(4, 4), (6, 8), (4, 4)]:
        x = torch.randn(2, grid[0] * grid[1], D)
        out = block(x, c, BlockContext(grid=grid))
        alone = torch.cat([block(x[i:i + 1], c[i:i + 1], BlockContext(grid=grid)) for i in range(2)])
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    keys = {k[1] for k in cached_keys() if k[0] == "proxy-order"}
    assert {(4, 4), (6, 8)} <= keys  # one (shifted-)window layout per grid, not one for all inputs


def test_proxy_zero_init_branches_are_identity_and_train() -> None:
    model = DiT(input_size=8, patch_size=1, in_channels=1, hidden_size=D, depth=1, num_heads=HEADS,
                num_classes=10, attention="proxy", attention_options={"window": [2, 2]})
    attn = model.blocks[0].attn
    x, c = torch.randn(2, 64, D), torch.randn(2, D)
    ctx = BlockContext(grid=(8, 8))
    torch.testing.assert_close(attn.pre_attention(x, c, ctx), x)
    torch.testing.assert_close(attn.post_attention(x, c, ctx), x)
    assert attn.shift_table.abs().sum() > 0  # gate != 0 at init, so the zero projection receives gradients
    attn.post_attention(x, c, ctx).sum().backward()
    assert attn.shift_proj.weight.grad.abs().sum() > 0


def test_inherit_from_softmax() -> None:
    kw = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=D, depth=2, num_heads=HEADS, num_classes=10)
    teacher = DiT(**kw)
    randomize(teacher)
    student = DiT(**kw, attention="linear")
    report = inherit_from_softmax(student, teacher.state_dict())
    assert "blocks.0.mlp.fc1.weight" in report["loaded"] and "blocks.0.attn.qkv.weight" in report["kept_student"]
    torch.testing.assert_close(student.state_dict()["blocks.1.adaLN_modulation.1.weight"],
                               teacher.state_dict()["blocks.1.adaLN_modulation.1.weight"])
    assert not torch.equal(student.state_dict()["blocks.0.attn.qkv.weight"], teacher.state_dict()["blocks.0.attn.qkv.weight"])
    inherit_from_softmax(student, teacher.state_dict(), attention="all")
    torch.testing.assert_close(student.state_dict()["blocks.0.attn.qkv.weight"], teacher.state_dict()["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="missing in teacher"):
        inherit_from_softmax(student, {k: v for k, v in teacher.state_dict().items() if "mlp" not in k})


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("attention", ["linear", "proxy", ["linear", "softmax"]], ids=["linear", "proxy", "hybrid"])
def test_tiny_dit_trains_saves_reloads_samples(attention: object, tmp_path) -> None:
    from dit.checkpoint import save_checkpoint
    from dit.data import load_digits
    from dit.schedulers import get_objective, sample

    torch.manual_seed(0)
    images, labels = load_digits("train", size=16)
    model = DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=D, depth=2, num_heads=HEADS,
                num_classes=10, attention=attention, attention_options={"window": [2, 2]})
    objective = get_objective("ddpm")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        idx = torch.randint(0, len(images), (32,), generator=g)
        loss = objective.training_losses(model, images[idx], labels[idx], generator=g)["mse"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses

    model.eval()
    folder = save_checkpoint(model, tmp_path / "ckpt")
    reloaded = DiT.from_pretrained(folder).eval()
    assert reloaded.block_attention == model.block_attention
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, y), model(x, t, y))
        out = sample(reloaded, torch.tensor([1, 7]), [0, 1], (1, 16, 16), scheduler_name="ddim", steps=3,
                     cfg_scale=2.0, null_class=10, progress=False)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("attention", ["linear", "proxy"])
def test_variants_under_bf16_autocast(attention: str) -> None:
    """Whole tiny model under CPU bf16 autocast: finite, and within 5e-2 (relative to max |fp32|) of fp32."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=1, in_channels=1, hidden_size=D, depth=1, num_heads=HEADS,
                num_classes=10, attention=attention, attention_options={"window": [2, 2]}).eval()
    randomize(model, std=0.1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() / ref.abs().max() < 5e-2


def test_shared_constants_built_in_inference_mode_still_train_another_model() -> None:
    """Per-grid constants are shared by every model of the process: ones first built under inference_mode must
    not be inference tensors, or a training model on the same grid could not save them for backward."""
    from dit.attention.constants import clear

    clear()
    kw = dict(input_size=8, patch_size=1, in_channels=1, hidden_size=D, depth=1, num_heads=HEADS, num_classes=10,
              attention="proxy", attention_options={"window": [2, 2]})
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
    with torch.inference_mode():
        DiT(**kw).eval()(x, t, y)
    trainee = DiT(**kw).train()
    randomize(trainee, std=0.1)
    trainee(x, t, y).square().mean().backward()
    assert trainee.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_window_masks_are_prepared_in_the_attention_dtype() -> None:
    """`prepare` gets the activation dtype from DiT.forward (autocast's under autocast): the one mask the
    forward uses is built, not a float32 one read off a (possibly quantized) weight."""
    from dit.attention.constants import cached_keys, clear

    clear()
    model = DiT(input_size=8, patch_size=1, in_channels=1, hidden_size=D, depth=1, num_heads=HEADS, num_classes=10,
                attention="window").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3]))
    dtypes = {k[-1] for k in cached_keys() if str(k[0]).startswith("window-")}
    assert dtypes == {torch.bfloat16}
