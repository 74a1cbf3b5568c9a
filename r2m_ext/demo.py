"""`make demo`: the built-in synthetic deepfake benchmark, end to end, on this machine.

Pretrains a small ViT on procedural real faces, fine-tunes one specialist per forgery family and
a joint detector (all cached in DIR/cache, so a second run only merges and evaluates), merges the
specialists with R²M and every baseline of the spec, and prints the AUC of every detector on seen
forgeries, unseen generators and unseen families, then the AUC as specialists are added one by
one with `r2m expand`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from r2m_ext._backend import backend_info
from r2m_ext.detect.benchmark import (
    REDUCED,
    BenchmarkConfig,
    format_composability,
    format_table,
    run_benchmark,
    save_charts,
)
from r2m_ext.detect.synthetic import FAMILIES, SEEN_FAMILIES, UNSEEN_FAMILIES


def _r2m_command() -> str:
    # The console script sits beside this interpreter (.venv/bin after `make`), maybe not on PATH.
    script = Path(sys.executable).parent / "r2m"
    return str(script) if script.exists() else "r2m"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m r2m_ext.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("demo_out"), help="where to write")
    parser.add_argument(
        "--reduced", action="store_true", help="the small configuration the tests run (~1 min)"
    )
    args = parser.parse_args(argv)
    config = REDUCED if args.reduced else BenchmarkConfig()
    print(backend_info())
    print(
        f"synthetic deepfake benchmark: {config.model.image_size}px images, ViT width "
        f"{config.model.width} depth {config.model.depth}; specialists on "
        f"{', '.join(SEEN_FAMILIES)}; unseen families {', '.join(UNSEEN_FAMILIES)}"
    )
    for family in FAMILIES.values():
        generators = " / ".join(family.generators)
        print(f"  {family.name:<15} {family.artifact:<45} generators {generators}")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    result = run_benchmark(config, args.dir, log, write_test_images=True)
    print("\nAUC (mean over subsets; in-distribution = each seen family's training generator)")
    print(format_table(result))
    print("\nadding specialists one at a time with r2m expand (R²M)")
    print(format_composability(result))

    r2m_report = json.loads((Path(result.merged["r2m"]) / "report.json").read_text())
    coefficients = ", ".join(f"{c:.3f}" for c in r2m_report["core_coefficients"])
    print(f"\nR²M: Real core coefficients [{coefficients}], eta {r2m_report['eta']:.4g}")
    charts = save_charts(result, args.dir / "charts")
    r2m = _r2m_command()
    merged = result.merged["r2m"]
    print(f"charts:            {', '.join(map(str, charts))}")
    print(f"merged detector:   {merged}/ (DeepfakeBench layout: backbone.* + head.*)")
    print(f"all results:       {args.dir / 'benchmark.json'}")
    print(f"evaluate it:       {r2m} eval --checkpoint {merged} --data {result.test_data}")
    print(f"what R²M did:      {r2m} report {merged}")
    print(f"whole run:         {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
