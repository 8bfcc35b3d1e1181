"""The UI's Graft tab through its API (`gradio_client` on 127.0.0.1, ports 7890-7899, a tiny model, a few steps)."""
from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from dit import DiT  # noqa: E402
from test_graft import tiny_digits_checkpoint  # noqa: E402
from studio_server import served_studio  # noqa: E402
from ui.context import Studio  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("graft-studio")
    ctx = Studio(root / "models", root / "outputs")
    tiny_digits_checkpoint(ctx.models_dir / "tiny")
    with served_studio(ctx, range(7890, 7900), tabs=["graft"]) as client:
        yield ctx, client


def test_graft_tab_writes_a_listed_model_with_its_report(studio):
    ctx, client = studio
    status, report_md, report = client.predict(
        model="tiny", output_name="tiny-window", mode="attention", operator="window", layers="odd",
        options='{"window_size": 3}', stage1_steps=2, stage2_steps=2, dynamic_target=0.7, distill=False,
        evaluate=False, eval_per_class=5, api_name="/graft")
    assert "tiny-window" in status
    assert "Graft report" in report_md and "window" in report_md
    assert report["layout"]["grafted"][1]["attention"] == "window"
    assert any(e.id.endswith("tiny-window") for e in ctx.list_models(rescan=True))
    assert DiT.from_pretrained(ctx.models_dir / "tiny-window").block_attention == ["softmax", "window"]
    with pytest.raises(Exception, match="exists"):
        client.predict(model="tiny", output_name="tiny-window", mode="attention", operator="linear", layers="all",
                       options="", stage1_steps=1, stage2_steps=1, dynamic_target=0.7, distill=False,
                       evaluate=False, eval_per_class=5, api_name="/graft")
