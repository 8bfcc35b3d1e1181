"""`--compile` on the CPU: regional compilation agrees with eager, never leaks `_orig_mod.` into checkpoints or
the EMA, falls back to eager with one line when the compiler fails; train.py / sample.py with --compile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit.attention import attention_names
from dit.compile import compile_model, is_compiled, uncompile_model
from dit.config import model_kwargs
from dit.ema import EMA
from dit.model import DiT

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    model = DiT(**model_kwargs("DiT-Micro/4", **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def inputs(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=g), torch.tensor([3, 700][:n]), torch.tensor([1, 10][:n])


@pytest.mark.parametrize("attention", ["softmax", "linear", "proxy"])
def test_compiled_blocks_agree_with_eager_and_keep_keys(attention):
    model = tiny(attention=attention)
    x, t, y = inputs()
    with torch.no_grad():
        eager = model(x, t, y)
    keys = list(model.state_dict())
    report = compile_model(model, backend="aot_eager")
    assert report.compiled == len(model.blocks) and is_compiled(model)
    with torch.no_grad():
        compiled = model(x, t, y)
    assert report.enabled, report.failures
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    uncompile_model(model)
    assert not is_compiled(model)


OPERATOR_OPTIONS = {"proxy": {"window": [2, 2]}}  # 2x2 windows on the 8x8 grid: the shifted layout is exercised


@pytest.mark.parametrize("attention", attention_names())
def test_every_operator_compiles_to_one_graph_shared_by_all_blocks(attention):
    """What GPU speed under --compile rests on: each block traces with no graph break (fullgraph=True), and all
    blocks share ONE graph (per-grid constants such as proxy token orders live in a shared cache built eagerly
    before the blocks), so depth-28 models never hit Dynamo's recompile limit and fall back to eager."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny(attention=attention, attention_options=OPERATOR_OPTIONS.get(attention), input_size=32, depth=4)
    counter = CompileCounter()
    report = compile_model(model, backend=counter, fullgraph=True, verbose=False)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 32, 32, generator=g), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        compiled = model(x, t, y)  # the blocks compile here
        uncompile_model(model)
        eager = model(x, t, y)
    assert report.failures == [] and counter.frame_count == 1, (report.failures, counter.frame_count)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    compile_model(model, backend=counter, fullgraph=True, verbose=False)
    model.train()
    model.enable_gradient_checkpointing()
    model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long)).square().mean().backward()
    assert report.failures == [] and counter.frame_count == 2  # + the training graph, again one for all blocks


def test_inductor_compiled_model_agrees_with_eager_and_trains():
    """The real compiler (Inductor, C++ codegen on this CPU): forward and gradients as eager."""
    model = tiny()
    ref = tiny()
    x, t, y = inputs()
    compile_model(model)
    model.train()
    ref.train()
    out = model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long))
    expected = ref(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        if b.grad is not None:  # Inductor fuses and reorders reductions: equal to ~1e-3 of the gradient's norm
            assert (a.grad - b.grad).norm() <= 1e-2 * b.grad.norm() + 1e-8, name


def test_compile_failure_falls_back_to_eager_with_one_line(capsys):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("simulated compiler crash\nwith a long\ntraceback")

    model = tiny()
    x, t, y = inputs()
    with torch.no_grad():
        eager = model(x, t, y)
    report = compile_model(model, backend=broken_backend)
    capsys.readouterr()
    with torch.no_grad():
        out = model(x, t, y)
        again = model(x, t, y)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(again, eager)
    err = capsys.readouterr().err
    assert err.count("torch.compile failed") == 1 and "running it eager" in err and "Fix:" in err
    assert len(err.strip().splitlines()) == 1
    assert report.failures and not report.enabled


def test_ema_of_a_compiled_model_runs_its_own_weights():
    model = tiny()
    compile_model(model, backend="aot_eager")
    ema = EMA(model, decay=0.5)
    assert not is_compiled(ema.model)
    with torch.no_grad():
        for p in ema.model.parameters():
            p.zero_()
    x, t, y = inputs()
    with torch.no_grad():
        # zero weights give zero output; a copy still calling the original's compiled blocks would not
        assert ema.model(x, t, y).abs().max() == 0
    ema.update(model)
    assert not any("_orig_mod" in k for k in ema.state_dict())


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    proc = subprocess.run([sys.executable, *args], env=full_env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_and_sample_with_compile(tmp_path):
    out = tmp_path / "run"
    _run([str(ROOT / "train.py"), "--data", "digits", "--model", "DiT-Micro/4", "--image-size", "16",
          "--batch-size", "8", "--max-steps", "3", "--checkpointing-steps", "3", "--compile", "--output-dir", str(out),
          "--sample-steps", "2"], DIT_COMPILE_BACKEND="aot_eager")
    from safetensors.torch import load_file

    ckpt = out / "checkpoint-3"
    for f in [ckpt / "model.safetensors", ckpt / "ema.safetensors", out / "final" / "diffusion_pytorch_model.safetensors"]:
        keys = list(load_file(str(f)))
        assert keys and not any("_orig_mod" in k for k in keys), f
    assert json.loads((out / "config.json").read_text())["compile"] == "default"
    proc = _run([str(ROOT / "sample.py"), "--checkpoint", str(out / "final"), "--num-images", "2", "--steps", "2",
                 "--compile", "--output", str(tmp_path / "s"), "--device", "cpu"], DIT_COMPILE_BACKEND="aot_eager")
    assert "load" in proc.stdout and "warm-up" in proc.stdout and "sampling" in proc.stdout
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2


def test_many_models_and_shapes_stay_compiled_past_dynamos_default_limit():
    """All regionally compiled blocks share one code object (`nn.Module._call_impl`); Dynamo's default limit of
    8 graphs per code object would send the 9th model/shape eager without a word. `compile_model` raises it:
    4 operators x 3 batch sizes = 12 graphs, all compiled."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    failures = []
    for attention in ("softmax", "linear", "proxy", "gated_conv"):
        model = tiny(attention=attention, input_size=32, attention_options=OPERATOR_OPTIONS.get(attention))
        failures += compile_model(model, backend=counter, fullgraph=True, dynamic=False, verbose=False).failures
        for n in (1, 2, 3):
            with torch.no_grad():
                model(torch.randn(n, 1, 32, 32), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    assert failures == [] and counter.frame_count == 12
