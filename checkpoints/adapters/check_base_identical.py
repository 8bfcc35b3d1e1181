"""Demo check: the bundled model's samples without an adapter are pixel-identical before and after the
adapters are used in the same process (and the adapted samples differ). Writes base_identical.json here.

    python checkpoints/adapters/check_base_identical.py
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dit.convert import load_any
from dit.pipeline import generate

HERE = Path(__file__).resolve().parent


def digest(out) -> str:
    return hashlib.sha256(b"".join(im.tobytes() for im in out.images)).hexdigest()[:16]


def main() -> None:
    model, meta = load_any(str(HERE.parent / "dit-digits"), device="cpu")
    kw = dict(scheduler=meta["default_scheduler"], steps=meta["default_steps"], cfg_scale=meta["default_cfg_scale"],
              objective=meta["objective"], batch_size=10, progress=False)
    labels, seeds = list(range(10)), list(range(10))
    result = {"settings": {**kw, "labels": labels, "seeds": seeds}, "base_before": digest(generate(model, labels, seeds, **kw))}
    for kind in ("lora", "td-lora", "diffscaler"):
        path = HERE / kind / "adapter.safetensors"
        if path.exists():
            result[f"with_{kind}"] = digest(generate(model, labels, seeds, adapters=[(str(path), 1.0)], **kw))
    result["base_after"] = digest(generate(model, labels, seeds, **kw))
    result["base_pixel_identical"] = result["base_after"] == result["base_before"]
    result["adapted_differ"] = all(v != result["base_before"] for k, v in result.items() if k.startswith("with_"))
    (HERE / "base_identical.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
