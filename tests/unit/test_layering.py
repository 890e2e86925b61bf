"""The apps and the library they share import nothing of the operator's tooling (fedcare_ops).

Checked in a fresh interpreter, so what an earlier test imported cannot hide an import here.
"""

import json
import subprocess
import sys

import pytest

APPS_AND_LIBRARY = ["client_app.app", "server_app.app", "fedcare.privacy.report", "fedcare.readiness",
                    "data_adapters.readiness", "data_adapters.dataset", "data_adapters.segmentation_volumes"]


@pytest.mark.parametrize("module", APPS_AND_LIBRARY)
def test_importing_an_app_or_the_library_pulls_in_no_operator_tooling(module):
    script = (f"import sys, json; import {module}; "
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'fedcare_ops')))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True).stdout)
    assert loaded == [], f"importing {module} imported {loaded}"


def test_the_operator_tooling_does_import_the_library():
    # The check above could pass by never loading anything: the CLI must see the library.
    script = "import sys; import fedcare_ops.cli; print('fedcare.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"
