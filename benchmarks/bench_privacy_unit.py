"""What patient-level privacy costs: the demo federation at the same epsilon with each site's
`privacy-unit` set to "patient" (DP-SGD samples patients, one random image each per step) and to
"image" (every image its own sample), side by side in one run, both through the real `flwr run`.

Epsilon protects a patient in the first and only an image in the second, so the second's AUC is
what a weaker guarantee buys. Ratio: patient-level AUC / image-level AUC, higher is better; the
target 0.9 asks that protecting patients keeps nine tenths of what protecting images reaches.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DP_SETTINGS, demo_sites, federation, row, set_threads  # noqa: E402

COMMAND = "python benchmarks/run.py --only privacy-unit-accuracy"
TARGET = 0.9


def run(quick: bool) -> list[dict]:
    from bench_framework import dp_federation, rounds

    warnings.simplefilter("ignore")
    threads = set_threads()
    patient = dp_federation(quick)  # the demo with DP at epsilon 8, patient level: shared with other rows
    image = federation("privacy-unit-image", demo_sites(quick, privacy_unit="image"), 3,
                       DP_SETTINGS | {"num-server-rounds": rounds(quick)})
    raw = {"rounds": rounds(quick), "target_epsilon": DP_SETTINGS["target-epsilon"], "threads": threads,
           "auc": {"patient": patient.final_auc, "image": image.final_auc}}
    return [row("privacy-unit-accuracy", patient.final_auc / image.final_auc, TARGET, raw, COMMAND,
                higher_is_better=True)]


if __name__ == "__main__":
    from run import main
    main(["--only", "privacy-unit-accuracy", *sys.argv[1:]])
