"""`python -m dit.bench [NAME] [options]`: run one benchmark (default `forward`); `--help` lists them."""
from __future__ import annotations

import argparse
import sys

from . import DEFAULT_BENCHMARK, benchmark_names, load_benchmark


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = benchmark_names()
    if not argv or (argv[0] not in names and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_BENCHMARK, *argv]  # options alone run the default benchmark
    parser = argparse.ArgumentParser(prog="python -m dit.bench",
                                     description=f"DiT Studio benchmarks (default: {DEFAULT_BENCHMARK}).")
    sub = parser.add_subparsers(dest="benchmark", metavar="{" + ",".join(names) + "}")
    if argv[0] in names:  # import only the benchmark asked for (each may pull heavy dependencies)
        module = load_benchmark(argv[0])
        if not hasattr(module, "add_arguments"):
            return int(module.main(argv[1:]) or 0)  # a benchmark with its own CLI
        module.add_arguments(sub.add_parser(argv[0], help=(module.__doc__ or "").split("\n")[0]))
    else:
        for name in names:
            sub.add_parser(name, help=f"python -m dit.bench {name} --help")
    args = parser.parse_args(argv)
    return int(load_benchmark(args.benchmark).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
