"""App approval at a site, without a federation: the digest equals what `flwr build` produces, the
site's approve/list/revoke keep who decided what and when, the gate's decision on a bundle, the
coordinator's filing of replies by registered key, its memory of each site's privacy history, and
which paths the public Fleet port lets through."""

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.superlink.routers.control import router as control_router
from flwr.superlink.routers.fleet.router import router as fleet_router

from fedcare_ops.deploy.approvals import Approvals, app_digest
from fedcare_ops.deploy.credentials import make_site_key
from fedcare_ops.deploy.fleet_port import allowed
from fedcare_ops.deploy.gate import check_run_request, refusal
from fedcare.identities import key_fingerprint, names_by_node, record_registrations
from fedcare.errors import APP_REFUSED_CODE, FedcareError
from server_app.history_check import check_histories
from server_app.recording import RoundLog
from tests.cli_checks import one_line_error
from tests.deploy_helpers import ROOT, copy_project

FEDCARE = str(Path(sys.executable).with_name("fedcare"))
DIGEST = "ab" * 32


NODE = {"site-name": "x", "data-path": "/d", "state-path": "/s", "budget-epsilon": 8.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("apps") / "fedcare-app")  # a name `flwr build` accepts


def fedcare(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FEDCARE, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=os.environ | (env or {}))


def test_digest_is_the_hash_of_the_bundle_flwr_build_writes(project, tmp_path):
    built = subprocess.run([str(Path(sys.executable).with_name("flwr")), "build", "--app", str(project)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = tmp_path.glob("*.fab")
    digest = fedcare("app", "digest", str(project)).stdout.strip()
    assert digest == hashlib.sha256(fab.read_bytes()).hexdigest() == app_digest(project)
    assert fab.name.split(".")[-2] == digest[:8]  # <publisher>.<name>.<version>.<hash8>.fab


def test_one_changed_line_changes_the_digest(project, tmp_path):
    changed = copy_project(tmp_path / "changed", "app = ClientApp(", "app = ClientApp(  # reviewed?\n    ")
    assert app_digest(changed) != app_digest(project)


def test_the_bundle_holds_the_apps_and_their_library_only(project, tmp_path):
    """What a site approves is the code it runs: tests, tooling and docs beside it change nothing."""
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    assert {name.split("/")[0] for name in names} == {".info", "pyproject.toml", "client_app", "server_app", "fedcare",
                                                       "data_adapters"}
    beside = copy_project(tmp_path / "beside")
    for name in ("tests/test_x.py", "tests/helpers.py", "fedcare_ops/cli.py", "docs/guide.md", "configs/x.toml"):
        (beside / name).parent.mkdir(parents=True, exist_ok=True)
        (beside / name).write_text("x = 1\n")
    assert app_digest(beside) == app_digest(project)


def test_digest_of_a_folder_without_an_app_is_one_line(tmp_path):
    one_line_error(fedcare("app", "digest", str(tmp_path)), str(tmp_path / "pyproject.toml"), "not found")


def test_approve_list_revoke_keep_who_decided_what_and_when(tmp_path):
    env = {"FEDCARE_STATE": str(tmp_path)}  # as in the site's container
    done = fedcare("site", "approve", DIGEST.upper(), "--note", "v0.1 reviewed by IT and the DPO", "--by", "dpo",
                   env=env)
    assert done.returncode == 0, done.stderr
    entry = Approvals(tmp_path).entries()[DIGEST]
    assert entry["status"] == "approved" and entry["approved_by"] == "dpo" and entry["approved_at"]
    assert entry["note"] == "v0.1 reviewed by IT and the DPO" and Approvals(tmp_path).approved(DIGEST)
    listed = fedcare("site", "list", "--state", str(tmp_path), env={"COLUMNS": "250"})
    assert DIGEST in listed.stdout and "approved" in listed.stdout and "dpo" in listed.stdout

    assert fedcare("site", "revoke", DIGEST, "--by", "it", env=env).returncode == 0
    entry = Approvals(tmp_path).entries()[DIGEST]
    assert entry["status"] == "revoked" and entry["revoked_by"] == "it" and not Approvals(tmp_path).approved(DIGEST)
    Approvals(tmp_path).approve(DIGEST, "v0.1 again after the fix", by="dpo")
    assert Approvals(tmp_path).entries()[DIGEST]["history"][0]["status"] == "revoked"
    assert [p.name for p in tmp_path.iterdir()] == ["approved-apps.json"]  # no temporary file left behind


def test_bad_approval_input_is_one_line(tmp_path):
    one_line_error(fedcare("site", "approve", "not-a-digest", "--note", "x", "--state", str(tmp_path)),
                   "digest 'not-a-digest'", "fedcare app digest")
    one_line_error(fedcare("site", "revoke", DIGEST, "--state", str(tmp_path)), DIGEST, "not approved")
    one_line_error(fedcare("site", "approve", DIGEST, "--note", " ", "--state", str(tmp_path)), "--note")
    (tmp_path / "approved-apps.json").write_text("{not json")
    one_line_error(fedcare("site", "list", "--state", str(tmp_path)), str(tmp_path / "approved-apps.json"),
                   "cannot be read")


def test_the_gate_runs_only_an_approved_bundle_whose_bytes_match(tmp_path):
    approvals = Approvals(tmp_path)
    bundle = b"the bytes of a bundle"
    digest = hashlib.sha256(bundle).hexdigest()
    assert refusal(bundle, digest, approvals, {}, NODE) == (digest, f"app not approved by this site: digest {digest}")
    approvals.approve(digest, "reviewed")
    assert refusal(bundle, digest, approvals, {}, NODE) == (digest, None)
    # The SuperLink's claimed hash must be the hash of the bytes the gate got.
    assert refusal(bundle, "0" * 64, approvals, {}, {})[1].startswith("app not approved")
    assert refusal(b"other bytes", digest, approvals, {}, {})[1].startswith("app not approved")
    approvals.path.write_text("[]")  # an unreadable list approves nothing
    assert refusal(bundle, digest, approvals, {}, {})[1].startswith("app not approved")
    # The site's own policy, checked in the site's image before the bundle is installed.
    assert check_run_request({"dp": False}, NODE) == "the run asks for training without DP, and this site requires DP"
    assert check_run_request({"dp": False}, NODE | {"dp-required": False}) is None
    assert check_run_request({"target-epsilon": 9.0}, NODE | {"max-run-epsilon": 4.0}).startswith("the run asks to spend")
    assert "setting is wrong" in check_run_request({}, {"site-name": "x"})  # no budget: the kind, not the detail
    # A network larger than the site's max-model-parameters is refused before the bundle runs.
    huge = {"model": "DenseNet121", "model-args": '{"init_features": 512, "growth_rate": 256}'}
    assert check_run_request(huge, NODE).startswith("the run's network has 439,801,858 parameters, over the 100,000,000")
    assert check_run_request(huge, NODE | {"max-model-parameters": 0}) is None
    # So are samples larger than its max-sample-voxels (the run config sets image-size and patch-size).
    assert check_run_request({"image-size": 6000}, NODE).startswith("the run's samples have 36,000,000 voxels")
    assert check_run_request({"image-size": 6000}, NODE | {"max-sample-voxels": 0}) is None


def reply(node: int, claimed: str | None, error: Error | None = None) -> Message:
    metadata = Metadata(run_id=7, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="evaluate")
    if error is not None:
        return Message(error, metadata=metadata)
    return Message(RecordDict({"site": ConfigRecord({"name": claimed})}), metadata=metadata)


def test_replies_are_filed_under_the_registered_name_and_impostors_rejected():
    log = RoundLog(registry={1: "st-olav", 2: "haukeland"})
    refused = Error(code=APP_REFUSED_CODE, reason="haukeland: app not approved by this site: digest ab")
    log.file_replies(1, "evaluate", [reply(1, "haukeland"), reply(2, None, refused), reply(3, "st-olav")])
    sites = log.rounds[1]
    assert sites["st-olav"]["evaluate_status"] == "rejected"
    assert "registered as 'st-olav', claims to be 'haukeland'" in sites["st-olav"]["evaluate_error"]
    assert sites["haukeland"]["evaluate_status"] == "refused" and "not approved" in sites["haukeland"]["evaluate_error"]
    assert sites["node 3 (unregistered)"]["evaluate_status"] == "rejected"
    assert len(log.flags) == 2 and all(flag.startswith("identity: ") for flag in log.flags)


def privacy(steps: list[int]) -> dict:
    return {"history-noise-multiplier": [1.0] * len(steps), "history-sample-rate": [0.1] * len(steps),
            "history-steps": steps}


def test_a_history_that_shrinks_or_is_rewritten_is_flagged():
    known: dict = {}
    assert check_histories(known, {1: {"a": privacy([5])}, 2: {"a": privacy([5, 6])}}, "r1") == []
    assert known["a"] == [[1.0, 0.1, 5.0], [1.0, 0.1, 6.0]]
    flags = check_histories(known, {1: {"a": privacy([5]), "b": privacy([3])}}, "r2")
    assert len(flags) == 1 and flags[0].startswith("privacy history: a reported 1 round(s)") and "r2" in flags[0]
    assert len(known["a"]) == 2  # the longest history stays the yardstick
    assert check_histories(known, {1: {"a": privacy([5, 7, 8])}}, "r3")  # same length or longer, but rewritten
    assert check_histories(known, {1: {"b": {"dp": False}}}, "r4") == []  # no history, nothing to compare


@pytest.mark.parametrize("path, ok", [("/v1/fleet/pull-messages", True), ("/health", True),
                                      ("/v1/control/list-runs", False), ("/v1/control/start-run", False),
                                      ("/v1/runtime/acquire-task", False), ("/v1/fleet/../control/list-runs", False),
                                      ("/docs", False)])
def test_the_public_port_passes_only_the_fleet_api(path, ok):
    assert allowed(path) is ok


def test_the_flower_routes_the_fleet_port_relies_on_are_where_it_expects():
    # Pinned flwr 1.42: the SuperNode uses only Fleet routes, all under /v1/fleet/; control and runtime
    # routes (what a site must not reach) are elsewhere.
    assert {route.path.split("/")[2] for route in fleet_router.routes} == {"fleet"}
    assert all(route.path.startswith("/v1/control/") for route in control_router.routes)
    assert all(not allowed(route.path) for route in control_router.routes)


def test_register_records_the_node_id_of_each_key(tmp_path):
    keys = {name: make_site_key(tmp_path / name) for name in ("a", "b")}
    registry = record_registrations(tmp_path / "site-registry.json", {"a": 11, "b": 12}, keys)
    record_registrations(registry, {"b": 13}, keys)  # b's key registered again: its new node id replaces the old
    document = json.loads(registry.read_text())["sites"]
    assert document["a"]["public_key_sha256"] == key_fingerprint(keys["a"])
    assert names_by_node({"FEDCARE_SITE_REGISTRY": str(registry)}) == {11: "a", 13: "b"}
    assert names_by_node({}) is None and names_by_node({"FEDCARE_SITE_REGISTRY": str(tmp_path / "none")}) == {}
    registry.write_text("{}")
    with pytest.raises(FedcareError, match="not a site registry"):
        names_by_node({"FEDCARE_SITE_REGISTRY": str(registry)})
