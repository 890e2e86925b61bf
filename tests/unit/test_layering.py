"""The apps and the library they share import nothing of the operator's tooling (fedcare_ops).

Checked in a fresh interpreter, so what an earlier test imported cannot hide an import here.
"""

import subprocess
import sys

APPS_AND_LIBRARY = ["client_app.app", "server_app.app", "fedcare.privacy.report", "fedcare.readiness",
                    "data_adapters.readiness", "data_adapters.dataset", "data_adapters.segmentation_volumes"]


def test_importing_the_apps_and_the_library_pulls_in_no_operator_tooling():
    # One interpreter for all of them: each import is checked the moment it is made.
    script = ("import importlib, sys, json\n"
              f"for name in {APPS_AND_LIBRARY!r}:\n"
              "    importlib.import_module(name)\n"
              "    loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'fedcare_ops')\n"
              "    if loaded:\n"
              "        print(json.dumps([name, loaded])); break\n")
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert found == "", f"importing {found} imported the operator's tooling"


def test_the_operator_tooling_does_import_the_library():
    # The check above could pass by never loading anything: the CLI must see the library.
    script = "import sys; import fedcare_ops.cli; print('fedcare.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"
