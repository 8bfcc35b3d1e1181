"""dit.quant formats, packing, scales and the quantized linear against its fake-quant simulation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dit.quant import FormatError, QuantLinear, WeightSpec, fake_quant, fp4dit_fake_quant, get_format
from dit.quant.observers import (fake_quant_weight, quantize_tokens, scale_values, scales_from_amax, search_clipping,
                                 weight_amax)
from dit.quant.packing import pack, unpack


@pytest.mark.parametrize("name, top", [("e2m1", 6.0), ("e1m2", 3.5), ("e3m0", 16.0), ("e2m3", 7.5), ("e3m2", 28.0),
                                       ("e3m4", 31.0), ("e4m3", 448.0), ("e5m2", 57344.0), ("int4", 7.0)])
def test_grid_maxima(name, top):
    fmt = get_format(name)
    assert fmt.max == top
    assert float(fmt.grid.max()) == top and float(fmt.grid.min()) == -top
    assert float(fmt.round(torch.tensor([1e9]))) == top  # saturates at the top


def test_grids_equal_their_definitions():
    assert get_format("e2m1").grid.tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert get_format("e3m0").grid[7:].tolist() == [0, 0.25, 0.5, 1, 2, 4, 8, 16]
    assert get_format("e1m2").grid[7:].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]
    e2m3 = get_format("e2m3").grid
    assert float(e2m3[e2m3 > 0].min()) == 0.125 and len(e2m3) == 63
    # E4M3 through torch's float8_e4m3fn: every finite float8 value, max 448 (not the 480 of the formula)
    fp8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(get_format("e4m3").grid, torch.unique(fp8[torch.isfinite(fp8)]))
    assert get_format("e4m3").max == torch.finfo(torch.float8_e4m3fn).max == 448.0
    assert get_format("fp8_e4m3fn") == get_format("e4m3")


@pytest.mark.parametrize("name", ["e2m1", "e1m2", "e3m0", "e2m3", "e3m2", "e3m4", "e4m3", "e5m2", "int4", "int6",
                                  "int8"])
def test_rounding_lands_on_grid_is_idempotent_and_codes_roundtrip(name):
    fmt = get_format(name)
    y = torch.randn(4096) * fmt.max / 3
    q = fmt.round(y)
    assert torch.isin(q, fmt.grid).all()
    assert torch.equal(fmt.round(q), q)
    # nearest: no grid value is closer than the chosen one
    dist = (y[:, None] - fmt.grid[None, :]).abs().min(1).values
    assert torch.allclose((y - q).abs(), dist, atol=1e-6 * fmt.max)
    assert torch.equal(fmt.decode(fmt.encode(q)), q)


def test_real_valued_bias_puts_the_top_at_maxval_and_ste_passes_gradients():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    q = fake_quant(x, "e2m1", torch.tensor(2.5 / 6))
    assert float(q.detach().max()) == pytest.approx(2.5) and float(q.detach().min()) == pytest.approx(-2.5)
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fp4dit_flexible_bias_grid_differs_from_scaled_grid():
    grid = (fp4dit_fake_quant(torch.linspace(0, 1, 2001), "e2m1", 1.0) * 1e5).round().unique() / 1e5
    assert torch.allclose(grid, torch.tensor([0, 1 / 12, 1 / 6, 0.25, 0.375, 0.5, 0.75, 1.0]), atol=1e-5)
    scaled = fake_quant(torch.linspace(0, 1, 2001), "e2m1", torch.tensor(1 / 6)).unique()
    assert torch.allclose(scaled, torch.tensor([0, 1 / 12, 1 / 6, 0.25, 1 / 3, 0.5, 2 / 3, 1.0]), atol=1e-6)


@pytest.mark.parametrize("bad", ["fp4_e3m2", "fp8_e2m1", "e0m3", "e5m5", "int9", "nf4"])
def test_impossible_formats_are_clear_errors(bad):
    with pytest.raises(FormatError, match="fp|int|ExMy|bits|exponent"):
        get_format(bad)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_pack_unpack_is_lossless(bits):
    codes = torch.randint(0, 2 ** bits, (5, 3, 64), dtype=torch.int32).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack(packed, bits, 64), codes)


def _linear(i: int = 64, o: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(i, o)
    lin.weight.data[3, 5] = 0.9  # an outlier
    return lin


@pytest.mark.parametrize("spec, act, out_group", [
    (WeightSpec("e2m1", "group", 32), "e2m3", None),
    (WeightSpec("e3m0", "group", 16), "e3m4", None),
    (WeightSpec("int4", "group", 32), "int6", 16),
    (WeightSpec("e2m3", "channel"), None, None),
    (WeightSpec("e4m3", "channel"), "e4m3", None),
    (WeightSpec("e2m1", "mx"), "e2m3", None),
    (WeightSpec("e3m4", "tensor"), "int8", 12),
])
def test_quantized_linear_equals_its_fake_quant_simulation(spec, act, out_group):
    lin = _linear()
    x = torch.randn(2, 7, 64)
    scale = search_clipping(lin.weight.detach(), x.reshape(-1, 64), spec)
    layer = QuantLinear.from_linear(lin, spec, scale, act, out_group)
    w_sim = fake_quant_weight(lin.weight.detach(), spec, scale)
    xs = quantize_tokens(x, act) if act else x
    y_sim = F.linear(xs, w_sim, lin.bias.detach())
    if out_group and act:
        y_sim = quantize_tokens(y_sim, act, out_group)
    assert torch.allclose(layer(x), y_sim, atol=1e-5, rtol=1e-5)
    assert torch.allclose(layer.weight, w_sim)
    assert layer.qweight.dtype in (torch.uint8, torch.float8_e4m3fn)
    if spec.fmt.bits == 4:
        assert layer.qweight.numel() == lin.weight.numel() // 2  # two codes per byte
    # the error is that of a real quantizer: small, not zero
    w = lin.weight.detach()
    rel = float((w_sim - w).pow(2).sum() / w.pow(2).sum())
    assert 0 < rel < 0.05


def test_fp8_rowwise_scaled_mm_path_matches_simulation():
    lin = _linear(64, 32)
    spec = WeightSpec("e4m3", "channel")
    layer = QuantLinear.from_linear(lin, spec, scales_from_amax(weight_amax(lin.weight, spec), spec), "e4m3")
    x = torch.randn(5, 64)
    reference = layer(x)
    layer.scaled_mm = True  # torch supports row-wise scaled FP8 matmul on CPU (functionally; it is not fast)
    assert layer._use_scaled_mm(x)
    assert torch.allclose(layer(x), reference, atol=1e-4, rtol=1e-4)


def test_clipping_search_never_worse_than_minmax():
    lin = _linear(128, 64)
    x = torch.randn(256, 128)
    spec = WeightSpec("e2m1", "group", 64)
    minmax = scales_from_amax(weight_amax(lin.weight, spec), spec)
    searched = search_clipping(lin.weight.detach(), x, spec)

    def err(s: torch.Tensor) -> float:
        w = lin.weight.detach()
        return float((x @ (w - fake_quant_weight(w, spec, s)).t()).pow(2).sum())
    assert err(searched) <= err(minmax) + 1e-6
    assert (scale_values(searched) <= scale_values(minmax) + 1e-7).all()


def test_mx_scales_are_powers_of_two_aligned_to_emax():
    lin = _linear(64, 8)
    spec = WeightSpec("e2m1", "mx")
    s = scale_values(scales_from_amax(weight_amax(lin.weight, spec), spec))
    assert s.shape == (8, 2)
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    amax = weight_amax(lin.weight, spec)
    assert torch.equal(s, torch.exp2(torch.floor(torch.log2(amax)) - 2))  # E2M1 emax = 2 (OCP MX v1.0)


def test_module_to_dtype_keeps_the_codes():
    lin = _linear()
    spec = WeightSpec("e4m3", "channel")
    layer = QuantLinear.from_linear(lin, spec, scales_from_amax(weight_amax(lin.weight, spec), spec))
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.float8_e4m3fn and layer.wscale.dtype == torch.float16
    assert layer.bias.dtype == torch.bfloat16


def test_report_puts_round_to_nearest_errors_in_their_own_column():
    """A block without AdaRound (8-bit layers, --iters 0) reports its error as round-to-nearest, not AdaRound."""
    from dit.quant.report import format_report

    report = {"preset": "w8a8", "grid": "fp", "source": "a", "output": "b", "formats": {"weight": "e4m3"},
              "bytes": {"source_file": 4_000_000, "quantized_file": 1_000_000, "file_ratio": 0.25,
                        "source_in_memory": 4_000_000, "quantized_in_memory": 1_000_000, "memory_ratio": 0.25},
              "calibration": {"inputs": 8, "trajectory_seconds": 1, "calibration_seconds": 1, "total_seconds": 2},
              "blocks": {"blocks.0": {"output_mse": 0.125, "relative_error": 0.01, "rtn_output_mse": None},
                         "blocks.1": {"output_mse": 0.25, "relative_error": 0.02, "rtn_output_mse": 0.5}},
              "layers": {}}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in format_report(report).splitlines() if line.startswith("| blocks.")}
    assert rows["blocks.0"] == ["0.1250", "not run"]
    assert rows["blocks.1"] == ["0.5000", "0.2500"]
