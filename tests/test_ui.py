"""The Gradio studio through its API (`gradio_client` against a launched app on 127.0.0.1, CPU, few steps)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402

from ui.app import build_parser, launch, launch_kwargs  # noqa: E402
from ui.app import free_port as find_port  # noqa: E402
from ui.context import BUNDLED_DIR, Studio  # noqa: E402
from ui.tabs import TABS  # noqa: E402
from studio_server import served_studio  # noqa: E402

PORTS = range(7860, 7880)
# gradio's queue uses pandas options that pandas 3 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")


def free_port() -> int:
    port = find_port(PORTS)
    if port is None:
        pytest.skip("no free port in 7860-7879")
    return port


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    ctx = Studio(root / "models", root / "outputs")
    with served_studio(ctx, PORTS) as client:
        yield ctx, client


def wait_while_running(client: Client, run: str, timeout: float = 240) -> dict:
    """Poll `train_status` until the run is no longer running (or the timeout passes)."""
    deadline = time.time() + timeout
    while True:
        status = client.predict(run=run, api_name="/train_status")
        if status["state"] != "running" or time.time() > deadline:
            return status
        time.sleep(0.5)


def png_text(path: str) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


def test_every_registered_tab_defines_title_and_build():
    import importlib

    for name in TABS:
        module = importlib.import_module(f"ui.tabs.{name}")
        assert isinstance(module.TITLE, str) and callable(module.build), name


def test_generate_matches_sample_py_pixels_and_metadata(studio, tmp_path):
    from dit.cli.sample import main as sample_main

    ctx, client = studio
    _, gallery, files, status = client.predict(model="dit-digits", labels=["3", "7"], images_per_label=2, steps=4,
                                               cfg_scale=2.0, seed=5, batch_size=3, api_name="/generate")
    assert len(files) == 4 and len(gallery) == 4
    assert [g["caption"] for g in gallery] == ["class 3 · seed 5", "class 3 · seed 6", "class 7 · seed 7",
                                               "class 7 · seed 8"]
    sample_main(["--labels", "3", "7", "--per-label", "2", "--seed", "5", "--steps", "4", "--cfg-scale", "2",
                 "--output", str(tmp_path)])
    for f in files:
        meta = png_text(f)
        params = json.loads(meta["parameters"])
        assert params["steps"] == 4 and params["cfg_scale"] == 2.0 and params["scheduler"] == "flow-euler"
        assert params["model"] == "dit-digits" and meta["class_label"] == str(params["class_label"])
        ref = tmp_path / Path(f).name                       # same file name as sample.py's
        assert json.loads(png_text(ref)["parameters"]) == params
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(ref)))
    # the PNGs are also kept under the outputs dir
    assert list((ctx.outputs_dir / "generate").glob("*/0000-class3-seed5.png"))


def test_bare_generate_samples_one_image_per_class_of_the_default_model(studio):
    _, client = studio
    _, gallery, files, _ = client.predict(api_name="/generate")
    labels = [json.loads(png_text(f)["parameters"])["class_label"] for f in files]
    assert labels == list(range(10))
    assert all(Path(f).suffix == ".png" for f in files)


def test_streaming_yields_progress_and_previews_before_the_gallery(studio):
    _, client = studio
    job = client.submit(labels=["1", "2"], steps=30, api_name="/generate")
    final = job.result()
    outputs = job.outputs()
    assert len(outputs) >= 3
    intermediate = outputs[:-1]
    assert any("step" in o[3] and "ETA" in o[3] for o in intermediate)
    # a skipped output comes back as {"__type__": "update"}; an image as a file path
    assert any(isinstance(o[0], str) for o in intermediate), "no predicted-x0 preview before the final result"
    assert all(not isinstance(o[1], list) or not o[1] for o in intermediate), "the gallery must come last"
    assert len(final[1]) == 2


def test_stop_cancels_the_job_and_frees_the_queue(studio):
    ctx, client = studio
    before = set((ctx.outputs_dir / "generate").glob("*"))
    job = client.submit(labels=[], images_per_label=8, steps=2000, batch_size=80, api_name="/generate")
    deadline = time.time() + 60
    while time.time() < deadline and not any("step" in (o[3] or "") for o in job.outputs()):
        time.sleep(0.1)
    assert any("step" in (o[3] or "") for o in job.outputs()), "the job never started"
    job.cancel()
    t0 = time.time()
    _, gallery, _, _ = client.predict(labels=["4"], steps=3, api_name="/generate")   # the queue is free again
    assert len(gallery) == 1 and time.time() - t0 < 60
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == "studio-job" and t.is_alive()], "sampling still runs"
    after = set((ctx.outputs_dir / "generate").glob("*"))
    assert len(after - before) == 1, "the cancelled job must not have saved images"


def test_compare_returns_one_grid_and_row_per_model(studio):
    _, client = studio
    grids, table, chart, results, status = client.predict(
        models=["dit-digits", "variants/digits-linear"], labels=["0", "8"], steps=4, api_name="/compare")
    assert [g["caption"] for g in grids] == ["dit-digits", "variants/digits-linear"]
    assert len(table["data"]) == 2
    cols = table["headers"]
    for row, r in zip(table["data"], results):
        rec = dict(zip(cols, row))
        assert rec["s/image"] > 0 and rec["GFLOPs/forward"] > 0 and rec["params (M)"] > 1
        assert 0 <= rec["classifier agreement"] <= 1
        assert r["row"]["model"] == rec["model"] and len(r["files"]) == 2
    assert Image.open(chart).size[0] > 100
    with pytest.raises(Exception, match="2 to 6"):
        client.predict(models=["dit-digits"], api_name="/compare")


def test_convert_makes_a_loadable_model_and_never_overwrites(studio):
    from dit.convert import load_any

    ctx, client = studio
    status, config = client.predict(source="dit-digits", output_name="digits-diffusers", to="diffusers",
                                     api_name="/convert")
    assert config["depth"] == 8 and "digits-diffusers" in status
    model, _ = load_any(ctx.models_dir / "digits-diffusers")
    assert model.config.hidden_size == 128
    ids = [m["id"] for m in client.predict(api_name="/list_models")]
    assert "digits-diffusers" in ids
    # back to studio from the diffusers folder, then sample it from the UI
    client.predict(source="digits-diffusers", output_name="digits-roundtrip", api_name="/convert")
    _, gallery, _, _ = client.predict(model="digits-roundtrip", labels=["2"], steps=3, api_name="/generate")
    assert len(gallery) == 1
    stamp = (ctx.models_dir / "digits-roundtrip" / "config.json").stat().st_mtime_ns
    with pytest.raises(Exception, match="already exists"):
        client.predict(source="dit-digits", output_name="digits-roundtrip", api_name="/convert")
    assert (ctx.models_dir / "digits-roundtrip" / "config.json").stat().st_mtime_ns == stamp


def test_model_info(studio):
    _, client = studio
    summary, config, evaluation, card, details = client.predict(model="variants/digits-proxy", api_name="/model_info")
    assert details["objective"] == "flow" and details["params"] > 1e6 and details["gflops_per_forward"] > 0
    assert evaluation["classifier_agreement"] > 0.9 and config["config"]["attention"] == "proxy"


def test_training_run_from_the_api_reaches_its_last_step_and_is_listed(studio):
    ctx, client = studio
    name, status = client.predict(model="DiT-Micro/4", max_steps=6, batch_size=8, checkpointing_steps=3,
                                  sample_every=3, run_name="tiny", api_name="/train_start")
    assert name == "tiny"
    status = wait_while_running(client, "tiny")
    assert status["state"] == "finished", status
    assert status["step"] == 6 and status["checkpoints"][-1] == "checkpoint-6" and status["loss"] > 0
    assert status["preview"] and Path(status["preview"]).is_file()
    ids = [m["id"] for m in client.predict(rescan=True, api_name="/list_models")]
    assert status["export_model_id"] == "tiny" and "tiny" in ids
    # a second start with the same name refuses instead of overwriting
    with pytest.raises(Exception, match="already exists"):
        client.predict(model="DiT-Micro/4", max_steps=2, run_name="tiny", api_name="/train_start")


def test_train_stop_leaves_a_resumable_checkpoint(studio):
    ctx, client = studio
    client.predict(model="DiT-Micro/4", max_steps=100000, batch_size=4, checkpointing_steps=2, sample_every=0,
                   run_name="stopme", api_name="/train_start")
    deadline = time.time() + 120
    status = {}
    while time.time() < deadline:
        status = client.predict(run="stopme", api_name="/train_status")
        if status["checkpoints"]:
            break
        time.sleep(0.5)
    assert status["checkpoints"], status
    status = client.predict(run="stopme", api_name="/train_stop")
    assert status["state"] == "stopped"
    ckpt = ctx.outputs_dir / "runs" / "stopme" / status["checkpoints"][-1]
    assert (ckpt / "train_state.json").is_file() and (ckpt / "ema.safetensors").is_file()
    log = ctx.outputs_dir / "runs" / "stopme" / "train.log"
    assert f"stopped by SIGTERM at step {status['step']}" in log.read_text()   # saved where it stopped
    assert ckpt.name == f"checkpoint-{status['step']}"
    with pytest.raises(Exception, match="not running"):
        client.predict(run="stopme", api_name="/train_stop")
    # Resume continues from that checkpoint with the same settings
    stopped_at = int(status["checkpoints"][-1].split("-")[1])
    status = client.predict(run="stopme", api_name="/train_resume")
    deadline = time.time() + 120
    while time.time() < deadline and "resumed from" not in log.read_text():
        time.sleep(0.5)
    assert f"checkpoint-{stopped_at} at step {stopped_at}" in log.read_text()
    assert client.predict(run="stopme", api_name="/train_stop")["state"] == "stopped"


def test_three_concurrent_generates_are_served_in_order(studio):
    _, client = studio
    jobs, done = [], {}
    for k in range(3):
        jobs.append(client.submit(labels=[str(k)], seed=100 + k, steps=15, api_name="/generate"))
        time.sleep(0.4)

    def wait(k):
        jobs[k].result()
        done[k] = time.perf_counter()
    threads = [threading.Thread(target=wait, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(done, key=done.get) == [0, 1, 2]
    for k, job in enumerate(jobs):
        params = json.loads(png_text(job.result()[2][0])["parameters"])
        assert params["class_label"] == k and params["seed"] == 100 + k


def test_bad_input_gives_a_readable_error_and_the_app_keeps_serving(studio, tmp_path):
    ctx, client = studio
    corrupt = ctx.models_dir / "corrupt"
    corrupt.mkdir()
    shutil.copy(BUNDLED_DIR / "dit-digits" / "config.json", corrupt / "config.json")
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    (ctx.models_dir / "empty-data").mkdir()
    plain = tmp_path / "plain.png"
    Image.new("L", (8, 8)).save(plain)
    cases = [
        (dict(model="no-such-model", api_name="/generate"), "unknown model"),
        (dict(model="corrupt", api_name="/generate"), "cannot load model"),
        (dict(labels=["10"], api_name="/generate"), "out of range"),
        (dict(steps=0, api_name="/generate"), "steps must be"),
        (dict(scheduler="ddpm", api_name="/generate"), "cannot sample a model trained"),
        (dict(png=handle_file(str(plain)), api_name="/reuse_parameters"), "no studio `parameters` metadata"),
        (dict(source="/etc/passwd", output_name="x", api_name="/convert"), "outside the folders"),
        (dict(source="../../../etc", output_name="x", api_name="/convert"), "outside the folders"),
        (dict(source="dit-digits", output_name="../escape", api_name="/convert"), "output name"),
        (dict(run="/etc", api_name="/train_status"), "outside the folders"),
        (dict(data="/etc", api_name="/train_start"), "outside the folders"),
    ]
    for kwargs, message in cases:
        with pytest.raises(Exception, match=message) as info:
            client.predict(**kwargs)
        assert "Traceback" not in str(info.value)
        _, gallery, _, _ = client.predict(labels=["1"], steps=2, api_name="/generate")   # still serving
        assert len(gallery) == 1
    # a training run that fails shows its error as the run's state
    client.predict(data=str(ctx.models_dir / "empty-data"), model="DiT-Micro/4", max_steps=2, run_name="bad",
                   api_name="/train_start")
    status = wait_while_running(client, "bad")
    assert status["state"] == "failed" and status["error"], status
    assert (BUNDLED_DIR / "dit-digits" / "diffusion_pytorch_model.safetensors").stat().st_size > 1e6


def test_reuse_parameters_from_a_generated_png(studio):
    _, client = studio
    _, _, files, _ = client.predict(labels=["6"], seed=42, steps=3, api_name="/generate")
    model, labels, per_label, steps, cfg, scheduler, seed, dtype = client.predict(
        png=handle_file(files[0]), api_name="/reuse_parameters")
    assert (model, labels, steps, seed, scheduler) == ("dit-digits", ["6"], 3, 42, "flow-euler")


def test_bench_endpoint_runs_the_forward_benchmark(studio):
    _, client = studio
    forward, attention, plots, log, payload, status = client.predict(which="forward", model="DiT-Micro/4",
                                                                     quick=True, api_name="/bench")
    assert forward["data"] and forward["data"][0][1] > 0       # studio ms
    assert payload["forward"]["benchmark"] == "forward" and plots


def test_safe_path_rejects_traversal(tmp_path):
    ctx = Studio(tmp_path / "m", tmp_path / "o")
    assert ctx.safe_path("x", must_exist=False, write=True) == (tmp_path / "m" / "x").resolve()
    for bad in ("../x", "/etc/passwd", str(tmp_path)):
        with pytest.raises(gr.Error):
            ctx.safe_path(bad, must_exist=False)
    with pytest.raises(gr.Error):      # bundled checkpoints are readable, not writable
        ctx.safe_path(BUNDLED_DIR / "dit-digits", write=True)


def test_launch_defaults_to_loopback_only(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    port = free_port()
    demo, (_, url, share_url) = launch(["--models-dir", str(tmp_path / "m"), "--outputs-dir", str(tmp_path / "o"),
                                        "--port", str(port)], prevent_thread_lock=True, quiet=True)
    try:
        assert share_url is None and demo.server_name == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        addrs |= {_outbound_ip()} - {None}
        for addr in addrs - {"127.0.0.1"}:
            if addr.startswith("127."):
                continue
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
    finally:
        demo.close()
    # flags map to launch(); the env is honoured when the flags are absent
    ctx = Studio(tmp_path / "m", tmp_path / "o")
    kw = launch_kwargs(build_parser().parse_args([]), ctx)
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False and kw["auth"] is None
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7871")
    kw = launch_kwargs(build_parser().parse_args(["--auth", "me:secret"]), ctx)
    assert kw["server_name"] == "0.0.0.0" and kw["server_port"] == 7871 and kw["auth"] == ("me", "secret")
    kw = launch_kwargs(build_parser().parse_args(["--host", "127.0.0.1", "--share"]), ctx)
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is True


def _outbound_ip() -> str | None:
    """This machine's address on its default route (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return None


def test_only_the_outputs_dir_is_served(studio):
    import httpx

    ctx, client = studio
    base = client.src.rstrip("/")
    secret = ctx.models_dir / "secret.txt"
    secret.write_text("not for the web")
    for path in (secret, BUNDLED_DIR / "dit-digits" / "config.json", Path("/etc/passwd")):
        r = httpx.get(f"{base}/gradio_api/file={path}")
        assert r.status_code in (403, 404), (path, r.status_code)
    _, _, files, _ = client.predict(labels=["5"], steps=2, api_name="/generate")
    assert Path(files[0]).stat().st_size > 0      # generated PNGs are downloadable


def test_stream_heartbeat_and_close_cancel_the_worker(tmp_path):
    ctx = Studio(tmp_path / "m", tmp_path / "o")
    seen = {}

    def silent(job):          # reports nothing, ends only when cancelled
        seen["cancelled"] = job.cancel.wait(30)
        return "done"

    gen = ctx.stream(silent, heartbeat=0.2)
    kind, beat = next(gen)    # a heartbeat although the job says nothing
    assert kind == "progress" and beat.total == 0 and "working" in ctx.progress_text(beat)
    t0 = time.time()
    gen.close()               # what Gradio does when the event is cancelled
    assert seen["cancelled"] is True and time.time() - t0 < 5

    def failing(job):
        job.report(1, 2, "half")
        raise ValueError("bad value -- the fix")
    with pytest.raises(ValueError, match="the fix"):
        list(ctx.stream(failing))


def test_library_previews_and_cancel_in_generate():
    """dit.pipeline.generate's preview/cancel hooks (what the UI and any script can use)."""
    import threading as th

    from dit.convert import load_any
    from dit.pipeline import GenerationCancelled, generate

    model, meta = load_any(BUNDLED_DIR / "dit-digits")
    kw = dict(scheduler="flow-euler", steps=10, cfg_scale=2.0, objective="flow", progress=False)
    calls, previews = [], []
    out = generate(model, [1, 2], [0, 1], callback=lambda d, n: calls.append((d, n)),
                   preview=lambda d, n, ims: previews.append((d, len(ims))), preview_every=5, **kw)
    assert calls[-1] == (10, 10) and previews == [(5, 2), (10, 2)]
    final = np.asarray(out.images[0], dtype=np.float32)
    assert final.std() > 10                                  # a digit, not noise or blank
    cancel = th.Event()
    with pytest.raises(GenerationCancelled):
        generate(model, [1], [0], callback=lambda d, n: cancel.set() if d == 3 else None, cancel=cancel, **kw)
    # eps models: the x0 of schedulers that do not report one (DPM-Solver++) comes from the alphas
    import torch

    from dit.config import model_kwargs
    from dit.model import DiT

    torch.manual_seed(0)
    eps_model = DiT(**model_kwargs("DiT-Micro/4")).eval()
    for name in ("dpm++", "ddim"):
        previews.clear()
        generate(eps_model, [0], [0], scheduler=name, steps=4, cfg_scale=1.0, objective="ddpm", progress=False,
                 preview=lambda d, n, ims: previews.append(ims[0].size), preview_every=2)
        assert previews == [(16, 16), (16, 16)], name


def test_benchmarks_tab_opens_with_the_newest_results(tmp_path):
    """The Benchmarks tab shows the newest run of its own on page load (runs without results are passed over)."""
    from ui.tabs.bench import latest_folder, load_results

    ctx = Studio(tmp_path / "models", tmp_path / "outputs")
    assert latest_folder(ctx) is None
    old, new, empty = (ctx.outputs_dir / "bench" / n for n in ("20260101-000000", "20260102-000000", "20260103-000000"))
    for folder, ms in ((old, 9.0), (new, 1.5)):
        folder.mkdir(parents=True)
        (folder / "forward.json").write_text(json.dumps({"forward": [{"batch": 1, "studio_ms": ms}]}))
    empty.mkdir()  # a run that was stopped before writing anything
    assert latest_folder(ctx) == new
    forward, attention, plots, payload = load_results(new)
    assert forward[0][:2] == [1, 1.5] and attention == [] and plots == [] and payload["folder"] == str(new)


def test_compile_flag_compiles_loaded_models_and_training_runs(tmp_path, monkeypatch):
    """`python -m ui --compile`: every model the studio loads runs compiled blocks (same images); the Train tab's
    checkbox passes --compile to train.py."""
    from dit.compile import is_compiled
    from dit.pipeline import generate
    from ui.tabs.train import train_command

    assert build_parser().parse_args(["--compile"]).compile == "default"
    assert build_parser().parse_args([]).compile is None
    monkeypatch.setenv("DIT_COMPILE_BACKEND", "aot_eager")  # the compiler stack, without waiting for Inductor
    plain = Studio(tmp_path / "m", tmp_path / "o")
    compiled = Studio(tmp_path / "m", tmp_path / "o", compile_mode="default")
    model_id = plain.default_model_id
    a, meta, _ = plain.load_model(model_id)
    b, _, _ = compiled.load_model(model_id)
    assert is_compiled(b) and not is_compiled(a)
    kw = dict(scheduler=meta["default_scheduler"], steps=3, cfg_scale=2.0, objective=meta["objective"],
              progress=False)
    same = [generate(m, [3, 7], [0, 1], **kw).images for m in (a, b)]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(*same))
    argv = train_command("digits", "DiT-Micro/4", "softmax", "flow", 3, 8, 1e-3, "no", 3, 0, None,
                         tmp_path / "run", tmp_path / "export", **{"--compile": True})
    assert argv[-1] == "--compile"
