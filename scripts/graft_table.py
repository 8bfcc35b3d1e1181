"""Print the README's grafting table from checkpoints/grafted/*/graft_report.json (run from the repository root)."""
from __future__ import annotations

import json
from pathlib import Path

ORDER = ("linear-50", "linear-100", "proxy-100", "window-100", "parallel-half")


def main() -> None:
    print("| model (`checkpoints/grafted/…`) | graft | classifier agreement | Fréchet distance | GFLOPs, 64 tokens "
          "| GFLOPs, 4096 tokens | latency, 4096 tokens (vs source) | steps (stage 1 + 2) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    first = True
    for name in ORDER:
        path = Path("checkpoints/grafted") / name / "graft_report.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        q, f, c = r["quality"], r["flops"], r["compute"]
        lat = {x["model"]: x for x in r["latency"]["rows"] if x["tokens"] == 4096}
        if first:
            print(f"| `dit-digits` (source) | — | {100 * q['source']['classifier_agreement']:.1f} % "
                  f"| {q['source']['frechet_distance']:.2f} | {f['source']['model_size_gflops']:.4f} "
                  f"| {f['source']['tokens_4096_gflops']:.2f} | 1.00× | 5000 (training) |")
            first = False
        what = ", ".join(r["what"])
        if what.startswith("attention"):
            what += " in all blocks" if len(r["layers"]) == r["depth"]["source"] else f" in blocks {r['layers']}"
        print(f"| `{name}` | {what} | {100 * q['grafted']['classifier_agreement']:.1f} % "
              f"| {q['grafted']['frechet_distance']:.2f} | {f['grafted']['model_size_gflops']:.4f} "
              f"| {f['grafted']['tokens_4096_gflops']:.2f} | {lat['grafted']['latency_ratio']:.2f}× "
              f"({lat['source']['best_ms'] / 1e3:.1f} → {lat['grafted']['best_ms'] / 1e3:.1f} s) "
              f"| {c['stage1_steps']} + {c['stage2_steps']} |")


if __name__ == "__main__":
    main()
