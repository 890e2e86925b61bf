"""Runs kept apart: each run's own checkpoint folder, `resume` naming the run it continues, and a
privacy report that explains every round a site's ledger charged (lost replies, resumes)."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client_app.app import app as client_app
from fedcare.egress import ModelShapes, audit

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.model import build_model
from fedcare.outputs import resume_folder
from fedcare.privacy import accounting
from fedcare.privacy.record import DP_SGD
from fedcare.privacy.report import write_privacy_report
from fedcare.readiness import run_problems
from server_app.checkpoint import Checkpoints
from server_app.privacy_summary import privacy_report_data
from server_app.reconcile import LOST, TWICE
from server_app.strategies import make_strategy

CONFIG = RunConfig()
SIGMA, Q, STEPS, DELTA = 1.1, 0.05, 20, 1e-5


def model_state(seed: int) -> dict[str, torch.Tensor]:
    # build_model seeds itself from the run config: shift the weights so that each run's model is its own.
    return {k: v + seed if v.is_floating_point() else v for k, v in build_model(CONFIG).state_dict().items()}


def checkpoint_rounds(outputs, run_id: str, seed: int, rounds: int) -> dict[str, torch.Tensor]:
    strategy, checkpoints = make_strategy(CONFIG), Checkpoints(outputs, run_id)
    state = model_state(seed)
    for number in range(1, rounds + 1):
        strategy.log.entry(number, "site-0").update(train_status="ok")
        checkpoints.after_round(strategy, CONFIG.to_dict())(number, ArrayRecord(state))
    return state


def test_two_runs_keep_their_own_checkpoints_and_resume_continues_the_named_one(tmp_path):
    first = checkpoint_rounds(tmp_path, "1234", seed=1, rounds=2)
    second = checkpoint_rounds(tmp_path, "5678", seed=2, rounds=3)  # at the same time, same outputs folder
    for run_id, rounds in (("1234", 2), ("5678", 3)):
        saved = torch.load(tmp_path / "checkpoints" / run_id / "checkpoint.pt", weights_only=False)
        assert saved["round"] == rounds

    strategy, checkpoints = make_strategy(CONFIG), Checkpoints(tmp_path, "9000")
    arrays = checkpoints.restore(strategy, set(first), "12")  # a unique start of the run id is enough
    assert checkpoints.resumed_run == "1234" and strategy.round_offset == 2
    restored = arrays.to_torch_state_dict()
    assert all(torch.equal(restored[k], first[k]) for k in first)
    assert not all(torch.equal(restored[k], second[k]) for k in second)
    # The resumed run writes its own folder; the run it continued stays at round 2.
    checkpoints.after_round(strategy, CONFIG.to_dict())(1, arrays)
    assert torch.load(tmp_path / "checkpoints" / "9000" / "checkpoint.pt", weights_only=False)["round"] == 3
    assert torch.load(tmp_path / "checkpoints" / "1234" / "checkpoint.pt", weights_only=False)["round"] == 2


def test_resume_must_name_exactly_one_run_with_a_checkpoint(tmp_path):
    for run_id in ("1234", "1299"):
        checkpoint_rounds(tmp_path, run_id, seed=1, rounds=1)
    assert resume_folder(tmp_path, "1299") == tmp_path / "checkpoints" / "1299"
    with pytest.raises(ConfigError, match=r"ambiguous: it starts the run ids 1234, 1299"):
        resume_folder(tmp_path, "12")
    with pytest.raises(ConfigError, match=r"no checkpoint of that run .*runs with a checkpoint: 1234, 1299"):
        resume_folder(tmp_path, "77")
    # Checked at start-up, as one line among the run's problems.
    [problem] = run_problems(RunConfig(outputs_dir=str(tmp_path), resume="77"))
    assert "'resume' = '77'" in problem and "\n" not in problem
    assert run_problems(RunConfig(outputs_dir=str(tmp_path), resume="1234")) == []


def test_resume_true_is_refused_in_one_line_and_false_means_afresh():
    with pytest.raises(ConfigError, match="name the run to continue"):
        RunConfig.from_mapping({"resume": True})
    assert RunConfig.from_mapping({"resume": False}).resume == ""
    assert RunConfig.from_mapping({"resume": "1234"}).resume == "1234"


def reply(history_length: int, status: str = "ok", run_rounds: list[int] | None = None) -> dict:
    """A site's train-reply privacy record after a round, with `history_length` charged rounds in its ledger
    (and, from a ClientApp that sends them, the round of this run that charged each, 0 for another run's)."""
    history = [(SIGMA, Q, STEPS)] * history_length
    return ({"history-run-round": run_rounds} if run_rounds is not None else {}) | {
        "mechanism": DP_SGD, "privacy_unit": "patient", "population": 100, "sample_rate": Q,
        "noise_multiplier": SIGMA, "steps": STEPS, "max_grad_norm": 1.0, "delta": DELTA, "accountant": "rdp",
        "epsilon": accounting.epsilon(history, DELTA, "rdp"), "budget_epsilon": 50.0, "delta_rule": "site's own",
        "status": status, "epsilon_before": 0.0, "epsilon_after": 0.0,
        "history-noise-multiplier": [h[0] for h in history], "history-sample-rate": [h[1] for h in history],
        "history-steps": [h[2] for h in history],
    }


def test_the_report_shows_a_lost_reply_and_a_round_charged_twice_across_a_resume(tmp_path):
    # site-0: round 3's reply was lost after the ledger recorded it (round 4's history is two longer).
    # site-1: the run resumed from round 2; the stopped run had trained round 3 there already.
    # site-2: failed in round 4, the last round, so whether it charged it cannot be seen.
    privacy = {1: {"site-0": reply(1), "site-1": reply(1), "site-2": reply(1)},
               2: {"site-0": reply(2), "site-1": reply(2), "site-2": reply(2)},
               3: {"site-1": reply(4), "site-2": reply(3)},
               4: {"site-0": reply(4), "site-1": reply(5)}}
    rounds = {r: {site: {"train_status": "ok" if site in privacy[r] else "failed"} for site in ("site-0", "site-1", "site-2")}
              for r in privacy}
    data = privacy_report_data(privacy, rounds, "run-9", True, resumed_from=2)
    sites = data["sites"]
    assert [(row["round"], row.get("note")) for row in sites["site-0"]["rounds"]] == [
        (1, None), (2, None), (3, LOST), (4, None)]
    assert [(row["round"], row.get("note")) for row in sites["site-1"]["rounds"]] == [
        (1, None), (2, None), (3, TWICE), (3, None), (4, None)]
    assert [row["round"] for row in sites["site-2"]["rounds"]] == [1, 2, 3] and sites["site-2"]["unseen_rounds"] == [4]
    # The cumulative epsilon of each row is that of the history up to it, and the site's total covers all.
    lost = sites["site-0"]["rounds"][2]
    assert lost["epsilon"] == pytest.approx(accounting.epsilon([(SIGMA, Q, STEPS)] * 3, DELTA, "rdp"))
    assert sites["site-1"]["epsilon"] == pytest.approx(accounting.epsilon([(SIGMA, Q, STEPS)] * 5, DELTA, "rdp"))

    write_privacy_report(tmp_path, data)
    markdown = (tmp_path / "privacy_report.md").read_text()
    assert f"| {LOST} |" in markdown and f"| {TWICE} |" in markdown
    assert "Rounds 4: no reply arrived and none came after it" in markdown


def test_a_run_without_lost_replies_or_resumes_has_no_notes():
    privacy = {r: {"site-0": reply(r)} for r in (1, 2, 3)}
    rounds = {r: {"site-0": {"train_status": "ok"}} for r in privacy}
    site = privacy_report_data(privacy, rounds, "run-1", True)["sites"]["site-0"]
    assert [row["round"] for row in site["rounds"]] == [1, 2, 3]
    assert not any("note" in row for row in site["rounds"]) and site["unseen_rounds"] == []


def test_a_lost_first_reply_is_named_from_the_rounds_the_site_says_this_run_charged():
    # The ledger held one event of an earlier run; this run's round 1 was recorded, its reply lost.
    privacy = {2: {"site-0": reply(3, run_rounds=[0, 1, 2])}, 3: {"site-0": reply(4, run_rounds=[0, 1, 2, 3])}}
    rounds = {1: {"site-0": {"train_status": "failed"}}} | {r: {"site-0": {"train_status": "ok"}} for r in privacy}
    site = privacy_report_data(privacy, rounds, "run-2", True)["sites"]["site-0"]
    assert [(row["round"], row.get("note")) for row in site["rounds"]] == [(1, LOST), (2, None), (3, None)]
    assert site["rounds"][0]["epsilon"] == pytest.approx(accounting.epsilon([(SIGMA, Q, STEPS)] * 2, DELTA, "rdp"))


def site_train(data, state, run_id: int) -> Message:
    """Round 1 of run `run_id` at one real site, through the ClientApp and its egress log."""
    content = RecordDict({"arrays": ArrayRecord(build_model(CONFIG).state_dict()),
                          "config": ConfigRecord({"server-round": 1})})
    metadata = Metadata(run_id=run_id, message_id=f"t{run_id}", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=600.0, message_type="train")
    context = Context(run_id=run_id, node_id=5, state=RecordDict(),
                      run_config={"num-server-rounds": 2, "batch-size": 16, "target-epsilon": 4.0},
                      node_config={"site-name": "north", "data-path": str(data), "state-path": str(state),
                                   "budget-epsilon": 50.0})
    return client_app(Message(content, metadata=metadata), context)


def test_a_train_reply_names_the_rounds_of_its_own_run_and_passes_the_egress_audit(demo_site, tmp_path):
    site_train(demo_site, tmp_path / "state", run_id=21)
    second = site_train(demo_site, tmp_path / "state", run_id=22)
    assert list(second.content["privacy"]["history-run-round"]) == [0, 1]  # run 21's round, then its own
    assert audit(tmp_path / "state" / "egress.jsonl", ModelShapes()).clean
