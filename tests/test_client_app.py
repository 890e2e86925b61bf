"""The ClientApp's handlers called as Flower calls them, with real messages and a real site folder."""

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client_app.app import app, evaluate_global, train
from data_adapters import write_demo_sites
from fedcare.config import RunConfig
from fedcare.errors import SITE_ERROR_CODE
from fedcare.model import build_model

RUN = {"num-server-rounds": 2, "batch-size": 16, "target-epsilon": 4.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("client") / "data"
    write_demo_sites(folder, sites=1, seed=2, cases=[40])
    return folder / "site-0"


def request(kind: str, server_round: int = 1) -> Message:
    content = RecordDict({"arrays": ArrayRecord(build_model(RunConfig()).state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    metadata = Metadata(run_id=11, message_id=f"m{server_round}{kind}", src_node_id=0, dst_node_id=5,
                        reply_to_message_id="", group_id=str(server_round), created_at=0.0, ttl=600.0,
                        message_type=kind)
    return Message(content, metadata=metadata)


def context(data: Path, state: Path, budget: float = 50.0) -> Context:
    # A 40-case site: its own delta of 1e-3 keeps it within the readiness rules (1/(10 N) would be 3e-3).
    node = {"site-name": "st-olav", "data-path": str(data), "state-path": str(state), "budget-epsilon": budget,
            "budget-delta": 1e-3}
    return Context(run_id=11, node_id=5, node_config=node, state=RecordDict(), run_config=RUN)


def test_a_private_round_replies_with_weights_and_numbers_and_logs_its_egress(data, tmp_path):
    reply = app(request("train"), context(data, tmp_path))
    assert not reply.has_error()
    assert reply.content["metrics"]["num-examples"] == 32  # training samples, not batches
    privacy = reply.content["privacy"]
    assert privacy["status"] == "ok" and 0 < privacy["epsilon"] <= privacy["budget_epsilon"]
    egress = [json.loads(line) for line in (tmp_path / "egress.jsonl").read_text().splitlines()]
    assert [e["type"] for e in egress] == ["train"] and egress[0]["round"] == 1
    assert {a["name"] for a in egress[0]["arrays"]} == set(build_model(RunConfig()).state_dict())

    evaluation = evaluate_global(request("evaluate"), context(data, tmp_path))
    assert set(evaluation.content["metrics"].keys()) == {"loss", "accuracy", "auc", "num-examples"}


def test_a_site_without_budget_refuses_and_sends_no_weights(data, tmp_path):
    reply = train(request("train"), context(data, tmp_path, budget=0.01))
    assert not reply.has_error() and "arrays" not in reply.content
    assert reply.content["privacy"]["status"] == "budget-exhausted"
    assert not (tmp_path / "ledger.jsonl").exists()


def test_a_tampered_ledger_stops_training_with_a_reply_naming_the_site(data, tmp_path, caplog):
    train(request("train", 1), context(data, tmp_path))
    ledger = tmp_path / "ledger.jsonl"
    entry = json.loads(ledger.read_text())
    entry["steps"] -= 1  # someone makes the site look as if it had spent less
    ledger.write_text(json.dumps(entry, sort_keys=True) + "\n")
    reply = train(request("train", 2), context(data, tmp_path))
    assert reply.has_error() and reply.error.code == SITE_ERROR_CODE
    assert reply.error.reason.startswith("st-olav: ") and "privacy ledger" in reply.error.reason
    # The site's own log names the file; the reply leaving the site names no path of it.
    assert str(tmp_path) not in reply.error.reason and str(ledger) in caplog.text


@pytest.mark.parametrize("breakage, named", [
    ("missing-folder", "does-not-exist"),
    ("no-dicom", "empty"),
    ("bad-manifest", "labels.csv"),
])
def test_bad_site_data_gives_a_one_line_failed_reply(data, tmp_path, breakage, named, caplog):
    folder = {"missing-folder": tmp_path / "does-not-exist", "no-dicom": tmp_path / "empty",
              "bad-manifest": tmp_path / "copy"}[breakage]
    if breakage == "no-dicom":
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image")
    if breakage == "bad-manifest":
        import shutil
        shutil.copytree(data, folder)
        (folder / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3,maybe\n")
    reply = train(request("train"), context(folder, tmp_path / "state"))
    assert reply.has_error() and "data folder or label manifest" in reply.error.reason
    assert "\n" not in reply.error.reason and "Traceback" not in reply.error.reason
    # Folder and file names can hold a patient's name: they stay in the site's log, out of the reply.
    assert named not in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert named in caplog.text
