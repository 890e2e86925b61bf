"""Shared by the deployment tests: copies of the app to change, and processes a federation left behind."""

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_FILES = ("pyproject.toml", "README.md", ".gitignore", "fedcare", "client_app", "server_app", "data_adapters")


def copy_project(target: Path, old: str = "", new: str = "") -> Path:
    """A copy of the app's files (what its bundle holds, less the tests), with one edit in client_app/app.py."""
    target.mkdir(parents=True)
    for name in APP_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target / name)
    if old:
        app = target / "client_app" / "app.py"
        text = app.read_text()
        assert old in text
        app.write_text(text.replace(old, new, 1))
    return target


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment mentions `text` (our folders are unique)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if "Z" in (entry / "stat").read_text().rsplit(")", 1)[1].split()[:1]:
                continue
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob and int(entry.name) != os.getpid():
            found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found
