"""Patient-level DP-SGD: the unit of sampling and clipping is the patient, not the image."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from torch.utils.data import TensorDataset

from client_app.app import train
from data_adapters import StoredSplit
from fedcare_ops.demo_data import write_demo_sites
from fedcare.config import RunConfig
from fedcare.model import build_model
from fedcare.policy import SitePolicy
from fedcare.privacy.dpsgd import plan_round, private_training
from fedcare.privacy.ledger import Ledger
from fedcare.privacy.units import private_units
from fedcare.sites import Site
from server_app.recording import refusal_reason
from tests.unit.test_client_app import request

CONFIG = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, target_epsilon=6.0)


def patients_dataset() -> tuple[TensorDataset, list[str]]:
    """40 images of 12 patients holding 1 to 6 images each; image i is filled with the value i."""
    sizes = [1, 6, 2, 5, 3, 4, 1, 6, 2, 5, 3, 2]
    units = [f"patient-{p}" for p, size in enumerate(sizes) for _ in range(size)]
    images = torch.arange(len(units), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 64, 64).clone()
    return TensorDataset(images, torch.arange(len(units)) % 2), units


def test_a_step_never_holds_two_images_of_one_patient_and_each_patient_adds_at_most_c(tmp_path):
    images, units = patients_dataset()
    patients = private_units(images, units, "patient")
    assert len(patients) == 12
    site = Site("site-0", tmp_path, tmp_path, SitePolicy(budget_epsilon=50.0))
    plan = plan_round(CONFIG, site, len(patients), [], "run-1")
    assert plan.record.population == 12 and plan.record.privacy_unit == "patient"
    private = private_training(build_model(CONFIG), patients, CONFIG, plan, [])
    drawn = set()
    for batch, labels in private.loader:
        owners = [units[int(image[0, 0, 0])] for image in batch]
        assert len(owners) == len(set(owners))  # one image per patient per step
        drawn.update(int(image[0, 0, 0]) for image in batch)
        if len(labels) > 1:
            private.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(private.model(batch), labels).backward()
            params = [p for p in private.model.parameters() if p.requires_grad]
            norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], dim=1).norm(dim=1)
            clipped = norms * (plan.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            assert (clipped <= plan.max_grad_norm + 1e-5).all()  # each patient's whole contribution is bounded
            private.optimizer.step()
    assert any(units.count(units[i]) > 1 for i in drawn)  # patients with several images were drawn


def test_a_patient_is_drawn_through_a_different_image_over_time():
    images, units = patients_dataset()
    patients = private_units(images, units, "patient")
    second = next(i for i, members in enumerate(patients.members) if len(members) == 6)
    seen = {int(patients[second][0][0, 0, 0]) for _ in range(60)}
    assert len(seen) > 1 and {units[i] for i in seen} == {units[patients.members[second][0]]}


def test_the_image_unit_keeps_every_image_its_own_sample():
    images, units = patients_dataset()
    assert private_units(images, units, "image") is images


def test_the_split_never_puts_one_patient_on_both_sides(tmp_path):
    _, units = patients_dataset()
    labels = np.arange(len(units)) % 2
    train_idx, val_idx = StoredSplit(tmp_path / "split.json", 0.3)(labels, units)
    assert {units[i] for i in train_idx}.isdisjoint({units[i] for i in val_idx}) and len(val_idx) > 0
    assert "patient-" not in (tmp_path / "split.json").read_text()  # salted hashes, no identifiers


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory) -> Path:
    return write_demo_sites(tmp_path_factory.mktemp("patients") / "data", sites=1, seed=2, cases=[60])[0]


def context(data: Path, state: Path, **policy) -> Context:
    node = {"site-name": "st-olav", "data-path": str(data), "state-path": str(state), "budget-epsilon": 50.0,
            **{key.replace("_", "-"): value for key, value in policy.items()}}
    return Context(run_id=11, node_id=5, node_config=node, state=RecordDict(),
                   run_config={"num-server-rounds": 2, "batch-size": 16, "target-epsilon": 4.0})


def test_q_n_and_delta_in_the_ledger_are_per_patient(demo_site, tmp_path):
    reply = train(request("train"), context(demo_site, tmp_path))
    entry = Ledger(tmp_path / "ledger.jsonl").entries()[-1]
    sides = json.loads((tmp_path / "split.json").read_text())["sides"]
    patients_in_training = sum(side == "train" for side in sides.values())
    images_in_training = reply.content["metrics"]["num-examples"]
    assert entry.privacy_unit == "patient" and entry.population == patients_in_training < images_in_training
    assert entry.sample_rate == pytest.approx(1 / np.ceil(patients_in_training / 16))
    assert entry.delta == 1e-5 and reply.content["privacy"]["delta_rule"].endswith(
        f"N = {patients_in_training} patients at the first round")


@pytest.mark.parametrize("first, then", [("image", "patient"), ("patient", "image")])
def test_a_site_refuses_a_round_whose_unit_differs_from_its_ledgers(demo_site, tmp_path, first, then):
    assert not train(request("train", 1), context(demo_site, tmp_path, privacy_unit=first)).has_error()
    reply = train(request("train", 2), context(demo_site, tmp_path, privacy_unit=then))
    assert "arrays" not in reply.content
    assert f"ledger accounts per {first}" in refusal_reason(reply) and f"set privacy-unit back to {first}" in (
        refusal_reason(reply))
    assert [e.privacy_unit for e in Ledger(tmp_path / "ledger.jsonl").entries()] == [first]


def test_a_manifest_column_can_name_the_patients(demo_site, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(demo_site, site)
    rows = (site / "labels.csv").read_text().splitlines()
    # The site's own pseudonyms: every three rows one patient, whatever the DICOM headers say.
    (site / "labels.csv").write_text("\n".join([rows[0] + ",pseudonym"]
                                               + [f"{row},P{i // 3}" for i, row in enumerate(rows[1:])]) + "\n")
    train(request("train"), context(site, tmp_path / "state", patient_key="pseudonym"))
    entry = Ledger(tmp_path / "state" / "ledger.jsonl").entries()[-1]
    sides = json.loads((tmp_path / "state" / "split.json").read_text())["sides"]
    assert len(sides) == 20 and entry.population == sum(side == "train" for side in sides.values())
