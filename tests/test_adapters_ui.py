"""Adapters in the studio UI: Generate applies an adapter + strength and records it; Train starts an adapter run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
from PIL import Image  # noqa: E402

from studio_server import served_studio  # noqa: E402
from ui.context import Studio  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    import torch

    from dit import adapters as A
    from dit.convert import load_any

    root = tmp_path_factory.mktemp("studio")
    ctx = Studio(root / "models", root / "outputs")
    base, _ = load_any("checkpoints/dit-digits", device="cpu")
    A.add_adapter(base, "lora", rank=2, targets=["final"])
    with torch.no_grad():
        for _, p in A.adapter_parameters(base):
            p.add_(0.3)
    A.save_adapter(base, ctx.models_dir / "inv" / "adapter.safetensors")
    with served_studio(ctx, range(7900, 7910), tabs=["generate", "train"]) as client:
        yield ctx, client


def test_generate_tab_applies_the_adapter_and_records_it(studio):
    ctx, client = studio
    adapter = str(ctx.models_dir / "inv" / "adapter.safetensors")
    kw = dict(model="dit-digits", labels=["3"], images_per_label=1, steps=3, cfg_scale=2.0, seed=1, batch_size=1,
              api_name="/generate")
    _, _, plain, _ = client.predict(**kw)
    _, _, adapted, _ = client.predict(adapter=adapter, adapter_strength=0.7, **kw)
    with Image.open(adapted[0]) as im:
        rec = json.loads(im.text["parameters"])["extras"]["adapters"][0]
        pixels = im.tobytes()
    assert rec["file"] == "adapter.safetensors" and rec["scale"] == 0.7 and rec["kind"] == "lora"
    with Image.open(plain[0]) as im:
        assert im.tobytes() != pixels and "adapters" not in json.loads(im.text["parameters"])["extras"]
    with pytest.raises(Exception, match="not an adapter file"):
        client.predict(adapter=str(Path("checkpoints/dit-digits/diffusion_pytorch_model.safetensors").resolve()), **kw)


def test_train_tab_starts_an_adapter_run_that_exports_the_adapter(studio):
    ctx, client = studio
    name, _ = client.predict(data="digits-inverted", init_from="dit-digits", max_steps=2, batch_size=8,
                             checkpointing_steps=2, sample_every=0, run_name="inv-lora", adapter="lora",
                             adapter_rank=2, adapter_targets=["attn", "final"], api_name="/train_start")
    deadline = time.time() + 300
    while client.predict(run=name, api_name="/train_status")["state"] == "running" and time.time() < deadline:
        time.sleep(1)
    export = ctx.models_dir / "inv-lora"
    assert (export / "adapter.safetensors").is_file(), (ctx.outputs_dir / "runs" / name / "train.log").read_text()[-2000:]
    ui_run = json.loads((ctx.outputs_dir / "runs" / name / "ui_run.json").read_text())
    argv = ui_run["argv"]
    assert argv[argv.index("--adapter") + 1] == "lora" and argv[argv.index("--init-from") + 1].endswith("dit-digits")
    with pytest.raises(Exception, match="needs a base model"):
        client.predict(data="digits-inverted", max_steps=2, run_name="x", adapter="lora", api_name="/train_start")
