"""README "Your own data", followed on real scanner files: two sites built from pydicom's bundled
DICOM (CT, CR and MR from several studies, plus one truncated file), each with a hand-written
labels.csv keyed by SOPInstanceUID, checked with `fedcare check-site` and run with
`fedcare run --site NAME=PATH`, the real flwr CLI underneath.

One federation serves every test here, 2 sites and 1 round. The second site's state holds a
directory where its ledger's head file belongs, so its training fails at the site with an error
that is none of fedcare's own (IsADirectoryError, whose text names the path): the run must say so in
its exit status and its summary, and nothing of the error but its kind may reach the reports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STUDIES = Path(get_testdata_file("dicomdirtests/DICOMDIR")).parent  # DICOMDIR's own folder
SITES = {"north": ("98892001", "77654033"), "south": ("98892003",)}


def fedcare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcare_ops", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def own_site(folder: Path, studies: tuple[str, ...], corrupt: bool = False) -> Path:
    """A site folder as an archive export gives it, and the labels.csv a person would write for it."""
    for study in studies:
        shutil.copytree(STUDIES / study, folder / study)
    if corrupt:
        shutil.copyfile(get_testdata_file("MR_truncated.dcm"), folder / "broken.dcm")
    uids = sorted(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                  for path in folder.rglob("*") if path.is_file())
    # As the README's trial: three patients in all, so each image is named its own pseudonymous patient.
    (folder / "labels.csv").write_text("SOPInstanceUID,label,trial_patient\n"
                                       + "".join(f"{uid},{i % 2},T{i}\n" for i, uid in enumerate(uids)))
    (folder / "site.toml").write_text('budget-epsilon = 8.0\npatient-key = "trial_patient"\n')
    return folder


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    base = tmp_path_factory.mktemp("own-data")
    folders = {name: own_site(base / name, studies, corrupt=name == "north") for name, studies in SITES.items()}
    preset = base / "own.toml"
    preset.write_text(
        'num-server-rounds = 1\nimage-size = 32\nwindow = "minmax"\nbatch-size = 8\nmin-sites = 1\n'
        f'sites-dir = "{base / "state"}"\noutputs-dir = "{base / "out"}"\n'
    )
    (base / "state" / "south" / "ledger.jsonl").mkdir(parents=True)  # the failure planted at one site
    check = fedcare("check-site", str(folders["north"]), "--config", str(preset), "--json")
    run = fedcare("run", "--config", str(preset), *(f"--site={name}={folder}" for name, folder in folders.items()))
    return base, check, run


def test_check_site_reports_the_corrupt_file_and_its_row_without_blocking(federation):
    _, check, _ = federation
    report = json.loads(check.stdout)
    assert check.returncode == 0 and report["ready"] is True, report["problems"]
    assert [row["path"] for row in report["unreadable"]] == ["broken.dcm"]
    assert len(report["missing_labels"]) == 1
    assert any("fix those files" in w and "drop their rows" in w for w in report["warnings"])


def test_the_run_over_own_folders_trains_and_names_the_sites(federation):
    base, _, run = federation
    metrics = json.loads((base / "out" / "latest" / "metrics.json").read_text())
    [only] = metrics["rounds"]
    assert sorted(only["sites"]) == ["north", "south"]
    assert only["sites"]["north"]["train_status"] == "ok"
    assert only["sites"]["north"]["evaluate_status"] == "ok" and only["sites"]["south"]["evaluate_status"] == "ok"
    assert (base / "state" / "north" / "ledger.jsonl").is_file()


def test_a_site_that_failed_every_round_fails_the_run_and_is_named(federation):
    base, _, run = federation
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "south failed every round (the site's training failed: IsADirectoryError" in last
    summary = (base / "out" / "latest" / "summary.md").read_text()
    assert "FAILED EVERY ROUND: south (the site's training failed: IsADirectoryError" in summary


def test_nothing_of_the_sites_error_but_its_kind_reaches_the_reports(federation):
    base, _, run = federation
    summary = (base / "out" / "latest" / "summary.md").read_text()
    document = json.loads((base / "out" / "latest" / "metrics.json").read_text())
    from_sites = json.dumps({key: value for key, value in document.items() if key != "config"})
    # The summary's egress-audit lines point at each site's own audit file, on the coordinator.
    reported = summary.split("## Egress audits")[0]
    for text in (reported, from_sites):
        for leak in ("Traceback", "Errno", str(base / "state"), "ledger.jsonl", "\x1b["):
            assert leak not in text
