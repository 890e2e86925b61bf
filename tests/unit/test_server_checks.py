"""Update screening, the egress audit, FedProx's pull and checkpoints, on real Flower records."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedcare.config import RunConfig
from fedcare.egress import ModelShapes, append_entry, audit, network_spec, reply_entry
from fedcare.errors import FedcareError
from fedcare.model import build_model
from fedcare.training import make_optimizer
from server_app.checkpoint import Checkpoints
from server_app.privacy_summary import privacy_report_data
from server_app.strategies import make_strategy
from server_app.validation import screen_updates

CONFIG = RunConfig()


def global_model() -> dict[str, torch.Tensor]:
    return build_model(CONFIG).state_dict()


def reply(state: dict, metrics: dict | None = None, node: int = 1) -> Message:
    """A site's train reply as the server receives it."""
    metadata = Metadata(run_id=7, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
                          "metrics": MetricRecord(metrics or {"num-examples": 10}),
                          "site": ConfigRecord({"name": f"site-{node}"})})
    return Message(content, metadata=metadata)


def nudged(state: dict, scale: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in state.items()}


def test_screening_rejects_broken_and_outlying_updates():
    start = global_model()
    name = next(iter(start))
    nan = dict(start, **{name: torch.full_like(start[name], float("nan"))})
    wrong_shape = dict(start, **{name: torch.zeros(3, 3)})
    missing = {k: v for k, v in start.items() if k != name}
    wrong_dtype = dict(start, **{name: start[name].double()})
    sound = [reply(nudged(start, 0.01, seed)) for seed in range(3)]
    outlier = reply(nudged(start, 5.0, 9))
    replies = sound + [reply(nan), reply(wrong_shape), reply(missing), reply(wrong_dtype), outlier]

    accepted, rejected = screen_updates(replies, ArrayRecord(start), max_ratio=10.0)
    assert accepted == sound
    reasons = [reason for _, reason in rejected]
    assert "NaN" in reasons[0] and "shape" in reasons[1] and "missing" in reasons[2] and "dtype" in reasons[3]
    assert "further than the median" in reasons[4]


def test_each_configured_strategy_is_built_and_guarded():
    for name in ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"):
        strategy = make_strategy(RunConfig(strategy=name, min_sites=3))
        assert strategy.min_sites == 3 and type(strategy).__name__.lower() == f"guarded{name}"
    assert make_strategy(RunConfig(strategy="fedprox", proximal_mu=0.3)).proximal_mu == 0.3


def test_proximal_pull_keeps_local_training_closer_to_the_global_model():
    def drift(mu: float) -> float:
        model = build_model(CONFIG)
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = make_optimizer(model, CONFIG, proximal_mu=mu)
        images, labels = torch.rand(16, 1, 64, 64, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        return sum(float((p - s).norm() ** 2) for p, s in zip(model.parameters(), start)) ** 0.5

    assert drift(mu=2.0) < 0.9 * drift(mu=0.0)


def test_egress_audit_passes_real_replies_and_flags_what_must_not_leave(tmp_path):
    shapes = {"small-cnn": {k: list(v.shape) for k, v in global_model().items()}}
    clean = tmp_path / "clean" / "egress.jsonl"
    append_entry(clean, reply_entry(reply(global_model()), run_id=7, server_round=1, model="small-cnn"))
    result = audit(clean, shapes)
    assert result.clean and result.replies == {"train": 1} and result.bytes > 0

    leaky = tmp_path / "leaky" / "egress.jsonl"
    extra = dict(global_model(), **{"patient_image": torch.zeros(4, 4)})
    append_entry(leaky, reply_entry(reply(extra), run_id=7, server_round=1, model="small-cnn"))
    entry = reply_entry(reply(global_model()), run_id=7, server_round=2, model="small-cnn")
    entry["metrics"]["patient-name"] = "DOE^JANE"
    append_entry(leaky, entry)
    result = audit(leaky, shapes)
    assert not result.clean
    text = "\n".join(result.violations)
    assert "patient_image" in text and "patient-name" in text and "not numeric" in text


def test_a_3d_network_is_audited_against_its_own_shapes(tmp_path):
    three_d = RunConfig(task="segmentation", model="unet", input_mode="3d")
    unet_3d = build_model(three_d).state_dict()
    log = tmp_path / "egress.jsonl"
    append_entry(log, reply_entry(reply(unet_3d), run_id=7, server_round=1, model=network_spec(three_d)))
    assert audit(log, ModelShapes()).clean
    as_2d = tmp_path / "as-2d" / "egress.jsonl"  # the same reply audited as the 2D U-Net: every kernel is wrong
    append_entry(as_2d, reply_entry(reply(unet_3d), run_id=7, server_round=1, model="unet"))
    assert not audit(as_2d, ModelShapes()).clean


def test_checkpoint_restores_round_log_and_refuses_another_model(tmp_path):
    strategy = make_strategy(CONFIG)
    strategy.log.entry(1, "site-0").update(train_status="ok")
    checkpoints = Checkpoints(tmp_path, "5")
    checkpoints.after_round(strategy, CONFIG.to_dict())(1, ArrayRecord(global_model()))

    restored = make_strategy(CONFIG)
    arrays = Checkpoints(tmp_path, "6").restore(restored, set(global_model()), "5")
    assert restored.round_offset == 1 and restored.log.rounds == {1: {"site-0": {"train_status": "ok"}}}
    assert set(arrays.keys()) == set(global_model())
    with pytest.raises(FedcareError, match="another model"):
        Checkpoints(tmp_path, "6").restore(make_strategy(CONFIG), {"other"}, "5")
    with pytest.raises(FedcareError, match="no checkpoint of that run"):
        Checkpoints(tmp_path / "none", "6").restore(make_strategy(CONFIG), set(global_model()), "5")
    (tmp_path / "checkpoints" / "5" / "checkpoint.pt").write_bytes(b"torn")
    with pytest.raises(FedcareError, match="unreadable"):
        Checkpoints(tmp_path, "6").restore(make_strategy(CONFIG), set(global_model()), "5")
    assert json.dumps(CONFIG.to_dict())


def test_a_server_optimizer_keeps_the_models_dtypes():
    strategy = make_strategy(RunConfig(strategy="fedadam", min_sites=1))
    start = ArrayRecord(global_model())
    strategy.global_arrays = start
    strategy.current_arrays = {k: a.numpy() for k, a in start.items()}  # as FedAdam's configure_train keeps it
    arrays, _ = strategy.aggregate_train(1, [reply(nudged(global_model(), 0.01, 1))])
    assert {a.dtype for a in arrays.values()} == {a.dtype for a in start.values()}


def test_a_name_whose_replies_were_all_rejected_gets_no_row_in_the_privacy_report():
    rounds = {1: {"site-0": {"evaluate_status": "ok"}, "impostor": {"evaluate_status": "rejected"}}}
    sites = privacy_report_data({}, rounds, "run-1", True)["sites"]
    assert set(sites) == {"site-0"} and sites["site-0"]["validation_releases"] == 1


@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
def test_flowers_round_metrics_add_up_confusion_counts_and_weight_rates(name):
    """What Flower prints each round and at the end agrees with metrics.json: cells summed, AUC weighted."""
    strategy = make_strategy(RunConfig(strategy=name, min_sites=1))
    sites = [{"num-examples": 10, "auc": 0.9, "confusion-1-1": 4.0}, {"num-examples": 30, "auc": 0.5, "confusion-1-1": 7.0}]
    combined = strategy.evaluate_metrics_aggr_fn([RecordDict({"metrics": MetricRecord(s)}) for s in sites], "num-examples")
    assert combined["confusion-1-1"] == 11.0 and combined["auc"] == pytest.approx(0.6)
