"""`fedcare check-site`: the readiness report on real archives, exit codes, masking, privacy estimate."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from data_adapters.dataset import split_indices
from fedcare_ops.demo_data import write_demo_sites
from data_adapters.dicom import read_site
from fedcare_ops.cli import app
from fedcare.config import load_preset
from fedcare.privacy.accounting import default_delta, epsilon, noise_multiplier_for

ROOT = Path(__file__).resolve().parents[2]
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _check(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["check-site", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _pydicom_decodes(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pydicom.dcmread(path).pixel_array
            return True
        except Exception:
            return False


def test_whole_pydicom_test_folder(tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(PYDICOM_FILES, site)
    run = subprocess.run([sys.executable, "-m", "fedcare_ops", "check-site", str(site), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "Traceback" not in run.stderr and run.returncode == 1  # no label manifest: not ready
    report = json.loads(run.stdout)
    assert {"files", "dicom_instances", "series", "images_readable", "labelled", "unreadable", "ready"} <= set(report)
    files = [p for p in site.rglob("*") if p.is_file()]
    assert report["files"] == len(files) and report["ready"] is False
    unreadable = {item["path"]: item["reason"] for item in report["unreadable"]}
    assert all(reason for reason in unreadable.values())
    assert report["files"] == report["images_readable"] + len(unreadable)  # every file: readable or a reason
    decodable = {p.relative_to(site).as_posix() for p in files if _pydicom_decodes(p)}
    assert decodable and not decodable & set(unreadable)
    assert report["images_readable"] >= len(decodable)


# 125 cases: 100 train, so 1/(10 N) is 1e-3, the largest delta the readiness rules accept.
CASES = 125
SERIES = 75  # one patient each, of one to three images (fedcare_ops.demo_data)


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_sites(tmp_path_factory.mktemp("demo") / "out", sites=1, seed=2, cases=[CASES])[0]


def test_a_ready_site_and_its_privacy_cost(demo_site: Path) -> None:
    config_path = ROOT / "configs" / "demo.toml"
    code, output = _check(str(demo_site), "--config", str(config_path), "--json")
    report = json.loads(output)
    assert code == 0 and report["ready"] is True and report["problems"] == []
    assert report["labelled"] == CASES and report["images_readable"] == CASES and report["unreadable"] == []
    assert report["series_by_modality"] == [{"modality": "CT", "manufacturer": "SIEMENS", "series": SERIES,
                                             "instances": CASES}]
    config = load_preset(config_path)
    site = read_site(demo_site)
    train = split_indices(site.labels, 0.2, 0, site.groups)[0]
    n_train = len({site.groups[i] for i in train})  # DP-SGD samples patients: N counts patients
    assert report["num_train"] == len(train) > n_train == report["num_train_patients"]
    per_epoch = math.ceil(n_train / config.batch_size)
    privacy = report["privacy"]
    assert privacy["privacy_unit"] == "patient"
    assert privacy["num_train"] == n_train and privacy["sample_rate"] == pytest.approx(1 / per_epoch)
    assert privacy["steps"] == config.num_server_rounds * config.local_epochs * per_epoch
    delta = default_delta(n_train)
    sigma = noise_multiplier_for(config.target_epsilon, delta, 1 / per_epoch, privacy["steps"], "rdp")
    assert privacy["epsilon"] == pytest.approx(epsilon([(sigma, 1 / per_epoch, privacy["steps"])], delta))
    # The demo data carries synthetic names, marked de-identified: reported, not warned about.
    assert {row["tag"] for row in report["identifying"]} == {"PatientName", "PatientID"}
    assert report["warnings"] == []


def test_identifying_tags_are_warned_about_and_masked(tmp_path: Path) -> None:
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.PatientBirthDate = "19700101"
    for i in range(3):
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        ct.save_as(tmp_path / f"ct{i}.dcm")
    (tmp_path / "labels.csv").write_text("SOPInstanceUID,label\n" + "".join(
        f"1.2.826.0.1.3680043.8.498.{i + 1},{i % 2}\n" for i in range(3)))
    secrets = [str(ct.PatientName), str(ct.PatientID), "19700101"]
    for flag in ([], ["--json"]):
        code, output = _check(str(tmp_path), *flag)
        assert code == 1  # class 1 has a single case
        assert "PatientName" in output and "PatientBirthDate" in output
        assert not [s for s in secrets if s in output], "an identifying value was printed in clear"
    report = json.loads(_check(str(tmp_path), "--json")[1])
    assert any("PatientName is filled in 3 instance(s)" in w for w in report["warnings"])
    assert any("class 1 (positive) has 1 training and 0 validation case(s)" in p for p in report["problems"])
    assert not any("delta would be" in p for p in report["problems"])  # the site's rule: 1e-5 at most


def test_labels_without_images_are_reported_and_stop_the_site_only_if_it_says_so(demo_site: Path,
                                                                                 tmp_path: Path) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_text((demo_site / "labels.csv").read_text() + "1.2.999.7,1\n")
    code, output = _check(str(demo_site), "--labels", str(manifest), "--json")
    report = json.loads(output)
    assert code == 0 and report["ready"] is True and report["missing_labels"] == [{"row": CASES + 2}]
    assert any(f"match no readable image (row {CASES + 2}): fix those files" in w and "drop their rows" in w
               for w in report["warnings"])
    strict = tmp_path / "strict.toml"  # the site's own settings say: not with a missing image
    strict.write_text('budget-epsilon = 8.0\nmissing-images = "stop"\n')
    code, output = _check(str(demo_site), "--labels", str(manifest), "--site-settings", str(strict), "--json")
    report = json.loads(output)
    assert code == 1 and any(f"(row {CASES + 2})" in p for p in report["problems"])


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert _check(str(tmp_path / "absent"))[0] == 2
    assert _check(str(tmp_path), "--input-mode", "4d")[0] == 2
    assert _check(str(tmp_path), "--labels", str(tmp_path / "none.csv"))[0] == 2


def test_table_output_for_a_3d_site(tmp_path: Path) -> None:
    shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892001", tmp_path / "site")
    series = sorted({pydicom.dcmread(p).SeriesInstanceUID for p in (tmp_path / "site").rglob("*") if p.is_file()})
    (tmp_path / "labels.csv").write_text("SeriesInstanceUID,label\n" + "".join(f"{u},{i}\n" for i, u in enumerate(series)))
    code, output = _check(str(tmp_path / "site"), "--labels", str(tmp_path / "labels.csv"), "--input-mode", "3d")
    assert code == 1 and "Site readiness" in output and "Series left out" in output
    report = json.loads(_check(str(tmp_path / "site"), "--labels", str(tmp_path / "labels.csv"),
                               "--input-mode", "3d", "--json")[1])
    assert report["labelled"] == 1 and sum(report["per_class"].values()) == 1  # CT5N; CT2N is excluded
    assert [row["path"].split("/")[0] for row in report["excluded_series"]] == ["CT2N"]
