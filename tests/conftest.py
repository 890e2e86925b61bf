"""Fixtures shared by several test modules: the `fedcare` command line, and demo sites written once.

The shared demo sites are written once a session and made read-only, so that no test can change
what another reads; a test that changes a site's files takes its own copy (`demo_site_copy`).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from fedcare_ops.cli import main
from fedcare_ops.demo_data import write_demo_sites

ROOT = Path(__file__).resolve().parents[1]
READ_ONLY = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


@pytest.fixture
def fedcare(monkeypatch, capsys):
    """`fedcare ARGS...` -> (exit status, stdout, stderr)."""
    monkeypatch.chdir(ROOT)

    def command(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fedcare", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        out = capsys.readouterr()
        return exited.value.code, out.out, out.err

    return command


def make_read_only(folder: Path) -> None:
    """No write under `folder`: files and folders alike (pytest's clean-up copes with it)."""
    for parent, folders, files in os.walk(folder):
        for name in files:
            path = Path(parent) / name
            path.chmod(path.stat().st_mode & READ_ONLY)
    for parent, folders, files in os.walk(folder, topdown=False):
        Path(parent).chmod(Path(parent).stat().st_mode & READ_ONLY)


@pytest.fixture(scope="session")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo hospital (`site-0` of its data root: 40 cases, seed 2), read-only, shared by the session."""
    root = tmp_path_factory.mktemp("shared-demo") / "data"
    [site] = write_demo_sites(root, sites=1, seed=2, cases=[40])
    make_read_only(root)
    return site


@pytest.fixture
def demo_site_copy(demo_site: Path, tmp_path: Path) -> Path:
    """A writable copy of `demo_site` for a test that changes it, as `site-0` of its own data root."""
    copy = tmp_path / "demo-copy" / "data" / demo_site.name
    shutil.copytree(demo_site, copy, copy_function=shutil.copyfile)
    for parent, folders, _ in os.walk(copy):  # copytree copies the folders' read-only modes
        Path(parent).chmod(Path(parent).stat().st_mode | stat.S_IWUSR)
    return copy


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The deployment's module first: under `make test` it is the longest file on one worker, and two
    workers finish together only when the longest work starts first."""
    items.sort(key=lambda item: item.get_closest_marker("deployment") is None)
