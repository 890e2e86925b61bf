"""Communication: what each site sends per round, divided by the model's own parameter bytes.

Ours: every train reply of the demo federation with DP (the framework row's real Flower run), as
each site's egress log records it (fedcare.egress): the serialised arrays plus the metrics and
the privacy record that travel beside them. Baseline: the model's parameters, sum of numel x
itemsize over its state_dict, the least any weight-sharing FL stack must send. Ratio: median over
replies of sent / parameter bytes; target <= 1.05 (nothing else of substance travels).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import row, set_threads  # noqa: E402

from fedcare.config import RunConfig  # noqa: E402
from fedcare.model import build_model  # noqa: E402

COMMAND = "python benchmarks/run.py --only communication"
TARGET = 1.05


def parameter_bytes(config: RunConfig) -> int:
    return sum(t.numel() * t.element_size() for t in build_model(config).state_dict().values())


def sent_per_reply(sites_dir: Path, kind: str = "train") -> list[dict]:
    """One record per reply of `kind` in every site's egress log: its array bytes and its whole size.

    The log's "bytes" is the arrays plus everything else the reply carries, so the rest is the
    difference.
    """
    replies = []
    for log in sorted(Path(sites_dir).glob("*/egress.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["type"] != kind or "error" in entry:
                continue
            arrays = sum(a["bytes"] for a in entry["arrays"])
            replies.append({"site": log.parent.name, "round": entry["round"], "array_bytes": arrays,
                            "other_bytes": entry["bytes"] - arrays, "bytes": entry["bytes"],
                            "dtypes": sorted({a["dtype"] for a in entry["arrays"]})})
    return replies


def measure(sites_dir: Path, config: RunConfig) -> dict:
    """The ratio and its raw figures for one run's egress logs."""
    params = parameter_bytes(config)
    train = sent_per_reply(sites_dir, "train")
    if not train:
        raise ValueError(f"no train replies in the egress logs under {sites_dir}")
    evaluate = sent_per_reply(sites_dir, "evaluate")
    return {
        "ratio": statistics.median(r["bytes"] / params for r in train),
        "parameter_bytes": params, "train_replies": len(train),
        "median_sent_bytes": statistics.median(r["bytes"] for r in train),
        "median_array_bytes": statistics.median(r["array_bytes"] for r in train),
        "median_other_bytes": statistics.median(r["other_bytes"] for r in train),
        "max_sent_bytes": max(r["bytes"] for r in train),
        "array_dtypes": sorted({d for r in train for d in r["dtypes"]}),
        "median_evaluate_reply_bytes": statistics.median(r["bytes"] for r in evaluate) if evaluate else 0,
    }


def run(quick: bool) -> list[dict]:
    from bench_framework import dp_federation  # the run is shared with the framework row

    set_threads()
    flower = dp_federation(quick)
    figures = measure(flower.sites_dir, RunConfig.from_mapping(flower.metrics["config"]))
    ratio = figures.pop("ratio")
    figures["float16_transfer"] = ("not implemented: updates travel as float32; with Flower's .npy "
                                   "serialisation float16 would halve the array bytes")
    return [row("communication", ratio, TARGET, figures, COMMAND)]


if __name__ == "__main__":
    from run import main
    main(["--only", "communication", *sys.argv[1:]])
