"""What the coordinator's operator is told: a spent budget, a busy ledger and a tampered one are three
different outcomes; a round short of `min-sites` connected sites gives up after `round-timeout`; and
the run's own per-site lines reach Flower's console handler, the one `flwr run --stream` shows."""

import io
import json
import logging
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.logger import console_handler

from client_app.app import train
from fedcare.config import RunConfig
from fedcare.errors import LedgerBusy, LedgerError
from fedcare.model import build_model
from fedcare.privacy.ledger import Ledger
from server_app.app import log as server_log
from server_app.app import publish, stream_log
from server_app.checkpoint import Checkpoints
from server_app.recording import BUSY
from server_app.strategies import TooFewSites, make_strategy

SITES = ("spent", "busy", "tampered", "fine")


@pytest.fixture(scope="module")
def data(demo_site: Path) -> Path:
    return demo_site


def request(server_round: int, node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(build_model(RunConfig()).state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    metadata = Metadata(run_id=11, message_id=f"m{server_round}-{node}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id=str(server_round), created_at=0.0, ttl=600.0,
                        message_type="train")
    return Message(content, metadata=metadata)


def site_reply(msg: Message, name: str, data: Path, state: Path, budget: float = 50.0) -> Message:
    node = {"site-name": name, "data-path": str(data), "state-path": str(state), "budget-epsilon": budget}
    context = Context(run_id=11, node_id=msg.metadata.dst_node_id, node_config=node, state=RecordDict(),
                      run_config={"num-server-rounds": 2, "batch-size": 16, "target-epsilon": 4.0})
    return train(msg, context)


def node_id(name: str) -> int:
    return SITES.index(name) + 1


def test_spent_budget_busy_ledger_and_tampering_are_three_different_outcomes(data, tmp_path):
    states = {name: tmp_path / name for name in SITES}
    # tampered: a real round, then its ledger edited to look as if it had spent less.
    site_reply(request(1, node_id("tampered")), "tampered", data, states["tampered"])
    ledger = states["tampered"] / "ledger.jsonl"
    entry = json.loads(ledger.read_text())
    entry["steps"] -= 1
    ledger.write_text(json.dumps(entry, sort_keys=True) + "\n")

    config = RunConfig(outputs_dir=str(tmp_path / "out"), min_sites=1)
    strategy = make_strategy(config)
    sent = strategy.log.expect(2, "train", [request(2, node_id(name)) for name in SITES])
    replies = [site_reply(sent[0], "spent", data, states["spent"], budget=0.01)]
    busy = Ledger(states["busy"] / "ledger.jsonl")
    busy.initialise()
    with busy.hold():  # another run is in its round at this site
        replies.append(site_reply(sent[1], "busy", data, states["busy"]))
    replies += [site_reply(sent[2], "tampered", data, states["tampered"]),
                site_reply(sent[3], "fine", data, states["fine"])]
    assert len(strategy.log.file_replies(2, "train", replies)) == 1

    entries = strategy.log.rounds[2]
    assert entries["spent"]["train_status"] == "refused" and "privacy budget exhausted" in entries["spent"]["train_error"]
    assert entries["busy"]["train_status"] == BUSY and LedgerBusy.kind in entries["busy"]["train_error"]
    assert entries["tampered"]["train_status"] == "failed" and LedgerError.kind in entries["tampered"]["train_error"]
    assert entries["fine"]["train_status"] == "ok"

    checkpoints = Checkpoints(Path(config.outputs_dir), "11")
    checkpoints.arrays = ArrayRecord(build_model(config).state_dict())
    folder = publish("11", config, strategy, checkpoints, 0, None)
    summary = (folder / "summary.md").read_text()
    document = json.loads((folder / "metrics.json").read_text())
    by_site = {f["site"]: f for f in document["rounds"][0]["failures"]}
    assert [by_site[name]["status"] for name in ("spent", "busy", "tampered")] == ["refused", BUSY, "failed"]
    reasons = [by_site[name]["reason"] for name in ("spent", "busy", "tampered")]
    assert len(set(reasons)) == 3
    for name, reason in zip(("spent", "busy", "tampered"), reasons):
        assert f"round 2, {name}, train: {reason}" in summary
    # A busy site is no faulty one: it is not listed among the sites that failed every round.
    assert set(document["failed_every_round"]) == {"tampered"}


class ConnectedSites:
    """The one Grid call the wait makes, with `count` sites connected."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


def test_a_round_short_of_min_sites_gives_up_after_round_timeout():
    strategy = make_strategy(RunConfig(min_sites=3, round_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(TooFewSites, match=r"round 4: 2 site\(s\) connected after round-timeout 0.5 s, min-sites is 3"):
        strategy.wait_for_sites(4, ConnectedSites(2))
    assert 0.5 <= time.monotonic() - started < 3.0
    strategy.wait_for_sites(4, ConnectedSites(3))  # enough sites: no wait at all


def test_every_site_refusing_for_budget_is_not_called_resumable():
    strategy = make_strategy(RunConfig(min_sites=1))
    for site in ("a", "b"):
        strategy.log.entry(1, site).update(train_status="refused", train_error="privacy budget exhausted")
        strategy.log.privacy.setdefault(1, {})[site] = {"status": "budget-exhausted"}
    strategy.global_arrays = ArrayRecord(build_model(RunConfig()).state_dict())
    with pytest.raises(TooFewSites, match="privacy budget is spent") as stopped:
        strategy.aggregate_train(1, [])
    assert not stopped.value.resumable
    strategy.log.privacy[1]["b"]["status"] = "ok"  # one site could still train: resuming may help
    with pytest.raises(TooFewSites) as stopped:
        strategy.aggregate_train(1, [])
    assert stopped.value.resumable


def test_the_servers_lines_go_once_through_flowers_console_handler():
    printed = io.StringIO()
    previous = console_handler.setStream(printed)  # where the ServerApp process mirrors it to the stream
    stream_log()
    stream_log()
    assert server_log.handlers.count(console_handler) == 1 and not server_log.propagate
    # Flower's own count of the replies the checks let through is not shown: it hides failed sites.
    flower = logging.getLogger("flwr")
    flower.info("%s: Received %s results and %s failures", "aggregate_train", 2, 0)
    assert "Received" not in printed.getvalue()
    strategy = make_strategy(RunConfig(min_sites=1))
    strategy.log.entry(1, "north").update(train_status="ok", evaluate_status="ok", auc=0.8, num_examples=10)
    strategy.log.privacy[1] = {"north": {"status": "ok", "epsilon": 1.25, "budget_epsilon": 8.0}}
    strategy.log.entry(1, "south").update(train_status="failed", train_error="south: the site stopped on an error")
    for line in strategy.log.round_lines(1):
        server_log.info("%s", line)
    console_handler.setStream(previous)
    lines = [line for line in printed.getvalue().splitlines() if "round 1" in line]
    assert len(lines) == 3
    assert "round 1 north: trained; epsilon spent 1.25 of budget 8.00; val AUC 0.800" in lines[0]
    assert "round 1 south: failed (south: the site stopped on an error)" in lines[1]
    assert "round 1 all sites: weighted val AUC 0.800 over 10 validation case(s)" in lines[2]
    server_log.handlers.remove(console_handler)  # as the ServerApp process found it, for the tests after this one
    server_log.propagate = True
    flower.filters.clear()
