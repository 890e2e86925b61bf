"""Exit codes that mean something, through the `fedcare` command's own entry point (in this process,
as the installed script calls it): `audit` fails on any violation, and `run --fresh-sites` refuses
to touch the ledger of a site `fedcare demo-data` did not write (and clears only demo sites)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcare_ops.demo_data import write_demo_sites
from fedcare.config import RunConfig
from fedcare.egress import append_entry, reply_entry
from fedcare_ops.federation import clear_demo_state
from fedcare.model import build_model
from tests.unit.test_client_app import request

ROOT = Path(__file__).resolve().parents[2]


def test_audit_exits_non_zero_on_a_violation(tmp_path, fedcare):
    log = tmp_path / "egress.jsonl"
    weights = ArrayRecord(build_model(RunConfig()).state_dict())
    clean = Message(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": 32}),
                                "site": ConfigRecord({"name": "h1"})}), reply_to=request("train"))
    append_entry(log, reply_entry(clean, 11, 1, "small-cnn"))
    assert fedcare("audit", str(log))[0] == 0

    # A reply that sent a number nobody allowed: one violation is enough to fail the audit.
    leaky = Message(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": 32, "patient-age": 61.0}),
                                "site": ConfigRecord({"name": "h1"})}), reply_to=request("train"))
    append_entry(log, reply_entry(leaky, 11, 2, "small-cnn"))
    status, out, _ = fedcare("audit", str(log))
    assert status == 1 and "1 VIOLATION" in out and "patient-age" in out
    # Not an egress log at all: one line says so, the exit too, and no verdict file is left beside it.
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_text((ROOT / "README.md").read_text())
    status, _, err = fedcare("audit", str(readme))
    assert status == 1 and "not an egress log" in err and not (readme.parent / "egress_audit.txt").exists()


def test_fresh_sites_refuses_a_folder_demo_data_did_not_write(tmp_path, fedcare):
    own = tmp_path / "own-site"
    own.mkdir()
    (own / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3,0\n")
    ledger = tmp_path / "sites" / "own" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("{}\n")
    preset = tmp_path / "run.toml"
    preset.write_text(f'sites-dir = "{tmp_path / "sites"}"\noutputs-dir = "{tmp_path / "out"}"\n')
    status, _, err = fedcare("run", "--fresh-sites", "--site", f"own={own}", "--config", str(preset))
    assert status == 1 and "Traceback" not in err
    assert "--fresh-sites" in err and "was not written by `fedcare demo-data`" in err
    assert ledger.read_text() == "{}\n" and not (tmp_path / "out").exists()  # nothing touched, nothing started

    [demo] = write_demo_sites(tmp_path / "demo", sites=1, cases=[4])
    state = tmp_path / "sites" / "site-0"
    (state / "ledger.jsonl").parent.mkdir(parents=True)
    (state / "ledger.jsonl").write_text("{}\n")
    config = RunConfig.from_mapping({"data-root": str(demo.parent), "sites-dir": str(tmp_path / "sites")})
    assert clear_demo_state(config, 1) == [state] and not state.exists()
    assert ledger.exists()  # the other site's ledger was never named, and stays
