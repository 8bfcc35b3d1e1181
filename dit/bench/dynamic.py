"""DyDiT sampling benchmark: `python -m dit.bench dynamic [--steps 8 --batch-size 2 --threads 1 ...]`.

Full sampling trajectory of a DiT-S-width model with DyDiT routers fixed at half the heads / MLP groups
(50% block FLOPs) against the static model with the same weights, and the masked (non-sliced) dynamic
model for reference. The implementation and options live in `dit.dynamic.benchmark_sampling` / `main`
(also runnable as `python -m dit.dynamic`).
"""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from dit.dynamic import main as dynamic_main

    return dynamic_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
