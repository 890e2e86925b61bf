"""A site installs an approved app all or nothing: a failed install leaves no half-copied app for
the next task to load, and says why in one line. Real bundles and Flower's own installer; the
disk-full case runs on a small tmpfs in a private mount namespace (root, `unshare -m`)."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_metadata_from_config

from fedcare_ops.deploy.install import INSTALLED_MARK

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: install the project's bundle under FLWR_HOME and load its ClientApp as
# the gate does, printing what happened as JSON (loading in this process would import the bundle).
INSTALL = """
import hashlib, json, sys
from pathlib import Path
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.supercore.utils import get_flwr_home
from fedcare_ops.deploy.install import AppInstallError, install_app
content = Path(sys.argv[1]).read_bytes()
digest = hashlib.sha256(content).hexdigest()
try:
    folder = install_app(content, digest, get_flwr_home())
except AppInstallError as err:
    print(json.dumps({"error": str(err), "left": sorted(p.name for p in (get_flwr_home() / "apps").iterdir())}))
    sys.exit(0)
loaded = None
if sys.argv[4] == "load":  # importing the ClientApp (torch, MONAI) takes seconds: only where it is the point
    loaded = type(get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        sys.argv[2], sys.argv[3], digest)).__name__
print(json.dumps({"folder": str(folder), "loaded": loaded}))
"""

# The gate's part: the same install for a task of run 42 at site "st-olav", as the gate makes it.
GATE = """
import hashlib, json, sys
from pathlib import Path
from flwr.supercore.utils import get_flwr_home
from fedcare_ops.deploy.gate import install_problem, site_log
site_log()
content = Path(sys.argv[1]).read_bytes()
reason = install_problem("st-olav", 42, content, hashlib.sha256(content).hexdigest())
print(json.dumps({"reason": reason, "left": sorted(p.name for p in (get_flwr_home() / "apps").iterdir())}))
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    content = build_fab_from_disk(ROOT)
    (folder / "app.fab").write_bytes(content)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    fab_id, version = get_metadata_from_config(config)
    return folder / "app.fab", fab_id, version


def install(bundle, load: bool = True) -> list[str]:
    fab, fab_id, version = bundle
    return [sys.executable, "-c", INSTALL, str(fab), fab_id, version, "load" if load else "no"]


def run_install(bundle, home: Path, load: bool = True) -> dict:
    done = subprocess.run(install(bundle, load), env=_env(home), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # after Flower's "Successfully installed" line


def test_a_half_copied_app_from_an_earlier_install_is_replaced_not_loaded(bundle, tmp_path):
    home = tmp_path / "flwr-home"
    first = run_install(bundle, home, load=False)
    folder = Path(first["folder"])
    assert (folder / INSTALLED_MARK).is_file()
    # What a crash midway through Flower's own copy leaves: the folder, a few files, no mark.
    # Flower's installer would hand this folder back as installed; the site's reinstalls it.
    shutil.rmtree(folder / "client_app")
    (folder / INSTALLED_MARK).unlink()
    again = run_install(bundle, home)
    assert again["loaded"] == "ClientApp" and (folder / "client_app" / "app.py").is_file()
    assert sorted(p.name for p in (home / "apps").iterdir()) == [folder.name]  # no staging folder left


def test_a_full_disk_midway_removes_the_partial_app_and_the_next_run_installs_afresh(bundle, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a small tmpfs in a private mount namespace")
    home = tmp_path / "flwr-home"
    apps = home / "apps"
    apps.mkdir(parents=True)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{apps}'"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")
    fab = str(bundle[0])
    install_and_load = " ".join(f"'{part}'" for part in install(bundle))
    # One namespace: a 256 KiB volume (the bundle's files need more) for the gate's install, then
    # the same volume grown, as an operator freeing space would; the mount vanishes with the namespace.
    script = (f"mount -t tmpfs -o size=256k tmpfs '{apps}' && '{sys.executable}' -c '{GATE}' '{fab}' && "
              f"mount -o remount,size=32m '{apps}' && {install_and_load}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], env=_env(home), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    failed, second = (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    # The site's log: one line with the folder, the cause and what to do, no traceback.
    [line] = [text for text in done.stderr.splitlines() if text.startswith("ERROR fedcare.gate")]
    assert line.startswith(f"ERROR fedcare.gate: st-olav: run 42: {apps}: installing approved app ")
    assert "No space left on device" in line and "free space on the state volume" in line
    assert "the partial copy is removed and the next run installs it afresh" in line
    assert "Traceback" not in done.stderr
    # The reply: the kind of problem only; the site's folders stay in its log.
    assert failed["reason"].startswith("st-olav: the site could not install the approved app")
    assert str(tmp_path) not in failed["reason"]
    assert failed["left"] == []  # nothing half-copied for the next task to load
    assert second["loaded"] == "ClientApp"


def _env(home: Path) -> dict:
    return os.environ | {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}
