"""Adapters (dit.adapters): LoRA via peft, TD-LoRA, DiffScaler on every attention variant; files; bad input."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dit import adapters as A
from dit.adapters.base import DeltaLinear
from dit.model import DiT

KINDS = ["lora", "td-lora", "diffscaler"]
VARIANTS = {
    "softmax": dict(attention="softmax"),
    "linear": dict(attention="linear"),
    "proxy": dict(attention="proxy"),
    "dynamic": dict(attention="softmax", dynamic={"target": 0.5}),
}
ALL_TARGETS = ["attn", "mlp", "adaln", "final"]


def tiny(seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    args = dict(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=False)
    args.update(kw)
    model = DiT(**args)
    with torch.no_grad():  # adaLN-Zero starts as identity: give every weight something to do
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(n: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, size, size, generator=g), torch.tensor([20, 500, 900][:n]), torch.tensor([1, 2, 3][:n])


@torch.no_grad()
def run(model, x, t, y):
    return model(x, t, y)


def perturb(model, name="default", std=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in A.adapter_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g) * std)


def no_adapter_modules(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return not any(isinstance(m, (LoraLayer, DeltaLinear)) for m in model.modules()) and \
        "_dit_adapter_state" not in model.__dict__


# ------------------------------------------------------------------------------------------------ identity
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_identity_and_removal_restores_exactly(kind, variant):
    model = tiny(**VARIANTS[variant])
    x, t, y = inputs()
    ref = run(model, x, t, y)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    spec = A.add_adapter(model, kind, rank=2, targets=ALL_TARGETS)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in flags)  # base frozen
    assert spec.modules and all(m.startswith(("blocks.", "final_layer.")) for m in spec.modules)
    assert torch.equal(run(model, x, t, y), ref)  # bit-identical at init (B = 0, W_up = 0, a = b = 0)
    perturb(model)
    changed = run(model, x, t, y)
    assert not torch.allclose(changed, ref)
    A.remove_adapters(model)
    assert no_adapter_modules(model)
    assert torch.equal(run(model, x, t, y), ref)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # flags restored


def test_default_targets_cover_every_attention_operator():
    proxy = tiny(attention="proxy")
    names = {m.split(".", 2)[2] for m in A.resolve_targets(proxy, None)}
    assert names == {"attn.proxy_qkv", "attn.proxy_proj", "attn.cross_q", "attn.cross_kv", "attn.cross_out",
                     "attn.qkv", "attn.proj", "attn.shift_qkv", "attn.shift_proj"}
    lin = tiny(attention="linear")
    assert {m.split(".", 2)[2] for m in A.resolve_targets(lin, ["attn"])} == {"attn.qkv", "attn.proj"}
    dyn = tiny(dynamic={"target": 0.5})
    assert not any("router" in m for m in A.resolve_targets(dyn, ALL_TARGETS))


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact_and_file_is_small(kind, tmp_path):
    model = tiny()
    x, t, y = inputs()
    A.add_adapter(model, kind, rank=2, targets=["attn", "mlp"])
    perturb(model)
    adapted = run(model, x, t, y)
    path = A.save_adapter(model, tmp_path / "a.safetensors")
    tensors = A.get_adapter_kind(kind).state_dict(model, "default")
    A.remove_adapters(model)
    loaded = A.load_adapter_file(path)
    assert loaded.spec.kind == kind and loaded.spec.rank == 2 and loaded.metadata["kind"] == kind
    assert json.loads(loaded.metadata["targets"]) == ["attn", "mlp"] and float(loaded.metadata["alpha"]) == 2.0
    assert loaded.base_hash == A.base_weights_hash(model)
    assert set(loaded.tensors) == set(tensors) and all(torch.equal(loaded.tensors[k], tensors[k]) for k in tensors)
    with A.adapters_applied(model, [(path, 1.0)]) as info:
        assert torch.equal(run(model, x, t, y), adapted)
    assert info[0]["file"] == "a.safetensors" and info[0]["sha256"] == loaded.file_hash and info[0]["scale"] == 1.0
    assert no_adapter_modules(model)
    # small: the adapter alone, not the base (ratio stated in README: ~3-4% for the bundled model)
    base_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size < 0.35 * base_bytes
    assert loaded.num_params < 0.3 * sum(p.numel() for p in model.parameters())


def test_lora_merge_equals_unmerged_and_unmerge_restores():
    model = tiny()
    x, t, y = inputs()
    ref = run(model, x, t, y)
    A.add_adapter(model, "lora", rank=4, alpha=8, targets=ALL_TARGETS)
    perturb(model)
    unmerged = run(model, x, t, y)
    A.merge_adapter(model)
    assert torch.allclose(run(model, x, t, y), unmerged, atol=1e-5)
    A.unmerge_adapter(model)
    assert torch.allclose(run(model, x, t, y), unmerged, atol=1e-6)
    A.merge_adapter(model)
    A.remove_adapters(model)  # removal of a merged adapter unmerges first
    assert torch.allclose(run(model, x, t, y), ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["td-lora", "diffscaler"])
def test_non_mergeable_kinds_say_so(kind):
    model = tiny()
    A.add_adapter(model, kind, rank=2)
    with pytest.raises(ValueError, match="cannot be merged"):
        A.merge_adapter(model)


def test_strength_scales_the_update_and_diffscaler_tasks_mix_linearly(tmp_path):
    # Only the final Linear adapted: the model output is affine in each adapter's strength.
    model = tiny()
    x, t, y = inputs()
    base = run(model, x, t, y)
    files = []
    for i in range(2):
        A.add_adapter(model, "diffscaler", rank=2, targets=["final_layer.linear"])
        perturb(model, seed=10 + i)
        files.append(A.save_adapter(model, tmp_path / f"task{i}.safetensors"))
        A.remove_adapters(model)
    with A.adapters_applied(model, [(files[0], 1.0)]):
        d0 = run(model, x, t, y) - base
    with A.adapters_applied(model, [(files[1], 1.0)]):
        d1 = run(model, x, t, y) - base
    with A.adapters_applied(model, [(files[0], 0.5)]):
        assert torch.allclose(run(model, x, t, y) - base, 0.5 * d0, atol=1e-5)
    with A.adapters_applied(model, [(files[0], 0.3), (files[1], 0.7)]):
        assert torch.allclose(run(model, x, t, y) - base, 0.3 * d0 + 0.7 * d1, atol=1e-5)
    assert torch.equal(run(model, x, t, y), base)


def test_td_lora_router_reads_the_timestep_and_ema_copies_are_independent():
    model = tiny()
    x, _, y = inputs()
    A.add_adapter(model, "td-lora", rank=2, options={"experts": 3})
    perturb(model, std=0.5)
    layer = model.blocks[0].attn.qkv.adapter_deltas["default"]
    with torch.no_grad():
        g_early = layer.gates(model.t_embedder(torch.tensor([10])))
        g_late = layer.gates(model.t_embedder(torch.tensor([990])))
    assert g_early.shape == (1, 3) and torch.allclose(g_early.sum(), torch.tensor(1.0))
    assert not torch.allclose(g_early, g_late)
    ema = copy.deepcopy(model)  # as the EMA does: the copy must read its own timestep embedding
    run(model, x, torch.tensor([999, 999, 999]), y)
    t = torch.tensor([5, 400, 800])
    assert torch.equal(run(ema, x, t, y), run(model, x, t, y))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_give_clear_errors_and_leave_the_model_untouched(tmp_path):
    model = tiny()
    x, t, y = inputs()
    ref = run(model, x, t, y)
    with pytest.raises(ValueError, match=r"valid targets: attn, mlp, adaln, final.*attn\.qkv"):
        A.add_adapter(model, "lora", targets=["attn", "to_q"])
    with pytest.raises(ValueError, match=r"rank 64 is larger than layer blocks\.0\.attn\.\w+ allows"):
        A.add_adapter(model, "diffscaler", rank=64)
    with pytest.raises(ValueError, match="unknown adapter kind 'dora'; valid kinds: lora, td-lora, diffscaler"):
        A.add_adapter(model, "dora")
    with pytest.raises(ValueError, match="unknown td-lora option"):
        A.add_adapter(model, "td-lora", options={"expert": 2})
    assert no_adapter_modules(model) and torch.equal(run(model, x, t, y), ref)

    A.add_adapter(model, "lora", rank=2)
    perturb(model)
    good = A.save_adapter(model, tmp_path / "good.safetensors")
    A.remove_adapters(model)

    other_weights = tiny(seed=5)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"weights hash .* but this model's weights hash to"):
        A.attach_adapter(other_weights, good)
    other_variant = tiny(attention="linear")
    with pytest.raises(ValueError, match=r"another model variant:\n  attention: adapter made for \['softmax'"):
        A.attach_adapter(other_variant, good)
    wider = tiny(hidden_size=48, num_heads=2)
    with pytest.raises(ValueError, match="hidden_size: adapter made for 32, this model has 48"):
        A.attach_adapter(wider, good)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json" + bytes(100))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        A.attach_adapter(model, corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        A.load_adapter_file(truncated)
    plain = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a DiT Studio adapter"):
        A.attach_adapter(model, plain)
    # tensors that do not fit (shape edited in the file): named, nothing attached half-way
    f = A.load_adapter_file(good)
    key = next(k for k in f.tensors if k.endswith("lora_A.weight"))
    f.tensors[key] = torch.zeros(3, f.tensors[key].shape[1])
    with pytest.raises(ValueError, match=rf"(?s)shapes differ.*{key}: file \(3, 32\) vs model \(2, 32\)"):
        with A.adapters_applied(model, [(good, 1.0), (f, 1.0)]):
            pass
    for m in (model, other_weights, other_variant, wider):
        assert no_adapter_modules(m)
    assert torch.equal(run(model, x, t, y), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_a_failure_while_loading_rolls_back(kind, tmp_path, monkeypatch):
    model = tiny()
    x, t, y = inputs()
    ref = run(model, x, t, y)
    A.add_adapter(model, kind, rank=2)
    path = A.save_adapter(model, tmp_path / "a.safetensors")
    A.remove_adapters(model)
    kind_obj = A.get_adapter_kind(kind)

    def broken(*_a, **_k):
        raise ValueError("disk hiccup")

    monkeypatch.setattr(kind_obj, "load_state_dict", broken)
    with pytest.raises(ValueError, match="disk hiccup"):
        A.attach_adapter(model, path)
    assert not A.attached_adapters(model)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, (LoraLayer, DeltaLinear)) for m in model.modules())
    assert torch.equal(run(model, x, t, y), ref)


# ------------------------------------------------------------------------------------------------ sampling
def test_generate_with_adapter_records_it_and_base_stays_pixel_identical(tmp_path):
    from dit.pipeline import generate, read_png_parameters

    model = tiny()
    A.add_adapter(model, "diffscaler", rank=2, targets=["attn", "final"])
    perturb(model, std=0.3)
    path = A.save_adapter(model, tmp_path / "inv.safetensors")
    A.remove_adapters(model)
    kw = dict(scheduler="flow-euler", steps=4, cfg_scale=2.0, objective="flow", progress=False)
    before = generate(model, [1, 2], [0, 1], **kw)
    adapted = generate(model, [1, 2], [0, 1], adapters=[(str(path), 0.8)], **kw)
    after = generate(model, [1, 2], [0, 1], **kw)
    assert [im.tobytes() for im in before.images] == [im.tobytes() for im in after.images]
    assert [im.tobytes() for im in before.images] != [im.tobytes() for im in adapted.images]
    files = adapted.save(tmp_path / "out")
    rec = read_png_parameters(files[0])["extras"]["adapters"][0]
    assert rec["file"] == "inv.safetensors" and rec["scale"] == 0.8 and rec["kind"] == "diffscaler"
    assert rec["sha256"] == A.load_adapter_file(path).file_hash


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny flow-matching digits base checkpoint (16 px, 2 blocks)."""
    from dit.checkpoint import save_checkpoint

    model = tiny(input_size=16, patch_size=4, hidden_size=32)
    folder = tmp_path_factory.mktemp("base") / "base"
    save_checkpoint(model, folder, {"objective": "flow", "default_scheduler": "flow-euler", "default_steps": 4,
                                    "default_cfg_scale": 2.0, "class_names": [str(i) for i in range(10)],
                                    "data": "digits"})
    return folder


def adapter_args(base, out, *extra):
    return ["--init-from", str(base), "--data", "digits-inverted", "--image-size", "16", "--objective", "flow",
            "--batch-size", "8", "--lr", "1e-2", "--ema-decay", "0.5", "--sample-steps", "2", "--preview-images", "0",
            "--log-every", "1", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("kind", KINDS)
def test_train_adapter_only_adapter_learns_and_exports_the_adapter_alone(kind, tiny_base, tmp_path):
    from dit.checkpoint import weights_file
    from dit.training import parse_args, train
    from safetensors.torch import load_file

    out = tmp_path / "run"
    export = train(parse_args(adapter_args(tiny_base, out, "--adapter", kind, "--adapter-rank", "2",
                                           "--adapter-targets", "attn", "final", "--max-steps", "3",
                                           "--checkpointing-steps", "3")))
    files = sorted(p.name for p in export.iterdir())
    assert files == ["adapter.safetensors", "adapter_card.md"]  # not a copy of the base
    f = A.load_adapter_file(export / "adapter.safetensors")
    assert f.spec.kind == kind and f.metadata["training"] and json.loads(f.metadata["training"])["steps"] == 3
    assert "python train.py" in (export / "adapter_card.md").read_text()
    # the base weights in the training state are unchanged; the adapter moved away from its init
    base = load_file(str(weights_file(tiny_base)))
    state = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    for key, value in state.items():
        plain = key.replace(".base_layer.", ".")
        if plain in base:
            assert torch.equal(value, base[plain]), key
    zero_init = [k for k in f.tensors if k.endswith(("lora_B.weight", "lora_B", ".up", ".a"))]
    assert zero_init and any(f.tensors[k].abs().sum() > 0 for k in zero_init)
    # the optimizer holds state for the adapter's parameters only
    opt = torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=True)
    n_state = len(opt["state"])
    assert n_state == len(f.tensors), (n_state, len(f.tensors))
    assert sum(v["exp_avg"].numel() for v in opt["state"].values()) == f.num_params


def test_adapter_training_gradients_reach_only_adapter_parameters(tiny_base):
    from dit.adapters.training import build_adapter_model
    from dit.schedulers import get_objective
    from dit.training import parse_args

    args = parse_args(adapter_args(tiny_base, "unused", "--adapter", "td-lora", "--adapter-targets", "attn", "mlp"))
    model = build_adapter_model(args)
    x = torch.randn(4, 1, 16, 16)
    loss = get_objective("flow").training_losses(model, x, torch.tensor([0, 1, 2, 3]))["loss"].mean()
    loss.backward()
    for name, p in model.named_parameters():
        is_adapter = "adapter_deltas" in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name


def test_adapter_run_resumes_exactly(tiny_base, tmp_path):
    from dit.training import parse_args, train

    common = ["--adapter", "lora", "--adapter-rank", "2", "--checkpointing-steps", "2"]
    straight = train(parse_args(adapter_args(tiny_base, tmp_path / "a", *common, "--max-steps", "4")))
    train(parse_args(adapter_args(tiny_base, tmp_path / "b", *common, "--max-steps", "2")))
    resumed = train(parse_args(adapter_args(tiny_base, tmp_path / "b", *common, "--max-steps", "4",
                                            "--resume-from", "latest")))
    a = A.load_adapter_file(straight / "adapter.safetensors").tensors
    b = A.load_adapter_file(resumed / "adapter.safetensors").tensors
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--adapter-rank: checkpoint 2, now 3"):
        train(parse_args(adapter_args(tiny_base, tmp_path / "b", "--adapter", "lora", "--adapter-rank", "3",
                                      "--checkpointing-steps", "2", "--max-steps", "6", "--resume-from", "latest")))


def test_adapter_training_bad_settings(tiny_base, tmp_path):
    from dit.training import parse_args, train

    with pytest.raises(ValueError, match="pass --objective flow"):
        train(parse_args(adapter_args(tiny_base, tmp_path / "x", "--adapter", "lora", "--max-steps", "1")
                         + ["--objective", "ddpm"]))
    with pytest.raises(ValueError, match="--adapter needs the base model"):
        train(parse_args(["--adapter", "lora", "--data", "digits-inverted", "--objective", "flow",
                          "--output-dir", str(tmp_path / "y"), "--max-steps", "1"]))


# ------------------------------------------------------------------------------------------------ CLIs
@pytest.fixture(scope="module")
def tiny_lora(tiny_base, tmp_path_factory):
    from dit.convert import load_any

    model, _ = load_any(str(tiny_base), device="cpu")
    A.add_adapter(model, "lora", rank=2, targets=["attn", "final"])
    perturb(model, std=0.2)
    return A.save_adapter(model, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def test_sample_cli_applies_adapters_and_records_them(tiny_base, tiny_lora, tmp_path):
    from dit.cli.sample import main
    from dit.pipeline import read_png_parameters

    main(["--checkpoint", str(tiny_base), "--labels", "1", "--steps", "2", "--output", str(tmp_path / "a"),
          "--adapter", str(tiny_lora), "--adapter-scale", "0.5", "--no-grid"])
    rec = read_png_parameters(next((tmp_path / "a").glob("*.png")))["extras"]["adapters"]
    assert [(r["file"], r["scale"], r["kind"]) for r in rec] == [("lora.safetensors", 0.5, "lora")]
    with pytest.raises(SystemExit):  # more scales than adapters: a clear error, exit 1
        main(["--checkpoint", str(tiny_base), "--adapter", str(tiny_lora), "--adapter-scale", "1",
              "--adapter-scale", "2", "--output", str(tmp_path / "b")])


def test_merge_cli_writes_base_plus_lora(tiny_base, tiny_lora, tmp_path):
    from dit.adapters.__main__ import main
    from dit.convert import load_any

    out = tmp_path / "merged"
    assert main(["merge", str(tiny_base), str(tiny_lora), str(out)]) == 0
    merged, meta = load_any(str(out), device="cpu")
    base, _ = load_any(str(tiny_base), device="cpu")
    x, t, y = inputs(size=16)
    with A.adapters_applied(base, [(tiny_lora, 1.0)]):
        applied = run(base, x, t, y)
    assert torch.allclose(run(merged.eval(), x, t, y), applied, atol=1e-5)
    assert meta["merged_adapter"]["file"] == "lora.safetensors"
    assert main(["merge", str(tiny_base), str(tiny_lora), str(out)]) == 2  # never overwrites


def test_digits_inverted_data_and_background_report():
    from dit.data import load_digits, load_digits_dataset
    from dit.eval import background_report

    x, y = load_digits("test")
    xi, yi = load_digits_dataset("digits-inverted", "test")
    assert torch.equal(xi, -x) and torch.equal(yi, y)
    assert background_report(xi)["white"] and not background_report(x)["white"]
    with pytest.raises(ValueError, match="valid: digits, digits-inverted"):
        load_digits_dataset("digits-upside-down")


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_model_inference_path_with_adapters_matches_masked_reference(kind):
    from dit.dynamic import set_dynamic_execution

    model = tiny(dynamic={"target": 0.5})
    with torch.no_grad():  # some heads / groups / tokens off, so the inference path really slices and gathers
        for block in model.blocks:
            block.head_router.bias.fill_(-1.0)
            block.channel_router.bias.fill_(-1.0)
    A.add_adapter(model, kind, rank=2, targets=["attn", "mlp"])
    perturb(model)
    x, _, y = inputs()
    t = torch.tensor([400, 400, 400])  # one timestep for the batch: DyDiT's inference execution
    fast = run(model, x, t, y)
    set_dynamic_execution(model, "masked")
    assert torch.allclose(fast, run(model, x, t, y), atol=1e-5)
