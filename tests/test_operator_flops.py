"""Every operator owns its cost: each registered attention / MLP operator's FLOPs formula equals a count of its
matmuls (torch's FlopCounterMode on the math backend, 2 x MACs); dit.flops only sums the reports; the new
window and gated-convolution operators compute what they claim; no import circles."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dit.attention import ATTENTION_REGISTRY, BlockContext, build_attention
from dit.flops import model_flops
from dit.mlp import MLP_REGISTRY, build_mlp
from dit.model import DiT

ROOT = Path(__file__).resolve().parents[1]


def macs(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fn()
    return counter.get_total_flops() / 2


ATTENTION_CASES = [
    ("softmax", {}), ("linear", {"linear_heads": 2}), ("proxy", {"window": [2, 2]}),
    ("window", {"window_size": 3}), ("window", {"window_size": 5}),
    ("gated_conv", {}), ("gated_conv", {"featurizer": False}), ("gated_conv", {"layout": "1d", "filter_size": 4}),
]


@pytest.mark.parametrize("name,opts", ATTENTION_CASES, ids=[f"{n}-{o}" for n, o in ATTENTION_CASES])
def test_attention_formula_matches_matmul_count(name: str, opts: dict) -> None:
    d, grid = 32, (6, 8)
    t = grid[0] * grid[1]
    op = build_attention(name, d, 4, backend="math", **opts)
    x, c, ctx = torch.randn(1, t, d), torch.randn(1, d), BlockContext(grid=grid)
    counted = macs(lambda: op.post_attention(op(op.pre_attention(x, c, ctx), grid), c, ctx))
    assert counted == op.flops(t, grid) == op.flops_breakdown(t, grid)["total"]
    assert counted > 0


@pytest.mark.parametrize("name,ratio", [("mlp", 4.0), ("mlp", 3.0), ("mlp", 6.0), ("mixffn", 4.0)])
def test_mlp_formula_matches_matmul_count(name: str, ratio: float) -> None:
    grid = (4, 5)
    mlp = build_mlp(name, 32, ratio)
    x = torch.randn(1, 20, 32)
    assert macs(lambda: mlp(x, grid)) == mlp.flops(20, grid)


def test_every_registered_operator_reports_a_cost() -> None:
    for name in ATTENTION_REGISTRY:
        with torch.device("meta"):
            op = build_attention(name, 64, 4)
        parts = op.flops_breakdown(64, (8, 8))
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total")) and parts["total"] > 0
    for name in MLP_REGISTRY:
        assert build_mlp(name, 16, 4.0).flops(16, (4, 4)) > 0


def test_model_flops_sum_mixed_and_parallel_blocks_match_counter() -> None:
    """Per-block attention, MLP types and ratios, and parallel (restructured) blocks: the sum is still exact."""
    kw = dict(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=10,
              attention=["window", "gated_conv"], mlp_type=["mlp", "mixffn"], mlp_ratio=[3.0, 4.0],
              attention_backend="math", parallel_branches=2)
    model = DiT(**kw).eval()
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor([5]), torch.tensor([3])
    counted = model_flops(model)
    assert macs(lambda: model(x, t, y)) == counted["total"]
    assert model_flops(kw)["total"] == counted["total"]
    assert [b["attention"] for b in counted["blocks"]] == ["window", "gated_conv"]


def test_dit_xl2_still_the_paper_figure() -> None:
    assert model_flops("DiT-XL/2")["gflops"] == pytest.approx(118.6, abs=0.05)


@pytest.mark.parametrize("grid,tile", [((6, 8), 8), ((13, 11), 4), ((20, 20), 8), ((9, 9), 3)])
def test_window_attention_paths_agree_with_a_masked_reference(grid: tuple[int, int], tile: int) -> None:
    torch.manual_seed(0)
    op = build_attention("window", 32, 4, backend="math", window_size=5, tile=tile)
    t = grid[0] * grid[1]
    h = torch.randn(2, t, 32)
    with torch.no_grad():
        gathered = op(h, grid)
        op.backend = "sdpa"
        fused = op(h, grid)
        q, k, v = op.qkv(h).reshape(2, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        near = ((ys[:, None] - ys[None]).abs() <= 2) & ((xs[:, None] - xs[None]).abs() <= 2)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=near)
        ref = op.proj(ref.transpose(1, 2).reshape(2, t, 32))
    torch.testing.assert_close(gathered, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


def test_window_attention_is_local_and_bad_sizes_name_the_fix() -> None:
    op = build_attention("window", 16, 2, window_size=3).eval()
    grid = (10, 10)
    h = torch.randn(1, 100, 16)
    h2 = h.clone()
    h2[0, 99] += 10.0                        # far corner changes
    with torch.no_grad():
        a, b = op(h, grid), op(h2, grid)
    assert torch.equal(a[0, 0], b[0, 0])      # token (0, 0) does not see (9, 9)
    assert not torch.equal(a[0, 88], b[0, 88])  # token (8, 8) does
    with pytest.raises(ValueError, match="window_size must be a positive odd"):
        build_attention("window", 16, 2, window_size=4)


def test_gated_conv_identity_init_and_causal_1d() -> None:
    op = build_attention("gated_conv", 16, 2).eval()
    h = torch.randn(1, 12, 16)
    with torch.no_grad():
        q, k, v = op.qkv(h).chunk(3, dim=-1)
        torch.testing.assert_close(op(h, (3, 4)), op.proj(q * k * v))   # identity filters: token-wise at init
    causal = build_attention("gated_conv", 16, 2, layout="1d", filter_size=4).eval()
    with torch.no_grad():
        causal.inner_filter.normal_()
        causal.featurizer.normal_()
        h2 = h.clone()
        h2[0, 7] += 5.0
        a, b = causal(h, (3, 4)), causal(h2, (3, 4))
    assert torch.equal(a[0, :7], b[0, :7]) and not torch.equal(a[0, 7:11], b[0, 7:11])


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_import_circles_between_operators_flops_model_and_dynamic() -> None:
    for path in (ROOT / "dit" / "attention").glob("*.py"):
        bad = {m for m in _imports(path) if m.endswith("flops") or m.endswith("model") or m.endswith("dynamic")}
        assert not bad, f"{path.name} imports {bad}"
    assert not {m for m in _imports(ROOT / "dit" / "mlp.py") if "flops" in m or "model" in m}
    assert not {m for m in _imports(ROOT / "dit" / "model.py") if "dynamic" in m or "flops" in m}
