"""The ClientApp's handlers called as Flower calls them, with real messages and a real site folder."""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client_app.app import app, evaluate_global, train
from fedcare.config import RunConfig
from fedcare.errors import SITE_ERROR_CODE
from fedcare.model import build_model
from fedcare.privacy.ledger import Ledger
from server_app.recording import refusal_reason

RUN = {"num-server-rounds": 2, "batch-size": 16, "target-epsilon": 4.0}


@pytest.fixture(scope="module")
def data(demo_site: Path) -> Path:
    return demo_site


def request(kind: str, server_round: int = 1) -> Message:
    content = RecordDict({"arrays": ArrayRecord(build_model(RunConfig()).state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    metadata = Metadata(run_id=11, message_id=f"m{server_round}{kind}", src_node_id=0, dst_node_id=5,
                        reply_to_message_id="", group_id=str(server_round), created_at=0.0, ttl=600.0,
                        message_type=kind)
    return Message(content, metadata=metadata)


def context(data: Path, state: Path, budget: float = 50.0, run: dict | None = None, **policy) -> Context:
    node = {"site-name": "st-olav", "data-path": str(data), "state-path": str(state), "budget-epsilon": budget,
            **{key.replace("_", "-"): value for key, value in policy.items()}}
    return Context(run_id=11, node_id=5, node_config=node, state=RecordDict(), run_config={**RUN, **(run or {})})


def weights(reply: Message) -> torch.Tensor:
    return torch.cat([t.flatten() for t in reply.content["arrays"].to_torch_state_dict().values()])


def test_a_private_round_replies_with_weights_and_numbers_and_logs_its_egress(data, tmp_path):
    reply = app(request("train"), context(data, tmp_path))
    assert not reply.has_error()
    trained = reply.content["metrics"]["num-examples"]
    privacy = reply.content["privacy"]
    assert privacy["status"] == "ok" and 0 < privacy["epsilon"] <= privacy["budget_epsilon"]
    egress = [json.loads(line) for line in (tmp_path / "egress.jsonl").read_text().splitlines()]
    assert [e["type"] for e in egress] == ["train"] and egress[0]["round"] == 1
    assert {a["name"] for a in egress[0]["arrays"]} == set(build_model(RunConfig()).state_dict())

    evaluation = evaluate_global(request("evaluate"), context(data, tmp_path))
    per_class = {"auc-0", "auc-1", "confusion-0-0", "confusion-0-1", "confusion-1-0", "confusion-1-1"}
    assert set(evaluation.content["metrics"].keys()) == {"loss", "accuracy", "auc", "num-examples"} | per_class
    assert trained + evaluation.content["metrics"]["num-examples"] == 40  # images, not batches or patients


def test_a_site_without_budget_refuses_and_sends_no_weights(data, tmp_path):
    reply = train(request("train"), context(data, tmp_path, budget=0.01))
    assert not reply.has_error() and "arrays" not in reply.content
    assert reply.content["privacy"]["status"] == "budget-exhausted"
    assert Ledger(tmp_path / "ledger.jsonl").entries() == []


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
def test_bad_site_data_gives_a_one_line_failed_reply(demo_site_copy, tmp_path, breakage, named, caplog):
    folder = {"missing-folder": tmp_path / "does-not-exist", "no-dicom": tmp_path / "empty"}.get(breakage)
    if breakage == "no-dicom":
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image")
    if breakage == "bad-manifest":
        folder = demo_site_copy  # a copy under tmp_path: this test breaks it
        (folder / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3,maybe\n")
    reply = train(request("train"), context(folder, tmp_path / "state"))
    assert reply.has_error() and "data folder or label manifest" in reply.error.reason
    assert "\n" not in reply.error.reason and "Traceback" not in reply.error.reason
    # Folder and file names can hold a patient's name: they stay in the site's log, out of the reply.
    assert named not in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert named in caplog.text


def test_the_same_train_request_sent_twice_gives_different_weights_and_two_ledger_entries(data, tmp_path):
    """A coordinator replaying one request (same model, same round, same seed) gets fresh noise each time."""
    first = train(request("train", 1), context(data, tmp_path))
    second = train(request("train", 1), context(data, tmp_path))
    assert not torch.allclose(weights(first), weights(second))
    assert len(Ledger(tmp_path / "ledger.jsonl").entries()) == 2


def test_no_training_loss_leaves_the_site(data, tmp_path):
    reply = app(request("train"), context(data, tmp_path))
    assert set(reply.content["metrics"].keys()) == {"num-examples"}
    assert "loss" not in json.dumps({k: dict(v) for k, v in reply.content.config_records.items()})
    assert "train-loss" not in (tmp_path / "egress.jsonl").read_text()


@pytest.mark.parametrize("run, policy, reason", [
    ({"dp": False}, {}, "training without DP, and this site requires DP"),
    ({"noise-multiplier": 0.2}, {"min_noise_multiplier": 0.5}, "below this site's minimum 0.5"),
    ({"target-epsilon": 20.0}, {"max_run_epsilon": 5.0}, "over the 5 this site allows one run"),
    ({"target-delta": 1e-3}, {}, "asks for delta 0.001"),
], ids=["dp-off", "too-little-noise", "over-the-run-cap", "another-delta"])
def test_a_request_outside_the_sites_policy_is_refused_with_the_reason_the_server_records(
        data, tmp_path, run, policy, reason):
    reply = app(request("train"), context(data, tmp_path, run=run, **policy))
    assert not reply.has_error() and "arrays" not in reply.content
    assert reason in refusal_reason(reply)
    assert Ledger(tmp_path / "ledger.jsonl").entries() == []
    assert "refused" in (tmp_path / "egress.jsonl").read_text()


def test_a_policy_that_allows_it_trains_without_dp_and_the_ledger_records_an_unbounded_release(data, tmp_path):
    reply = train(request("train"), context(data, tmp_path, run={"dp": False}, dp_required=False))
    assert "arrays" in reply.content and reply.content["privacy"]["mechanism"] == "none"
    entry = Ledger(tmp_path / "ledger.jsonl").entries()[-1]
    assert not entry.private and entry.noise_multiplier == 0.0


def test_a_deployed_site_without_a_budget_fails_at_start_in_one_line(data, tmp_path, caplog):
    node = {"site-name": "st-olav", "data-path": str(data), "state-path": str(tmp_path)}
    reply = train(request("train"), Context(run_id=11, node_id=5, node_config=node, state=RecordDict(), run_config=RUN))
    assert reply.has_error() and "setting is wrong" in reply.error.reason
    assert "'budget-epsilon' is missing" in caplog.text
    assert not list(tmp_path.iterdir())  # nothing read, nothing written


def test_the_run_config_neither_moves_the_sites_split_nor_its_delta(data, tmp_path):
    train(request("train", 1), context(data, tmp_path, run={"seed": 1}))
    split = (tmp_path / "split.json").read_text()
    train(request("train", 2), context(data, tmp_path, run={"seed": 7, "batch-size": 8}))
    assert (tmp_path / "split.json").read_text() == split
    entries = Ledger(tmp_path / "ledger.jsonl").entries()
    assert len(entries) == 2 and entries[0].delta == entries[1].delta
    assert "val-fraction" not in RunConfig().to_dict()
    refused = train(request("train", 3), context(data, tmp_path, run={"val-fraction": 0.5}))
    assert refused.has_error() and "setting is wrong" in refused.error.reason


def test_evaluation_past_the_sites_quota_is_refused(data, tmp_path):
    answers = [app(request("evaluate", r), context(data, tmp_path, evaluation_quota=2)) for r in (1, 2, 3)]
    assert ["metrics" in a.content for a in answers] == [True, True, False]
    assert "evaluations this site allows one run" in refusal_reason(answers[-1])


def test_a_state_folder_with_earlier_rounds_but_no_ledger_does_not_train(data, tmp_path):
    app(request("train", 1), context(data, tmp_path))
    for name in ("ledger.jsonl", "ledger.head.json"):
        (tmp_path / name).unlink()  # the ledger is lost, or someone deleted it to reset the budget
    reply = train(request("train", 2), context(data, tmp_path))
    assert reply.has_error() and "no privacy ledger" in reply.error.reason
    assert not (tmp_path / "ledger.jsonl").exists()

