"""Benchmarks, one subcommand each: `python -m dit.bench [NAME] [options]` (default: `forward`).

`BENCHMARKS` maps a subcommand to the module implementing it. A benchmark module defines either
`add_arguments(parser)` + `run(args) -> int` (its options join this CLI's parser), or
`main(argv) -> int` (it receives the arguments after its name). Add it with one line here, or just
drop `dit/bench/<name>.py` in this package: modules not starting with `_` are discovered by file
name, without being imported until they are asked for.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

BENCHMARKS: dict[str, str] = {
    "forward": "dit.bench.forward",
}

DEFAULT_BENCHMARK = "forward"


def benchmark_names() -> list[str]:
    """Registered plus discovered benchmark names (discovery lists files; it imports nothing)."""
    names = dict(BENCHMARKS)
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            names.setdefault(info.name, f"{__name__}.{info.name}")
    BENCHMARKS.update(names)
    return sorted(names)


def load_benchmark(name: str) -> ModuleType:
    """Import the module of benchmark `name` (it defines `add_arguments` + `run`, or `main(argv)`)."""
    if name not in benchmark_names():
        raise ValueError(f"Unknown benchmark {name!r}. Valid benchmarks: {', '.join(benchmark_names())}")
    module = importlib.import_module(BENCHMARKS[name])
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")) and not hasattr(module, "main"):
        raise ValueError(f"benchmark module {module.__name__} defines neither add_arguments()+run() nor main(argv)")
    return module


__all__ = ["BENCHMARKS", "DEFAULT_BENCHMARK", "benchmark_names", "load_benchmark"]
