"""Benchmark the DICOM adapter against plain pydicom loops over the same real files.

Three rows, each measured side by side with interleaved repetitions (median of each):
- dicom-index: `index_site` vs a `dcmread(stop_before_pixels=True)` loop (ratio: ours / plain, lower is better);
- dicom-first-pass: a cold `load_site` that decodes every image, windows, resizes and fills the disk
  cache, vs a `dcmread(...).pixel_array` loop (ratio: ours / plain, lower is better);
- dicom-cached: the same load from a warm disk cache in a fresh state (ratio: decode / cached,
  higher is better).
Files: the demo generator's three sites plus pydicom's bundled test files, in one site folder.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedcare_ops.demo_data import write_demo_sites  # noqa: E402
from data_adapters.dicom import load_site  # noqa: E402
from data_adapters.index import index_site, site_files  # noqa: E402
from data_adapters.transforms import Preprocess  # noqa: E402

COMMAND = "python benchmarks/bench_dicom.py"


def _site(root: Path, quick: bool) -> Path:
    site = root / "site"
    cases = [40, 80, 120] if quick else [120, 300, 600]
    write_demo_sites(root / "demo", sites=3, seed=0, cases=cases)
    shutil.copytree(root / "demo", site / "demo")
    shutil.copytree(Path(pydicom.__file__).parent / "data" / "test_files", site / "pydicom")
    for labels in site.rglob("labels.csv"):
        labels.unlink()  # every file is an image candidate; the loop below reads them all too
    return site


def _plain_headers(files: list[Path]) -> None:
    for path in files:
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            pass


def _plain_pixels(files: list[Path]) -> None:
    for path in files:
        try:
            pydicom.dcmread(path).pixel_array
        except Exception:
            pass


def _load(site: Path, cache: Path) -> int:
    loaded = load_site(site, None, preprocess=Preprocess(), cache_dir=cache, decode_all=True, strict=False)
    return len(loaded.readable)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(pairs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(repeats):
        for name, fn in pairs.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def run(quick: bool) -> list[dict]:
    """Measure the three rows; `quick` uses fewer demo files and repetitions."""
    warnings.simplefilter("ignore")
    repeats = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as tmp:
        root = Path(tmp)
        site = _site(root, quick)
        files = site_files(site)
        index = _interleaved({"ours": lambda: index_site(site), "plain": lambda: _plain_headers(files)}, repeats)

        caches = iter(range(10**6))
        first = _interleaved({
            "ours": lambda: _load(site, root / f"cold-{next(caches)}"),
            "plain": lambda: _plain_pixels(files),
        }, repeats)
        warm = root / "warm"
        decoded = _load(site, warm)
        cached = _interleaved({
            "decode": lambda: _load(site, root / f"cold-{next(caches)}"),
            "cached": lambda: _load(site, warm),
        }, repeats)
    raw = {"files": len(files), "decoded_files": decoded, "repeats": repeats}
    return [
        _row("dicom-index", index["ours"] / index["plain"], 1.0, False,
             {**raw, "ours_s": index["ours"], "plain_s": index["plain"]}),
        _row("dicom-first-pass", first["ours"] / first["plain"], 1.25, False,
             {**raw, "ours_s": first["ours"], "plain_s": first["plain"]}),
        _row("dicom-cached", cached["decode"] / cached["cached"], 10.0, True,
             {**raw, "decode_s": cached["decode"], "cached_s": cached["cached"]}),
    ]


def _row(name: str, ratio: float, target: float, higher: bool, raw: dict) -> dict:
    return {"name": name, "ratio": ratio, "target": target, "higher_is_better": higher, "raw": raw,
            "command": COMMAND}


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    print(f"{'benchmark':18} {'ratio':>8} {'target':>8}  {'met':5} raw")
    for row in rows:
        met = row["ratio"] >= row["target"] if row["higher_is_better"] else row["ratio"] <= row["target"]
        raw = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row["raw"].items())
        print(f"{row['name']:18} {row['ratio']:8.2f} {row['target']:8.2f}  {'yes' if met else 'NO':5} {raw}")
