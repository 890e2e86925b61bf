"""The one loopback deployment that test_deploy_local.py and test_site_gate.py both check
(tests/shared_federation.py): started at most once a session, on first use."""

from __future__ import annotations

import pytest

from tests.shared_federation import Deployment, deploy


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return deploy(tmp_path_factory.mktemp("deployment"))
