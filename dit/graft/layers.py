"""Layer specs of `python -m dit.graft --layers SPEC`: which blocks get the new operator.

    all            every block
    odd / even     blocks 1, 3, 5, ... / 0, 2, 4, ... (the grafting paper's 50% interleaved layout is `odd`)
    0-5            an inclusive range
    3,7,9          a list (ranges allowed inside: 0-2,7)
    50% / 75%      that share of the blocks, spread evenly (50% of 8 -> 1,3,5,7; 75% of 8 -> 1,2,3,5,6,7)
"""
from __future__ import annotations

import math


class LayerSpecError(ValueError):
    """A layer spec that cannot be applied; the message names the valid forms and range."""


FORMS = "'all', 'odd', 'even', a range '0-5', a list '3,7,9' or a share '50%'"


def spread(count: int, depth: int) -> list[int]:
    """`count` of `depth` block indices spread evenly, ending at the last block (50% -> the odd blocks)."""
    if count <= 0:
        return []
    return sorted({depth - 1 - math.floor(i * depth / count) for i in range(count)})


def parse_layers(spec: str, depth: int) -> list[int]:
    """Sorted block indices selected by `spec` for a model of `depth` blocks (raises `LayerSpecError`)."""
    text = str(spec).strip().lower()
    if depth < 1:
        raise LayerSpecError(f"the model has no blocks (depth {depth})")
    if text == "all":
        chosen = list(range(depth))
    elif text in ("odd", "even"):
        chosen = list(range(1 if text == "odd" else 0, depth, 2))
    elif text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise LayerSpecError(f"layer spec {spec!r}: {text[:-1]!r} is not a number; use {FORMS}") from None
        if not 0 < share <= 100:
            raise LayerSpecError(f"layer spec {spec!r}: the share must be in (0, 100]%")
        chosen = spread(round(depth * share / 100), depth)
    else:
        chosen = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            try:
                bounds = [int(v) for v in part.split("-", 1)] if "-" in part[1:] else [int(part)] * 2
            except ValueError:
                raise LayerSpecError(f"layer spec {spec!r}: cannot read {part!r}; use {FORMS}") from None
            if bounds[1] < bounds[0]:
                raise LayerSpecError(f"layer spec {spec!r}: range {part!r} runs backwards; "
                                     f"write {bounds[1]}-{bounds[0]}")
            chosen.extend(range(bounds[0], bounds[1] + 1))
        bad = sorted({i for i in chosen if not 0 <= i < depth})
        if bad:
            raise LayerSpecError(f"layer spec {spec!r}: block index {', '.join(map(str, bad))} out of range; "
                                 f"this model has blocks 0-{depth - 1}")
    chosen = sorted(set(chosen))
    if not chosen:
        raise LayerSpecError(f"layer spec {spec!r} selects no block of this {depth}-block model; use {FORMS}")
    return chosen
