"""The benchmark harness and byte counting, without running any benchmark or asserting any timing."""

import json
import sys
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedcare.config import RunConfig
from fedcare.egress import append_entry, reply_entry
from fedcare.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_communication  # noqa: E402
import run as harness  # noqa: E402
from common import median_ratio, tree_pids  # noqa: E402

ROWS = [
    {"name": "dp-overhead", "ratio": 1.4, "target": 1.6, "higher_is_better": False,
     "raw": {"modes": {"hooks": {"ratio": 1.4}}, "plain_s": 0.5}, "command": "python benchmarks/run.py --only dp-overhead"},
    {"name": "accuracy", "ratio": 0.8, "target": 0.9, "higher_is_better": True,
     "raw": {"auc": {"pooled": 0.9, "fedavg|x": 0.72}}, "command": "python benchmarks/run.py --only accuracy"},
]


def test_harness_writes_valid_json_and_a_markdown_table(tmp_path):
    results = {"machine": harness.machine(), "mode": "quick", "seconds": 1.0, "rows": ROWS}
    harness.write(results, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in written["rows"]] == ["dp-overhead", "accuracy"]
    assert {"cores", "cpu", "torch_threads", "torch", "flwr", "opacus"} <= set(written["machine"])
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| benchmark | ratio | target |")
    body = [line for line in table[2:] if line.startswith("| ")]
    assert len(body) == 2 and all(line.count(" | ") == 5 for line in body)  # a "|" in raw cannot split a cell
    assert "| dp-overhead | 1.40 | <= 1.6 | yes |" in body[0]
    assert "| accuracy | 0.80 | >= 0.9 | no |" in body[1]


def test_met_reads_the_direction_and_rejects_missing_ratios():
    assert harness.met({"ratio": 1.0, "target": 1.15})
    assert not harness.met({"ratio": 0.8, "target": 0.9, "higher_is_better": True})
    assert not harness.met({"ratio": float("nan"), "target": 1.0})


def test_median_ratio_pairs_interleaved_repetitions():
    times = {"ours": [2.0, 3.0, 10.0], "base": [1.0, 1.0, 10.0]}
    assert median_ratio(times, "ours", "base") == pytest.approx(2.0)


def test_tree_pids_finds_a_process_and_its_children(tmp_path):
    import subprocess

    marker = str(tmp_path / "marker")
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               "subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])", marker])
    try:
        for _ in range(100):
            pids = tree_pids(marker)
            if len(pids) >= 2:
                break
            __import__("time").sleep(0.05)
        assert parent.pid in pids and len(pids) >= 2
    finally:
        for pid in tree_pids(marker):
            if pid != parent.pid:
                __import__("os").kill(pid, 15)
        parent.terminate()
        parent.wait()


def test_communication_counts_the_bytes_of_a_real_egress_log(tmp_path):
    config = RunConfig()
    model = build_model(config)
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=600.0, message_type="train")
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), metadata=metadata)
    reply = Message(RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": 10}),
        "privacy": ConfigRecord({"dp": True, "epsilon": 1.0}),
    }), reply_to=request)
    append_entry(tmp_path / "site-0" / "egress.jsonl", reply_entry(reply, "run-1", 1, config.model))

    figures = bench_communication.measure(tmp_path, config)
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert figures["parameter_bytes"] == params and figures["train_replies"] == 1
    assert figures["array_dtypes"] == ["float32"]
    # The arrays carry their values plus a small serialisation header; metrics and privacy are extra.
    assert params < figures["median_array_bytes"] < 1.05 * params
    assert figures["median_other_bytes"] > 0
    assert figures["ratio"] == pytest.approx(figures["median_sent_bytes"] / params)
