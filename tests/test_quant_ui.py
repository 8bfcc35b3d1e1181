"""The UI's Quantize tab through its API (`gradio_client` on 127.0.0.1, ports 7880-7889, a tiny model)."""
from __future__ import annotations

import os

import pytest
import torch

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


from dit import DiT  # noqa: E402
from dit.checkpoint import save_checkpoint  # noqa: E402
from dit.config import model_kwargs  # noqa: E402
from dit.quant import QuantLinear  # noqa: E402
from studio_server import served_studio  # noqa: E402
from ui.context import Studio  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-studio")
    ctx = Studio(root / "models", root / "outputs")
    torch.manual_seed(0)
    model = DiT(**dict(model_kwargs("DiT-Micro/4"), learn_sigma=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim and float(p.abs().max()) == 0:
                p.normal_(0, 0.05)
    save_checkpoint(model, ctx.models_dir / "tiny", studio={"objective": "flow", "default_scheduler": "flow-euler",
                                                            "default_steps": 3, "default_cfg_scale": 2.0})
    with served_studio(ctx, range(7880, 7890)) as client:
        yield ctx, client


def test_quantize_tab_writes_a_listed_model_with_its_report(studio):
    from dit.convert import load_any

    ctx, client = studio
    status, report_md, report = client.predict(model="tiny", output_name="tiny-w4", preset="w4", integer=False,
                                               adaln="fp8", calib_samples=2, iters=5, evaluate=False,
                                               eval_per_class=5, api_name="/quantize")
    assert "tiny-w4" in status and "Quantization report: w4 (FP)" in report_md
    assert report["bytes"]["file_ratio"] < 0.5 and report["layers"]
    ids = [m["id"] for m in client.predict(rescan=False, api_name="/list_models")]
    assert "tiny-w4" in ids
    model, _ = load_any(ctx.models_dir / "tiny-w4")
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    # ready for Compare: the float and the quantized model side by side
    grids, table, *_ = client.predict(models=["tiny", "tiny-w4"], labels=["1"], steps=2, api_name="/compare")
    assert [g["caption"] for g in grids] == ["tiny", "tiny-w4"] and len(table["data"]) == 2
    # an existing folder is refused, the model is untouched
    with pytest.raises(Exception, match="already exists"):
        client.predict(model="tiny", output_name="tiny-w4", preset="w4", api_name="/quantize")
