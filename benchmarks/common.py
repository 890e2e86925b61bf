"""What the benchmark modules share: scratch folders, demo data, thread settings, interleaved
timing, real simulated federations with their wall time and the peak memory of their processes.

Everything a benchmark writes lies under `outputs/bench/`, so a clean clone reproduces it with
`make bench` and `make clean` removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedcare_ops.demo_data import write_demo_sites  # noqa: E402
from fedcare_ops.federation import run_simulation  # noqa: E402

SCRATCH = ROOT / "outputs" / "bench"
DEMO_CASES = (120, 300, 600)  # the demo's three hospitals, as `make demo` writes them
QUICK_CASES = (60, 150, 300)
DEMO_SEED = 0
# The demo preset's values with DP on (configs/demo.toml), minus its deliberately small site-0
# budget: a benchmark measures training, not a refusal.
DP_SETTINGS: dict[str, Any] = {
    "local-epochs": 8, "batch-size": 32, "optimizer": "sgd", "learning-rate": 0.1, "dp": True,
    "target-epsilon": 8.0, "max-grad-norm": 1.0,
}
# Each benchmark site's own settings (site.toml): a budget no benchmark exhausts, and consent to the
# rows that train without DP.
BENCH_BUDGET = 1000.0
BENCH_POLICY: dict[str, Any] = {"dp-required": False}
# configs/no-dp.toml: without DP noise Adam converges faster.
NO_DP_SETTINGS: dict[str, Any] = {
    "local-epochs": 2, "batch-size": 32, "optimizer": "adam", "learning-rate": 0.003, "dp": False,
}


def set_threads() -> int:
    """One torch thread count for this process and for every Flower site it starts (BENCH_THREADS).

    The default is 1: on a 2-core machine shared with other work, two OpenMP threads that must
    meet at every barrier were measured 10-20x slower than one, which would swamp every ratio.
    Flower's simulation gives each site 2 CPUs, so sites run one after another, as the in-process
    baselines do; OMP_NUM_THREADS reaches the sites' processes (Ray keeps a value already set).
    """
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def demo_sites(quick: bool, cases: tuple[int, ...] | None = None, privacy_unit: str = "patient") -> Path:
    """The demo hospitals' DICOM under outputs/bench/, written once and reused by later runs; each site's
    site.toml sets `privacy_unit`."""
    cases = tuple(cases or (QUICK_CASES if quick else DEMO_CASES))
    folder = SCRATCH / "data" / ("demo-" + "-".join(map(str, cases)) + ("" if privacy_unit == "patient" else "-image"))
    if not (folder / f"site-{len(cases) - 1}" / "site.toml").is_file():
        write_demo_sites(folder, sites=len(cases), seed=DEMO_SEED, cases=list(cases), overwrite=True,
                         budgets={f"site-{i}": BENCH_BUDGET for i in range(len(cases))},
                         policy=BENCH_POLICY | {"privacy-unit": privacy_unit})
    return folder


def median_ratio(timings: dict[str, list[float]], ours: str, baseline: str) -> float:
    """Median over repetitions of ours/baseline, each pair timed back to back (interleaved)."""
    return statistics.median(a / b for a, b in zip(timings[ours], timings[baseline]))


def interleaved(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time each function once per repetition, in turn, so slow phases of a shared machine hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def row(name: str, ratio: float, target: float, raw: dict, command: str, higher_is_better: bool = False) -> dict:
    return {"name": name, "ratio": ratio, "target": target, "higher_is_better": higher_is_better,
            "raw": raw, "command": command}


# --- memory of a process tree -------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The command name in stat may hold spaces and parentheses: the fields start after the last ')'.
        table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def tree_pids(marker: str) -> set[int]:
    """Processes whose command line names `marker`, and all their descendants."""
    table = _processes()
    found = {pid for pid, (_, cmdline) in table.items() if marker in cmdline and pid != os.getpid()}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def memory_kib(pids: set[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in KiB; PSS splits shared pages between their users, RSS counts them in each."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return rss, pss


class PeakMemory:
    """Sample the memory of every process of one federation every `interval` seconds, in a thread."""

    def __init__(self, marker: str, interval: float = 0.5) -> None:
        self.marker, self.interval = marker, interval
        self.peak_rss_kib = self.peak_pss_kib = self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            pids = tree_pids(self.marker)
            rss, pss = memory_kib(pids)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_processes = max(self.peak_processes, len(pids))


# --- real federations ---------------------------------------------------------------------------

@dataclass
class Federation:
    """One finished `flwr run`: its run folder and what the benchmark saw from outside."""

    folder: Path
    sites_dir: Path
    wall_s: float
    peak_rss_mib: float
    peak_pss_mib: float
    peak_processes: int
    metrics: dict = field(repr=False, default_factory=dict)

    @property
    def round_seconds(self) -> list[float]:
        return [r["seconds"] for r in self.metrics["rounds"]]

    @property
    def final_auc(self) -> float:
        return self.metrics["rounds"][-1]["aggregate"]["auc"]


_FEDERATIONS: dict[str, Federation] = {}


@contextmanager
def _output_to(log: Path):
    """Send this process's stdout and stderr (and so flwr's streamed logs) to a file for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def federation(name: str, data_root: Path, sites: int, settings: dict[str, Any]) -> Federation:
    """Run (or reuse, within this process) one simulated federation with fresh site state.

    Rows that need the same run share it: the framework row's DP round is also the accuracy
    row's FedAvg + DP figure and the communication row's egress log.
    """
    key = json.dumps([str(data_root), sites, settings], sort_keys=True)
    if key in _FEDERATIONS:
        return _FEDERATIONS[key]
    base = SCRATCH / "runs" / name
    shutil.rmtree(base, ignore_errors=True)  # fresh ledgers and egress logs: each run starts from zero
    home = base / "flwr-home"
    values = settings | {
        "data-root": str(data_root), "sites-dir": str(base / "sites"), "outputs-dir": str(base / "out"),
        "min-sites": min(2, sites)}
    home.mkdir(parents=True)
    start = time.perf_counter()
    with PeakMemory(str(home.resolve())) as memory, _output_to(base / "flwr.log"):
        folder = run_simulation(ROOT, None, sites, overrides=values, flwr_home=home)
    wall = time.perf_counter() - start
    result = Federation(folder, base / "sites", wall, memory.peak_rss_kib / 1024, memory.peak_pss_kib / 1024,
                        memory.peak_processes, json.loads((folder / "metrics.json").read_text()))
    _FEDERATIONS[key] = result
    return result


def weighted_auc(per_site: list[tuple[float, int]]) -> float:
    """AUC of each site's validation split, weighted by its number of validation samples."""
    total = sum(n for _, n in per_site)
    return sum(auc * n for auc, n in per_site) / total
