"""FLOPs accounting (dit/flops.py): DiT paper Gflops, PT-DiT's relative cost, LiT's formula, and agreement
with torch's FlopCounterMode (which reports 2 x MACs) on tiny modules."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit.attention import BlockContext, build_attention
from dit.attention.proxy import window_layout
from dit.flops import attention_flops, model_flops
from dit.model import DiT


@pytest.mark.parametrize("preset,paper", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-L/2", 80.71),
                                          ("DiT-XL/2", 118.64)])
def test_paper_gflops_at_256px(preset: str, paper: float) -> None:
    assert abs(model_flops(preset)["gflops"] - paper) <= 0.05
    assert abs(model_flops(preset, input_size=32)["gflops"] - paper) <= 0.05


def test_xl2_at_512px_and_token_arguments() -> None:
    assert abs(model_flops("DiT-XL/2", input_size=64)["gflops"] - 525) < 1.0
    assert model_flops("DiT-S/2", tokens=256)["total"] == model_flops("DiT-S/2")["total"]
    with pytest.raises(ValueError, match="not a square"):
        model_flops("DiT-S/2", tokens=200)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model_flops("DiT-S/2", input_size=33)


def macs_measured(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fn()
    return counter.get_total_flops() / 2


def test_softmax_formula_matches_counter() -> None:
    op = build_attention("softmax", 64, 4, backend="math")
    h = torch.randn(1, 36, 64)
    assert macs_measured(lambda: op(h, (6, 6))) == attention_flops("softmax", 64, 4, 36)
    assert attention_flops("softmax", 64, 4, 36) == 4 * 36 * 64 * 64 + 2 * 36 * 36 * 64


@pytest.mark.parametrize("linear_heads", [1, 2, 4])
def test_linear_attention_flops_formula(linear_heads: int) -> None:
    d, t = 64, 48
    dh = d // linear_heads
    expected = 4 * t * d * d + 2 * t * d * (dh + 1) + 25 * t * d
    assert attention_flops("linear", d, 6, t, linear_heads=linear_heads) == expected
    op = build_attention("linear", d, 6, backend="sdpa", linear_heads=linear_heads)
    assert op.flops(t) == expected
    h = torch.randn(1, t, d)
    assert macs_measured(lambda: op(h, (6, 8))) == expected
    # O(T): doubling the tokens doubles the cost
    assert attention_flops("linear", d, 6, 2 * t, linear_heads=linear_heads) == 2 * expected


@pytest.mark.parametrize("side,percent", [(16, 34.3), (32, 9.7), (64, 4.7)])
def test_proxy_attention_relative_cost(side: int, percent: float) -> None:
    """PT-DiT Eq. 3-4: proxy products = 2(1/p^2 + 1/p + 2p/N) N^2 D, i.e. (1/p^2 + 1/p + 2p/N) of full attention."""
    n, d = side * side, 384
    win = side // 8
    p = win * win
    parts = attention_flops("proxy", d, 6, n, breakdown=True)
    paper = 2 * (1 / p ** 2 + 1 / p + 2 * p / n) * n * n * d     # Swin-style masked SWSA: 2 T p D
    # the mask-free SWSA attends inside each shifted region only (window_layout): a little less than the paper
    _, groups = window_layout((side, side), (win, win), shifted=True)
    swsa = 2 * d * sum(count * size * size for count, size in groups)
    assert swsa < 2 * n * p * d
    assert parts["products"] == pytest.approx(paper - 2 * n * p * d + swsa, rel=1e-12)
    full = attention_flops("softmax", d, 6, n, breakdown=True)["products"]
    assert full == 2 * n * n * d
    assert 0 < percent - 100 * parts["products"] / full < 0.3  # the paper's figure (truncated 34.375) is the bound


def test_proxy_flops_match_counter() -> None:
    d, grid = 64, (8, 8)
    op = build_attention("proxy", d, 4, backend="math", window=(2, 2))
    x, c = torch.randn(1, 64, d), torch.randn(1, d)
    ctx = BlockContext(grid=grid)

    def run() -> None:
        op.post_attention(op(op.pre_attention(x, c, ctx), grid), c, ctx)

    assert macs_measured(run) == attention_flops("proxy", d, 4, 64, window=(2, 2)) == op.flops(64)
    no_shift = build_attention("proxy", d, 4, backend="math", window=(2, 2), shift=False)
    assert macs_measured(lambda: no_shift(no_shift.pre_attention(x, c, ctx), grid)) == \
        attention_flops("proxy", d, 4, 64, window=(2, 2), shift=False)


@pytest.mark.parametrize("attention", ["softmax", "linear", "proxy", ["linear", "softmax"]],
                         ids=["softmax", "linear", "proxy", "hybrid"])
def test_model_flops_match_counter_on_tiny_models(attention: object) -> None:
    """Whole forward of a tiny DiT: FlopCounterMode MACs (math backend) == model_flops, per variant."""
    kw = dict(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10,
              attention=attention, attention_backend="math", attention_options={"window": [2, 2]})
    model = DiT(**kw).eval()
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor([5]), torch.tensor([3])
    counted = model_flops(model)
    assert macs_measured(lambda: model(x, t, y)) == counted["total"]
    assert model_flops(kw)["total"] == counted["total"]
    assert [b["attention"] for b in counted["blocks"]] == model.block_attention
    assert counted["total"] == pytest.approx(counted["embed"] + counted["final"]
                                             + sum(b["total"] for b in counted["blocks"]))


def test_attention_flops_unknown_variant() -> None:
    with pytest.raises(ValueError, match="Unknown attention variant"):
        attention_flops("nope", 64, 4, 16)
