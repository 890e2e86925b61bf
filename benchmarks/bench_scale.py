"""Scale: round time and peak memory of a simulated federation at 3, 10 and 30 sites, same total data.

Each point is a real `flwr run` (`run_simulation`) of 2 rounds with DP on. The 3-site point is the
demo's own three hospitals (the framework row's run, reused in quick mode where the round count
matches); the larger points split the same total number of cases evenly over their sites. Round
time: metrics.json's "seconds" of the last round (the first pays for imports and decoding). Peak
memory: the sum over every process of the run (those naming its FLWR_HOME, the detached SuperLink
included, and all their descendants: simulation runtime, Ray, the sites' workers), sampled from
/proc every 0.5 s; RSS counts shared pages once per process, PSS splits them, so PSS is the
figure that must fit in 8 GB. Ratio: (round time at the most sites / at 3) / (most sites / 3),
target <= 1.0: cost grows no faster than the number of sites. Quick mode stops at 10 sites.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEMO_CASES, DP_SETTINGS, QUICK_CASES, demo_sites, federation, row, set_threads  # noqa: E402

COMMAND = "python benchmarks/run.py --only scale"
MEMORY_LIMIT_MIB = 8 * 1024


def run(quick: bool) -> list[dict]:
    from bench_framework import dp_federation, dp_settings

    threads = set_threads()
    sizes = (3, 10) if quick else (3, 10, 30)
    total = sum(QUICK_CASES if quick else DEMO_CASES)
    points = {}
    for sites in sizes:
        if sites == 3 and quick:
            run_ = dp_federation(quick)
            rounds = len(run_.round_seconds)
        else:
            rounds = 2
            data = demo_sites(quick) if sites == 3 else demo_sites(quick, (total // sites,) * sites)
            run_ = federation(f"scale-{sites}", data, sites, DP_SETTINGS | {"num-server-rounds": rounds})
        points[sites] = {
            "round_s": run_.round_seconds[-1], "rounds_s": run_.round_seconds, "wall_s": run_.wall_s,
            "peak_rss_mib": run_.peak_rss_mib, "peak_pss_mib": run_.peak_pss_mib,
            "peak_processes": run_.peak_processes,
            "fits_8gb": run_.peak_pss_mib <= MEMORY_LIMIT_MIB,
        }
    most = max(sizes)
    ratio = (points[most]["round_s"] / points[3]["round_s"]) / (most / 3)
    raw = {"total_cases": total, "threads": threads, "dp": dp_settings(quick)["dp"],
           "memory_limit_mib": MEMORY_LIMIT_MIB, "sites": points}
    return [row("scale", ratio, 1.0, raw, COMMAND)]


if __name__ == "__main__":
    from run import main
    main(["--only", "scale", *sys.argv[1:]])
