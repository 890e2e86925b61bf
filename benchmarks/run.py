"""Run every benchmark side by side in one process and write benchmarks/results.json and results.md.

Each bench module's `run(quick) -> list[dict]` returns rows; a ratio is always this project's
figure divided by the baseline's, measured in the same run. `--only NAME` runs the module that
makes the row NAME (others' rows are kept from the last results.json); `--quick` is what
`make bench-quick` runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Module -> the rows it makes, in the order of the table.
MODULES = {
    "bench_dp": ("dp-overhead",),
    "bench_framework": ("framework-overhead",),
    "bench_dicom": ("dicom-index", "dicom-first-pass", "dicom-cached"),
    "bench_scale": ("scale",),
    "bench_communication": ("communication",),
    "bench_accuracy": ("accuracy",),
    "bench_privacy_unit": ("privacy-unit-accuracy",),
    "bench_segmentation": ("unet-dp-overhead", "unet3d-dp-overhead"),
}
ORDER = [name for names in MODULES.values() for name in names]


def machine() -> dict[str, Any]:
    """What the numbers were measured on: cores, CPU model, torch threads and library versions."""
    import flwr
    import opacus
    import torch

    from common import set_threads

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    return {
        "cores": os.cpu_count(), "cpu": cpu, "torch_threads": set_threads(),
        "load_average_at_start": list(os.getloadavg()), "python": platform.python_version(),
        "torch": torch.__version__, "flwr": flwr.__version__, "opacus": opacus.__version__,
    }


def met(row: dict) -> bool:
    ratio = row.get("ratio")
    if not isinstance(ratio, (int, float)) or math.isnan(ratio):
        return False
    return ratio >= row["target"] if row.get("higher_is_better") else ratio <= row["target"]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def markdown(results: dict) -> str:
    """The table the README embeds: one row per benchmark, then the machine."""
    m = results["machine"]
    lines = [
        "| benchmark | ratio | target | met | raw figures | command |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        direction = ">=" if row.get("higher_is_better") else "<="
        ratio = row.get("ratio")
        shown = f"{ratio:.2f}" if isinstance(ratio, (int, float)) and not math.isnan(ratio) else "n/a"
        raw = _short(row.get("raw", {})).replace("|", "/")
        lines.append(f"| {row['name']} | {shown} | {direction} {row['target']:g} | {'yes' if met(row) else 'no'} "
                     f"| {raw} | `{row.get('command', '')}` |")
    lines += [
        "",
        f"Machine: {m.get('cores')} cores, {m.get('cpu')}, torch threads {m.get('torch_threads')}, "
        f"load average at start {_short(m.get('load_average_at_start'))}; torch {m.get('torch')}, "
        f"flwr {m.get('flwr')}, opacus {m.get('opacus')}. Mode: {results.get('mode', '?')}, "
        f"{results.get('seconds', 0):.0f} s in all.",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "results.md").write_text(markdown(results))


def _kept_rows(out: Path) -> list[dict]:
    try:
        return json.loads((out / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer rounds and repetitions")
    parser.add_argument("--only", action="append", choices=ORDER + list(MODULES), metavar="NAME",
                        help="run only the module making this row (repeatable): " + ", ".join(ORDER))
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)

    wanted = [module for module, names in MODULES.items()
              if not args.only or module in args.only or set(names) & set(args.only)]
    started = time.perf_counter()
    info = machine()
    rows = {row["name"]: row for row in _kept_rows(args.out)} if args.only else {}
    failed = []
    for module in wanted:
        print(f"== {module}", flush=True)
        begun = time.perf_counter()
        try:
            made = importlib.import_module(module).run(args.quick)
        except Exception:  # noqa: BLE001 - one broken benchmark must not lose the others' rows
            traceback.print_exc()
            failed.append(module)
            continue
        for row in made:
            row.setdefault("raw", {})["bench_seconds"] = round(time.perf_counter() - begun, 1)
            rows[row["name"]] = row
            print(f"   {row['name']}: ratio {row['ratio']:.3f} (target {row['target']}, "
                  f"{'met' if met(row) else 'NOT met'})", flush=True)
    results = {
        "machine": info, "mode": "quick" if args.quick else "full",
        "seconds": time.perf_counter() - started,
        "rows": sorted(rows.values(), key=lambda r: ORDER.index(r["name"]) if r["name"] in ORDER else len(ORDER)),
    }
    write(results, args.out)
    print(markdown(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
