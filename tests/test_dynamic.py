"""DyDiT (dit.dynamic): routers, sliced inference, token gather/scatter, FLOPs loss, training, save/load."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dit import dynamic as dy
from dit.attention import ATTENTION_REGISTRY
from dit.attention.base import AttentionOp
from dit.model import DiT

TINY = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)
N_TOKENS = (16 // 4) ** 2


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero adaLN / final layer so that every block really contributes (adaLN-Zero starts as identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _static(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    return _randomize(DiT(**{**TINY, **overrides}), seed)


def _inputs(n: int = 3, same_t: bool = False, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=gen)
    t = torch.full((n,), 420) if same_t else torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, 11, (n,), generator=gen)  # 10 = the null (CFG) class
    return x, t, y


def _drop(model: DiT, heads_off: dict[int, list[int]], groups_off: dict[int, list[int]]) -> None:
    """Force router outputs off (bias -50) for the given heads / groups of each layer (index >= 1)."""
    with torch.no_grad():
        for layer, heads in heads_off.items():
            for h in heads:
                model.blocks[layer].head_router.bias[h - 1] = -50.0
        for layer, groups in groups_off.items():
            for g in groups:
                model.blocks[layer].channel_router.bias[g - 1] = -50.0


# ------------------------------------------------------------------ exactness with every router on
def test_all_on_equals_static_exactly():
    static = _static()
    dynamic = DiT(**TINY, dynamic={"target": 0.5})
    missing, unexpected = dynamic.load_state_dict(static.state_dict(), strict=False)
    assert not unexpected and missing and all("router" in k for k in missing)
    x, t, y = _inputs()
    static.eval(), dynamic.eval()
    with torch.no_grad():
        assert torch.equal(static(x, t, y), dynamic(x, t, y))                  # per-sample t: masked path
        xs, ts, ys = _inputs(same_t=True)
        assert torch.equal(static(xs, ts, ys), dynamic(xs, ts, ys))            # shared t: sliced path
    static.train(), dynamic.train()
    torch.manual_seed(3)
    a = static(x, t, y)
    torch.manual_seed(3)
    b = dynamic(x, t, y)                                                       # Gumbel + STE, all on
    assert torch.equal(a, b)
    assert dy.flops_ratio(dynamic).tolist() == [1.0, 1.0, 1.0]


def test_convert_to_dynamic_gives_equal_outputs():
    static = _static(seed=4).eval()
    dynamic = dy.convert_to_dynamic(static, {"target": 0.6, "tau": 4.0})
    assert dynamic.config.dynamic == {"target": 0.6, "tau": 4.0}
    assert dynamic.blocks[0].head_router.bias.min().item() == 15.0
    assert not dynamic.training
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(static(x, t, y), dynamic(x, t, y))
    with pytest.raises(ValueError, match="already dynamic"):
        dy.convert_to_dynamic(dynamic, {"target": 0.5})


# ------------------------------------------------------------------ sliced == masked
def test_sliced_inference_equals_masked_and_zeroed_weights():
    static = _static(seed=5)
    dynamic = dy.convert_to_dynamic(static, {"target": 0.5, "token_routing": False}).eval()
    heads_off, groups_off = {0: [1, 3], 1: [2]}, {0: [2], 1: [1, 2, 3]}
    _drop(dynamic, heads_off, groups_off)
    x, t, y = _inputs(n=4, same_t=True)
    with torch.no_grad():
        sliced = dynamic(x, t, y)
        assert all(len(b._slice_cache) > 0 for b in dynamic.blocks)           # the sliced kernels ran
        dy.set_dynamic_execution(dynamic, "masked")
        masked = dynamic(x, t, y)
        dy.set_dynamic_execution(dynamic, "auto")
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)

    # independent reference: a static model with the dropped heads' proj columns and groups' fc2 columns zeroed
    reference = _static(seed=5).eval()
    dh, gs = 64 // 4, 256 // 4
    with torch.no_grad():
        for layer, heads in heads_off.items():
            for h in heads:
                reference.blocks[layer].attn.proj.weight[:, h * dh:(h + 1) * dh] = 0
        for layer, groups in groups_off.items():
            for g in groups:
                reference.blocks[layer].mlp.fc2.weight[:, g * gs:(g + 1) * gs] = 0
        torch.testing.assert_close(reference(x, t, y), sliced, atol=1e-5, rtol=1e-5)
    ratio = dy.flops_ratio(dynamic)
    assert ratio.shape == (4,) and 0.3 < ratio[0].item() < 0.7


def test_slice_cache_follows_weight_changes():
    dynamic = dy.convert_to_dynamic(_static(seed=6), {"target": 0.5, "token_routing": False}).eval()
    _drop(dynamic, {0: [1], 1: [1]}, {0: [1], 1: [1]})
    x, t, y = _inputs(n=2, same_t=True)
    with torch.no_grad():
        dynamic(x, t, y)
        dynamic.blocks[0].attn.qkv.weight.mul_(1.5)
        dynamic.blocks[1].mlp.fc1.weight.mul_(0.5)
        sliced = dynamic(x, t, y)
        dy.set_dynamic_execution(dynamic, "masked")
        torch.testing.assert_close(sliced, dynamic(x, t, y), atol=1e-5, rtol=1e-5)


def test_token_gather_scatter_equals_masked_tokens():
    dynamic = dy.convert_to_dynamic(_static(seed=7), {"target": 0.5}).eval()
    _drop(dynamic, {1: [2]}, {0: [3]})
    with torch.no_grad():
        for block in dynamic.blocks:
            block.token_router[2].bias.fill_(0.0)         # about half the tokens now skip the MLP
    x, t, y = _inputs(n=4, same_t=True)
    with torch.no_grad():
        gathered = dynamic(x, t, y)
        kept = [s["tokens"] for s in dy.dynamic_stats(dynamic)]
        dy.set_dynamic_execution(dynamic, "masked")
        masked = dynamic(x, t, y)
        dy.set_dynamic_execution(dynamic, "auto")
    assert all(0.0 < k < 1.0 for k in kept), kept
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=1e-5)

    with torch.no_grad():                                  # no token kept: the MLP is skipped entirely
        for block in dynamic.blocks:
            block.token_router[2].bias.fill_(-1e4)
        gathered = dynamic(x, t, y)
        dy.set_dynamic_execution(dynamic, "masked")
        torch.testing.assert_close(gathered, dynamic(x, t, y), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ FLOPs loss
def test_flops_loss_on_known_masks():
    dynamic = dy.convert_to_dynamic(_static(seed=8), {"target": 0.3, "hold_steps": 100, "warmup_steps": 100})
    dynamic.eval()
    dy.set_fixed_width(dynamic, active=2, token_keep=True)          # half the heads and groups, all tokens
    x, t, y = _inputs(n=2)
    with torch.no_grad():
        dynamic(x, t, y)
    assert torch.allclose(dy.flops_ratio(dynamic), torch.tensor([0.5, 0.5]))
    assert dynamic.auxiliary_losses(0)["flops"].item() == pytest.approx(2.0 * (0.5 - 1.0) ** 2)
    assert dynamic.auxiliary_losses(150)["flops"].item() == pytest.approx(2.0 * (0.5 - 0.65) ** 2)
    assert dynamic.auxiliary_losses(10_000)["flops"].item() == pytest.approx(2.0 * (0.5 - 0.3) ** 2)

    dy.set_fixed_width(dynamic, active=4, token_keep=False)         # all width, no token gets the MLP
    _drop(dynamic, {0: [1, 2], 1: [1, 2]}, {})                       # 2 of 4 heads
    with torch.no_grad():
        dynamic(x, t, y)
    f_attn = 4 * N_TOKENS * 64 ** 2 + 2 * N_TOKENS ** 2 * 64
    f_mlp = 8 * N_TOKENS * 64 ** 2
    expected = 0.5 * f_attn / (f_attn + f_mlp)
    assert dy.flops_ratio(dynamic)[0].item() == pytest.approx(expected)
    assert dy.target_at_step(99, dynamic.config.dynamic) == 1.0
    assert dy.target_at_step(200, dynamic.config.dynamic) == pytest.approx(0.3)


def test_flops_loss_has_router_gradients_in_training():
    dynamic = DiT(**TINY, dynamic={"target": 0.5, "hold_steps": 0, "warmup_steps": 0})
    x, t, y = _inputs(n=4)
    dynamic(x, t, y)
    ema = copy.deepcopy(dynamic)                     # EMA copies after a training forward must work
    assert all(block._record is None for block in ema.blocks)
    loss = dynamic.auxiliary_losses(5)["flops"]
    assert loss.item() == pytest.approx(2 * 0.25)
    loss.backward()
    for block in dynamic.blocks:
        assert block.head_router.bias.grad.abs().sum() > 0
        assert block.channel_router.bias.grad.abs().sum() > 0
        assert block.token_router[2].bias.grad.abs().sum() > 0


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5, True, "half"])
def test_target_outside_unit_interval_is_an_error(target):
    with pytest.raises(ValueError, match=r"target .* \(0, 1\]"):
        DiT(**TINY, dynamic={"target": target})


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown dynamic option"):
        DiT(**TINY, dynamic={"target": 0.5, "lambda": 0.5})
    with pytest.raises(ValueError, match="token_routing=False"):
        DiT(**TINY, mlp_type="mixffn", dynamic={"target": 0.5, "channel_router": False})
    with pytest.raises(ValueError, match="every router off"):
        DiT(**TINY, dynamic={"head_router": False, "channel_router": False, "token_routing": False})
    with pytest.raises(ValueError, match="no dynamic blocks"):
        dy.dynamic_stats(DiT(**TINY))


# ------------------------------------------------------------------ other attention operators (masked fallback)
class _FewHeads(AttentionOp):
    """A stand-in for LiT-style operators: its own head count (2), qkv / proj keys, a per-channel term."""

    name = "_test_fewheads"

    def __init__(self, dim: int, num_heads: int, **_: object):
        super().__init__()
        self.num_heads, self.head_dim = 2, dim // 2
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Parameter(torch.ones(dim))

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, t, d = h.shape
        q, k, v = self.qkv(h).reshape(n, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        kv = torch.relu(k).transpose(-2, -1) @ v
        out = (torch.relu(q) @ kv) / (torch.relu(q) @ torch.relu(k).sum(2, keepdim=True).transpose(-2, -1) + 1e-6)
        out = out.transpose(1, 2).reshape(n, t, d) + self.dwc * h
        return self.proj(out)

    def flops(self, num_tokens: int) -> float:
        d = self.proj.in_features
        return float(4 * num_tokens * d * d + 2 * num_tokens * d * d // 2)


@pytest.fixture
def few_heads_registered():
    """Register the stand-in operator for one test only (the registry is global)."""
    ATTENTION_REGISTRY[_FewHeads.name] = _FewHeads
    yield
    ATTENTION_REGISTRY.pop(_FewHeads.name, None)


@pytest.mark.parametrize("attention", ["_test_fewheads"] + [a for a in ("linear", "proxy") if a in ATTENTION_REGISTRY])
def test_other_operators_use_masked_heads(attention, few_heads_registered):
    static = _static(seed=9, attention=attention)
    dynamic = dy.convert_to_dynamic(static, {"target": 0.5, "token_routing": False}).eval()
    x, t, y = _inputs(n=2, same_t=True)
    with torch.no_grad():
        torch.testing.assert_close(static.eval()(x, t, y), dynamic(x, t, y), atol=1e-6, rtol=1e-6)
        _drop(dynamic, {0: [1], 1: [3]}, {0: [2]})
        out = dynamic(x, t, y)
        dy.set_dynamic_execution(dynamic, "masked")
        torch.testing.assert_close(out, dynamic(x, t, y), atol=1e-5, rtol=1e-5)
        # reference: the op's output projection with the dropped channel groups' input columns zeroed
        d0 = dynamic.blocks[0].head_mask_target().in_features // 4
        d1 = dynamic.blocks[1].head_mask_target().in_features // 4
        name = getattr(static.blocks[0].attn, "dynamic_head_target", "proj")
        getattr(static.blocks[0].attn, name).weight[:, 1 * d0:2 * d0] = 0
        getattr(static.blocks[1].attn, name).weight[:, 3 * d1:4 * d1] = 0
        static.blocks[0].mlp.fc2.weight[:, 2 * 64:3 * 64] = 0
        torch.testing.assert_close(static(x, t, y), out, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ training, save / load, sampling
def test_tiny_dynamic_dit_trains_saves_loads_and_samples(tmp_path):
    from dit.data import load_digits
    from dit.schedulers import get_objective, sample

    torch.manual_seed(0)
    model = DiT(**TINY, dynamic={"target": 0.5, "hold_steps": 0, "warmup_steps": 10})
    images, labels = load_digits("train", size=16)
    objective = get_objective("ddpm")
    routers = [p for n, p in model.named_parameters() if "router" in n]
    others = [p for n, p in model.named_parameters() if "router" not in n and p.requires_grad]
    # routers start saturated (bias 15, tau 5): a large router lr lets them move within a CPU-sized test
    opt = torch.optim.AdamW([{"params": others, "lr": 2e-3}, {"params": routers, "lr": 0.5}], weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses, ratios = [], []
    model.train()
    for step in range(36):
        idx = torch.randint(0, len(images), (16,), generator=gen)
        batch = objective.noise(images[idx], generator=gen)
        loss = objective.loss_terms(model(batch.x_t, batch.t, labels[idx]), batch)["loss"].mean()
        flops = model.auxiliary_losses(step)["flops"]
        ratios.append(dy.flops_ratio(model).mean().item())
        losses.append(loss.item())
        (loss + flops).backward()
        opt.step()
        opt.zero_grad()
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6, losses
    assert ratios[0] == 1.0
    assert abs(sum(ratios[-6:]) / 6 - 0.5) < 0.25, ratios

    model.eval()
    model.save_pretrained(tmp_path / "dydit")
    loaded = DiT.from_pretrained(tmp_path / "dydit").eval()
    assert loaded.config.dynamic == model.config.dynamic
    x, t, y = _inputs(n=2, same_t=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), atol=0, rtol=0)
    dy.reset_dynamic_stats(loaded)
    out = sample(loaded, torch.tensor([3, 7]), [0, 1], (1, 16, 16), scheduler_name="ddim", steps=4,
                 cfg_scale=2.0, null_class=10, progress=False)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    stats = dy.dynamic_stats(loaded)
    assert [s["forwards"] for s in stats] == [4, 4] and all(0 < s["heads"] <= 1 for s in stats)
    schedule = dy.timestep_masks(loaded, [999, 500, 0])
    assert len(schedule) == 3 and all(layer["heads"][0] == 0 for step in schedule for layer in step["layers"])


def test_complete_model_bypasses_routers():
    static = _static(seed=10).eval()
    dynamic = dy.convert_to_dynamic(static, {"target": 0.5}).eval()
    dy.set_fixed_width(dynamic, active=1, token_keep=False)
    x, t, y = _inputs()
    with torch.no_grad():
        assert not torch.equal(dynamic(x, t, y), static(x, t, y))
        with dy.complete_model(dynamic):
            assert torch.equal(dynamic(x, t, y), static(x, t, y))
