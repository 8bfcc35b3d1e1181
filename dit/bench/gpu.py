"""GPU benchmark, one process: `python -m dit.bench gpu` (about 5 minutes on one H100).

Sections (each can be chosen with --sections; all of them by default):
- forward: DiT-XL/2 at 256 tokens (32x32x4 latents), batch 64, weights in bf16 (sample.py's --dtype bf16):
  the studio eager, the studio with `--compile` (regional, `dit.compile`), diffusers' DiTTransformer2DModel
  on the same weights (`dit.convert.to_diffusers`). images/s and MFU against the device's dense bf16 peak.
- train: train.py's hot path (bf16 autocast, fused AdamW, the device-side non-finite guard, the multi-tensor
  EMA, gradient clipping) at batch 32 / 128 / 256, compiled; steps/s, images/s, MFU (6 FLOPs per
  multiply-add per image) and peak memory; a batch that does not fit is retried with
  --gradient-checkpointing (marked).
- variants: XL width (28 x 1152, 16 heads), bf16, whole-model forward at 1024 / 4096 / 16384 tokens
  (batch 16 / 4 / 1): softmax (SDPA), LiT linear, PT-DiT proxy; speed-ups against softmax and FLOP ratios.
- sampling: the whole job with a VAE (an SD-architecture AutoencoderKL: `--vae FOLDER`, else randomly
  initialised, which costs the same): `dit.pipeline.generate` eager and compiled against diffusers'
  `DiTPipeline` on the same weights, VAE and scheduler, all warm in this process: DDIM 50 and DDPM 250,
  CFG 4, 8 and 64 images. The sampler loop's own overhead = total - steps x model forward (timed alone at
  the CFG batch, each job's own model: studio eager / compiled, diffusers' transformer) - VAE decode (timed alone).
Timing: CUDA-synchronised wall clock, median of repeats after warm-up; compile time is reported apart.
Writes a table to stdout, `gpu.json` and `gpu.png` to --output (bench/results). Without CUDA it refuses
in one line; `--dry-run` runs every code path with a tiny model on the CPU (for tests), numbers meaningless.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ._common import RESULTS_DIR, write_json

SECTIONS = ("forward", "train", "variants", "sampling")
EXTRA_SECTIONS = ("profile",)  # not run by default: --sections profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default="DiT-XL/2")
    a("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS + EXTRA_SECTIONS,
      help="profile (not in the default set): the top CUDA kernels of each variant's forward at "
           "--profile-tokens, to gpu_profile.txt")
    a("--forward-batch", type=int, default=64)
    a("--train-batches", type=int, nargs="+", default=[32, 128, 256])
    a("--train-steps", type=int, default=10, help="timed training steps per batch size")
    a("--variant-tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    a("--variants-compile", action="store_true",
      help="also time every variant compiled (regional; one compile per variant and token count, minutes)")
    a("--profile-tokens", type=int, default=4096)
    a("--sample-images", type=int, nargs="+", default=[8, 64])
    a("--samplers", nargs="+", default=["ddim:50", "ddpm:250"], help="NAME:STEPS")
    a("--compile-mode", default="default", help="torch.compile mode for the compiled entries")
    a("--no-compile", action="store_true", help="skip the compiled entries")
    a("--no-diffusers", action="store_true", help="skip the diffusers baselines")
    a("--vae", default=None, help="local diffusers AutoencoderKL folder (default: a random SD-architecture VAE)")
    a("--budget-s", type=float, default=290.0, help="skip the remaining cases once this many seconds have passed")
    a("--output", type=Path, default=RESULTS_DIR)
    a("--no-plot", action="store_true")
    a("--dry-run", action="store_true", help="tiny model on the CPU: exercises every code path (for tests)")


class Bench:
    """Shared state: device, dtype, timing, the time budget and the result rows."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cuda" if torch.cuda.is_available() and not self.dry else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.backend = "aot_eager" if self.dry else None  # the dry run never waits for Inductor
        from ..perf import peak_flops

        self.peak = peak_flops(self.device, "bf16") if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ helpers
    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> float:
        """Median seconds of `fn` (synchronised)."""
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(1 if self.dry else repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t0)
        return sorted(out)[len(out) // 2]

    def first_call(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def model_kwargs(self, **overrides: Any) -> dict[str, Any]:
        from ..config import model_kwargs

        if self.dry:  # tiny, but the same structure (latent channels, 1000 classes, learned sigma)
            base = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, in_channels=4,
                        num_classes=1000, learn_sigma=True)
            base.update({k: v for k, v in overrides.items() if v is not None})
            return base
        return model_kwargs(self.args.model, **overrides)

    def build(self, **overrides: Any) -> Any:
        from ..model import DiT

        with torch.device(self.device):  # initialise on the GPU: XL's init on a CPU takes many seconds
            return DiT(**self.model_kwargs(**overrides))

    def build_inference(self, **overrides: Any) -> Any:
        """A model with weights in the benchmark dtype (as sample.py --dtype bf16), eval mode."""
        return torch.nn.Module.to(self.build(**overrides), dtype=self.dtype).eval()

    def compile(self, model: Any) -> Any:
        """Regional compile with a fresh Dynamo cache, so that earlier cases' graphs (all blocks of all models
        share one code object) never crowd this one out; returns `compile_model`'s report."""
        from ..compile import compile_model

        torch._dynamo.reset()
        return compile_model(model, self.args.compile_mode, backend=self.backend, verbose=False)

    def record(self, section: str, **row: Any) -> None:
        row = {"section": section, **row}
        self.rows.append(row)
        shown = "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "section")
        print(f"[{section}] {shown}", flush=True)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _inputs(b: Bench, n: int, size: int, channels: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(n, channels, size, size, device=b.device, dtype=b.dtype)
    t = torch.randint(0, 1000, (n,), device=b.device)
    y = torch.randint(0, 1000, (n,), device=b.device)
    return x, t, y


# ---------------------------------------------------------------------- sections
@torch.no_grad()
def section_forward(b: Bench) -> None:
    from ..perf import forward_mfu, model_macs_per_image

    n = 4 if b.dry else b.args.forward_batch
    model = b.build_inference()
    macs = model_macs_per_image(model)
    x, t, y = _inputs(b, n, model.config.input_size, model.config.in_channels)
    entries: list[tuple[str, Any, float | None]] = [("studio eager", model, None)]
    if not b.args.no_diffusers:
        from ..convert import to_diffusers

        ref = torch.nn.Module.to(to_diffusers(model), device=b.device, dtype=b.dtype).eval()
        entries.append(("diffusers eager", lambda x, t, y: ref(x, timestep=t, class_labels=y).sample, None))
    for name, fn, _ in entries:
        sec = b.time(lambda: fn(x, t, y), warmup=2)
        b.record("forward", variant=name, batch=n, ms=sec * 1e3, images_per_s=n / sec,
                 mfu=forward_mfu(macs, n / sec, b.peak))
    if not b.args.no_compile and not b.over_budget():
        b.compile(model)
        compile_s = b.first_call(lambda: model(x, t, y))
        sec = b.time(lambda: model(x, t, y), warmup=2)
        b.record("forward", variant="studio compiled", batch=n, ms=sec * 1e3, images_per_s=n / sec,
                 mfu=forward_mfu(macs, n / sec, b.peak), compile_s=compile_s)


def _train_step_fn(b: Bench, model: Any, batch: int) -> Callable[[], None]:
    """train.py's hot path on one batch of random latents (bf16 autocast, fused AdamW, guard, EMA)."""
    from ..ema import EMA
    from ..nonfinite import NonFiniteGuard
    from ..schedulers import get_objective

    objective = get_objective("ddpm")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    ema = EMA(model, 0.9999)
    guard = NonFiniteGuard(opt, b.device)
    size, ch = model.config.input_size, model.config.in_channels
    x = torch.randn(batch, ch, size, size, device=b.device)
    y = torch.randint(0, model.config.num_classes, (batch,), device=b.device)
    counter = [0]

    def step() -> None:
        with torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=b.device.type == "cuda"):
            loss = objective.training_losses(model, x, y)["loss"].mean()
        counter[0] += 1
        guard.train_step(loss, model, opt, ema, counter[0])

    return step


def section_train(b: Bench) -> None:
    from ..perf import model_macs_per_image, training_mfu

    batches = [2, 4] if b.dry else b.args.train_batches
    steps = 2 if b.dry else b.args.train_steps
    for batch in batches:
        if b.over_budget():
            b.record("train", batch=batch, status="skipped (time budget)")
            continue
        for checkpointing in (False, True):
            model = step = None
            b.reset_peak()
            try:
                model = b.build().train()
                if checkpointing:
                    model.enable_gradient_checkpointing()
                if not b.args.no_compile:
                    b.compile(model)
                macs = model_macs_per_image(model)
                step = _train_step_fn(b, model, batch)
                first = b.first_call(step)
                sec = b.time(step, warmup=2, repeats=steps)
                b.record("train", batch=batch, compiled=not b.args.no_compile, grad_ckpt=checkpointing,
                         steps_per_s=1 / sec, images_per_s=batch / sec, mfu=training_mfu(macs, batch / sec, b.peak),
                         peak_gib=b.peak_gib(), first_step_s=first)
                break
            except torch.OutOfMemoryError:
                del model, step
                if checkpointing:
                    b.record("train", batch=batch, status="out of memory even with gradient checkpointing")
            finally:
                if b.device.type == "cuda":
                    torch.cuda.empty_cache()


@torch.no_grad()
def section_variants(b: Bench) -> None:
    from ..flops import model_flops

    tokens_list = [16, 64] if b.dry else b.args.variant_tokens
    base = b.model_kwargs()
    for tokens in tokens_list:
        side = int(round(tokens ** 0.5))
        size = side * base["patch_size"]
        batch = 1 if b.dry else max(1, 16384 // tokens)
        soft_ms = soft_flops = soft_c_ms = None
        for variant in ("softmax", "linear", "proxy"):
            if b.over_budget():
                b.record("variants", tokens=tokens, attention=variant, status="skipped (time budget)")
                continue
            b.reset_peak()
            model = b.build_inference(attention=variant, input_size=size)
            x, t, y = _inputs(b, batch, size, base["in_channels"])
            sec = b.time(lambda: model(x, t, y), warmup=2)
            flops = model_flops(model, input_size=size)["total"]
            if variant == "softmax":
                soft_ms, soft_flops = sec * 1e3, flops
            b.record("variants", tokens=tokens, batch=batch, attention=variant, ms=sec * 1e3,
                     speedup_vs_softmax=(soft_ms / (sec * 1e3)) if soft_ms else None,
                     flop_ratio=(soft_flops / flops) if soft_flops else None, peak_gib=b.peak_gib())
            if b.args.variants_compile and not b.over_budget():
                b.compile(model)
                compile_s = b.first_call(lambda: model(x, t, y))
                sec_c = b.time(lambda: model(x, t, y), warmup=2)
                if variant == "softmax":
                    soft_c_ms = sec_c * 1e3
                b.record("variants", tokens=tokens, batch=batch, attention=variant, compiled=True, ms=sec_c * 1e3,
                         speedup_vs_softmax=(soft_c_ms / (sec_c * 1e3)) if soft_c_ms else None,
                         flop_ratio=(soft_flops / flops) if soft_flops else None, compile_s=compile_s)
            del model
            if b.device.type == "cuda":
                torch.cuda.empty_cache()


@torch.no_grad()
def section_profile(b: Bench) -> None:
    """Top kernels (self device time) of one eager forward per variant at --profile-tokens, to gpu_profile.txt:
    where a variant's time goes, for the next optimisation (torch.profiler; CPU activities in a dry run)."""
    from torch.profiler import ProfilerActivity, profile

    tokens = 64 if b.dry else b.args.profile_tokens
    side = int(round(tokens ** 0.5))
    base = b.model_kwargs()
    size = side * base["patch_size"]
    batch = 1 if b.dry else max(1, 16384 // tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if b.device.type == "cuda" else "self_cpu_time_total"
    texts = []
    for variant in ("softmax", "linear", "proxy"):
        model = b.build_inference(attention=variant, input_size=size)
        x, t, y = _inputs(b, batch, size, base["in_channels"])
        b.time(lambda: model(x, t, y), warmup=1, repeats=1)
        with profile(activities=activities) as prof:
            model(x, t, y)
            b.sync()
        table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
        texts.append(f"=== {variant}: {tokens} tokens x {batch}, {b.dtype}, eager ===\n{table}")
        b.record("profile", attention=variant, tokens=tokens, batch=batch, status="profiled")
        del model
    path = Path(b.args.output) / "gpu_profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(texts))
    print(f"wrote {path}", flush=True)


def _vae(b: Bench) -> Any:
    from diffusers import AutoencoderKL

    if b.args.vae:
        from ..pipeline import load_vae

        return load_vae(b.args.vae, b.device, b.dtype)
    if b.dry:
        cfg = dict(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                   up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32, layers_per_block=1)
    else:  # stabilityai/sd-vae-ft-ema's architecture (randomly initialised: the same cost)
        cfg = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=256)
    with torch.device(b.device):
        return AutoencoderKL(**cfg).eval()


@torch.no_grad()
def section_sampling(b: Bench) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline

    from ..pipeline import decode_latents, generate

    model = b.build_inference()
    vae = _vae(b)
    pipe = None
    if not b.args.no_diffusers:
        from ..convert import to_diffusers

        ref = torch.nn.Module.to(to_diffusers(model), device=b.device, dtype=b.dtype).eval()
        pipe = DiTPipeline(transformer=ref, vae=vae, scheduler=DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
    samplers = [("ddim", 3), ("ddpm", 4)] if b.dry else [(s.split(":")[0], int(s.split(":")[1]))
                                                          for s in b.args.samplers]
    images = [2] if b.dry else b.args.sample_images
    size, ch = model.config.input_size, model.config.in_channels
    vae_s: dict[int, float] = {}

    def forward_times(fn: Callable[..., Any]) -> dict[int, float]:
        """Seconds of one forward at the CFG batch (2n), per image count: the loop-overhead estimate's model part."""
        out = {}
        for n in images:
            x, t, y = _inputs(b, 2 * n, size, ch)
            out[n] = b.time(lambda: fn(x, t, y), warmup=2)
        return out

    fwd_s = {"studio eager": forward_times(model)}
    if pipe is not None:
        fwd_s["diffusers DiTPipeline eager"] = forward_times(
            lambda x, t, y: pipe.transformer(x, timestep=t, class_labels=y).sample)
    for n in images:  # the VAE alone
        lat = torch.randn(n, ch, size, size, device=b.device, dtype=b.dtype)
        vae_s[n] = b.time(lambda: decode_latents(vae, lat), warmup=1, repeats=3)

    def studio(name: str, steps: int, n: int) -> Callable[[], Any]:
        labels, seeds = [(i * 37) % 1000 for i in range(n)], list(range(n))
        return lambda: generate(model, labels, seeds, scheduler=name, steps=steps, cfg_scale=4.0, batch_size=n,
                                device=b.device, dtype=b.dtype, vae=vae, progress=False)

    def diffusers_job(name: str, steps: int, n: int) -> Callable[[], Any]:
        pipe.scheduler = (DDIMScheduler if name == "ddim" else DDPMScheduler).from_config(pipe.scheduler.config)
        labels = [(i * 37) % 1000 for i in range(n)]
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
        return lambda: pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=steps, generator=gens,
                            output_type="pil")

    jobs: list[tuple[str, Callable[[str, int, int], Callable[[], Any]]]] = [("studio eager", studio)]
    if pipe is not None:
        jobs.append(("diffusers DiTPipeline eager", diffusers_job))
    if not b.args.no_compile:
        jobs.append(("studio compiled", studio))
    compiled = False
    for label, make in jobs:
        if label == "studio compiled" and not compiled:
            b.compile(model)
            compiled = True
            fwd_s[label] = forward_times(model)  # compiles for these shapes, then times the compiled forward
        for name, steps in samplers:
            for n in images:
                if b.over_budget():
                    b.record("sampling", job=label, scheduler=name, steps=steps, images=n, status="skipped (time budget)")
                    continue
                make(name, 2, n)()  # warm: same shapes, 2 steps
                fn = make(name, steps, n)
                sec = b.time(fn, warmup=0, repeats=1)
                model_s = steps * fwd_s[label][n]
                b.record("sampling", job=label, scheduler=name, steps=steps, images=n, cfg=4.0, seconds=sec,
                         images_per_s=n / sec, model_s=model_s, vae_s=vae_s[n], loop_overhead_s=sec - model_s - vae_s[n])


# ---------------------------------------------------------------------- report
def format_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for section in SECTIONS + EXTRA_SECTIONS:
        part = [r for r in rows if r["section"] == section]
        if not part:
            continue
        keys = [k for k in dict.fromkeys(k for r in part for k in r) if k != "section"]
        lines.append(f"\n== {section}")
        lines.append(" | ".join(keys))
        lines += [" | ".join(_fmt(r.get(k, "")) if r.get(k) is not None else "" for k in keys) for r in part]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    fwd = [r for r in rows if r["section"] == "forward" and "images_per_s" in r]
    axes[0].bar([r["variant"] for r in fwd], [r["images_per_s"] for r in fwd], color="tab:blue")
    axes[0].set_title("forward, images/s")
    tr = [r for r in rows if r["section"] == "train" and "images_per_s" in r]
    axes[1].bar([f"b{r['batch']}" + (" ckpt" if r.get("grad_ckpt") else "") for r in tr],
                [r["images_per_s"] for r in tr], color="tab:orange")
    axes[1].set_title("training step, images/s")
    plotted = False
    for variant in ("linear", "proxy"):
        for compiled_rows, style, suffix in ((False, "o-", ""), (True, "s--", " (compiled)")):
            pts = [r for r in rows if r["section"] == "variants" and r.get("attention") == variant
                   and r.get("speedup_vs_softmax") and bool(r.get("compiled")) == compiled_rows]
            if pts:
                axes[2].plot([r["tokens"] for r in pts], [r["speedup_vs_softmax"] for r in pts], style,
                             label=variant + suffix)
                plotted = True
    axes[2].axhline(1.0, color="gray", lw=0.8)
    if plotted:
        axes[2].set_xscale("log", base=2)
        axes[2].legend()
    axes[2].set_title("speed-up vs softmax (XL width)")
    sm = [r for r in rows if r["section"] == "sampling" and "seconds" in r]
    axes[3].barh([f"{r['job']} {r['scheduler']}{r['steps']} x{r['images']}" for r in sm], [r["seconds"] for r in sm],
                 color="tab:green")
    axes[3].set_title("sampling job, seconds")
    axes[3].tick_params(axis="y", labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name(b: Bench) -> str:
    if b.device.type == "cuda":
        return torch.cuda.get_device_name(b.device)
    return "CPU (dry run: numbers meaningless)"


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available() and not args.dry_run:
        print("error: python -m dit.bench gpu needs a CUDA GPU (none found); run it on a GPU machine "
              "(scripts/gpu_checks.sh), or use --dry-run to exercise the code path on this CPU", file=sys.stderr)
        return 2
    b = Bench(args)
    if b.device.type == "cuda":
        from ..perf import enable_tf32

        enable_tf32()
    name = device_name(b)
    print(f"dit.bench gpu on {name}, torch {torch.__version__}, {b.dtype}; sections: {' '.join(args.sections)}",
          flush=True)
    errors = {}
    for section in args.sections:
        try:
            globals()[f"section_{section}"](b)
        except Exception as err:  # one section failing must not lose the others' numbers
            errors[section] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            b.record(section, status=f"failed: {errors[section]}")
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
    total = time.perf_counter() - b.start
    print(format_table(b.rows))
    payload = {"device": name, "torch": torch.__version__, "dtype": str(b.dtype), "peak_flops": b.peak,
               "dry_run": bool(args.dry_run), "seconds": round(total, 1), "model": args.model,
               "command": " ".join(["python -m dit.bench gpu", *sys.argv[2:]]), "rows": b.rows, "errors": errors}
    path = write_json("gpu", payload, Path(args.output))
    if not args.no_plot:
        model_name = "tiny model (dry run)" if args.dry_run else args.model
        plot(b.rows, Path(args.output) / "gpu.png", f"dit.bench gpu - {name} - {model_name}, {b.dtype}")
    print(f"\n{total:.0f} s; wrote {path}" + ("" if args.no_plot else f" and {Path(args.output) / 'gpu.png'}"))
    return 1 if errors else 0
