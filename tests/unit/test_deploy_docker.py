"""The Dockerfile, read as hospital IT would audit it: non-root, a health check, the project's own
entry point, nothing secret copied in, CPU torch by default with a build argument for CUDA."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_runs_as_a_non_root_user():
    users = [arg for op, arg in instructions() if op == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_has_a_healthcheck_through_the_entry_point():
    checks = [arg for op, arg in instructions() if op == "HEALTHCHECK"]
    assert len(checks) == 1 and "fedcare-entrypoint" in checks[0] and "healthcheck" in checks[0]


def test_entry_point_is_the_projects_script():
    entry = [arg for op, arg in instructions() if op == "ENTRYPOINT"]
    assert entry == ['["fedcare-entrypoint"]']
    copies = [arg for op, arg in instructions() if op == "COPY"]
    assert "deploy/entrypoint.sh /usr/local/bin/fedcare-entrypoint" in copies
    assert (ROOT / "deploy" / "entrypoint.sh").stat().st_mode & 0o111


def test_no_credentials_are_copied_or_baked_in():
    secret = re.compile(r"(\.key|\.pem|\.crt|\.pub|credentials|secret|password|token|\.env\b|\s\.\s)", re.I)
    for op, arg in instructions():
        if op in ("COPY", "ADD"):
            assert not secret.search(arg + " "), arg
            assert not arg.startswith(". ") and not arg.startswith("./ ")
        if op in ("ENV", "ARG"):
            assert not re.search(r"(password|secret|token|private)", arg, re.I), arg
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in ("outputs", "**/*.key", "**/*.pem", "deploy/credentials", ".venv"):
        assert pattern in ignored


def test_cpu_torch_by_default_with_a_build_argument_for_cuda():
    args = {arg.split("=")[0]: arg for op, arg in instructions() if op == "ARG"}
    assert "/cpu" in args["TORCH_INDEX"]
    runs = " ".join(arg for op, arg in instructions() if op == "RUN")
    assert "${TORCH_INDEX}" in runs
    assert any(op == "FROM" and "slim" in arg or "PYTHON_IMAGE" in arg for op, arg in instructions())


def test_data_is_read_only_and_state_is_the_writable_volume_in_compose():
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    assert ":/data:ro" in compose and ":/state" in compose and ":/tls:ro" in compose
    assert "FEDCARE_ROLE: coordinator" in compose and compose.count("FEDCARE_ROLE: site") >= 2
