"""The container's healthcheck: the role's port answers, and the state folder can take the next writes."""

import socket

import pytest

from fedcare_ops.deploy.approvals import Approvals
from fedcare_ops.deploy.entrypoint import app_problem, healthy, state_problem
from fedcare_ops.deploy.install import INSTALLED_MARK


@pytest.fixture
def listening():
    """A real port that accepts connections, standing where the site's runtime API would."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def test_a_site_with_a_writable_state_folder_and_its_port_up_is_healthy(tmp_path, listening):
    env = {"FEDCARE_STATE": str(tmp_path), "FEDCARE_RUNTIME_PORT": str(listening), "FEDCARE_MIN_FREE_MB": "1"}
    assert state_problem(env) is None and healthy("site", env)


def test_a_state_folder_that_cannot_be_written_is_unhealthy(tmp_path, listening, capsys):
    (tmp_path / "state").write_text("a file where the state folder should be")
    env = {"FEDCARE_STATE": str(tmp_path / "state"), "FEDCARE_RUNTIME_PORT": str(listening)}
    assert not healthy("site", env)
    error = capsys.readouterr().err
    assert error.startswith("unhealthy: ") and "not writable" in error and error.count("\n") == 1


def test_a_state_folder_without_room_to_spare_is_unhealthy(tmp_path, listening):
    env = {"FEDCARE_STATE": str(tmp_path), "FEDCARE_RUNTIME_PORT": str(listening),
           "FEDCARE_MIN_FREE_MB": str(10**12)}  # more than any disk here holds
    assert "below FEDCARE_MIN_FREE_MB" in state_problem(env)
    assert not healthy("site", env)
    assert "expected a number" in state_problem(env | {"FEDCARE_MIN_FREE_MB": "lots"})


def test_a_site_whose_approvals_or_installed_app_cannot_load_is_unhealthy(tmp_path, listening, capsys):
    env = {"FEDCARE_STATE": str(tmp_path), "FEDCARE_RUNTIME_PORT": str(listening), "FEDCARE_MIN_FREE_MB": "1"}
    digest = "a" * 64
    Approvals(tmp_path).approve(digest, "study v1", by="it")
    app = tmp_path / "flwr-home" / "apps" / "fedcare.fedcare.0.1.0.aaaaaaaa"
    (app / "client_app").mkdir(parents=True)
    (app / "pyproject.toml").write_text('[tool.flwr.app.components]\nclientapp = "client_app.app:app"\n')
    (app / INSTALLED_MARK).write_text(digest + "\n")
    (app / "client_app" / "app.py").write_text("app = None\n")
    assert app_problem(env) is None and healthy("site", env)
    (app / "client_app" / "app.py").unlink()  # an approved app that lost its ClientApp module
    assert not healthy("site", env)
    assert "has no ClientApp module" in capsys.readouterr().err
    (tmp_path / "approved-apps.json").write_text("{not json")  # approvals the site cannot read
    assert not healthy("site", env)
    error = capsys.readouterr().err
    assert "app approvals cannot be read" in error and error.count("\n") == 1
    assert healthy("coordinator", env | {"FEDCARE_PORT": str(listening)})  # a coordinator holds no approvals
