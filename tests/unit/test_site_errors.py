"""Nothing unexpected leaves a site: an error of any type becomes its kind in the reply, and the
server's summary.md and metrics.json carry that kind only; the traceback stays in the site's log.

The error is a real one: the site's state folder is a file, so the first write under it raises an
OSError whose text names the path. The reply goes through the whole ClientApp (its mods included)
and then through the real server-side log and publisher.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, RecordDict

from client_app.app import app
from fedcare.config import RunConfig
from fedcare.model import build_model
from server_app.app import publish
from server_app.checkpoint import Checkpoints
from server_app.strategies import make_strategy
from tests.unit.test_client_app import request

REASON = re.compile(r"^st-olav: the site's (training|evaluation) failed: [A-Za-z]+Error "
                    r"\(the site's own log names the file or setting\)$")


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory, demo_site: Path) -> tuple[Path, Context]:
    base = tmp_path_factory.mktemp("site-errors")
    data = demo_site
    state = base / "state"
    state.write_text("a file where the site's state folder should be\n")
    node = {"site-name": "st-olav", "data-path": str(data), "state-path": str(state), "budget-epsilon": 50.0,
            "budget-delta": 1e-3}
    run = {"num-server-rounds": 1, "batch-size": 16, "outputs-dir": str(base / "out"), "min-sites": 1}
    return base, Context(run_id=11, node_id=5, node_config=node, state=RecordDict(), run_config=run)


def leaks(text: str, *folders: Path) -> list[str]:
    found = [marker for marker in ("Traceback", "Errno", "File \"", "\x1b[") if marker in text]
    return found + [str(folder) for folder in folders if str(folder) in text]


def test_an_unexpected_error_leaves_the_site_as_its_kind_only(broken_site, caplog):
    base, context = broken_site
    data = Path(context.node_config["data-path"])  # the shared demo site, outside `base`
    sent = {kind: request(kind) for kind in ("train", "evaluate")}
    replies = {kind: app(msg, context) for kind, msg in sent.items()}
    for kind, reply in replies.items():
        assert reply.has_error(), kind
        assert REASON.match(reply.error.reason), reply.error.reason
        assert not leaks(reply.error.reason, base, data)
    # The site's own log has the whole story: the traceback and the path.
    assert "Traceback" in caplog.text and str(base / "state") in caplog.text

    config = RunConfig.from_mapping(context.run_config)
    strategy = make_strategy(config)
    for kind in ("train", "evaluate"):
        strategy.log.expect(1, kind, [sent[kind]])
        assert strategy.log.file_replies(1, kind, [replies[kind]]) == []
    checkpoints = Checkpoints(base / "out", "11")
    checkpoints.arrays = ArrayRecord(build_model(config).state_dict())
    folder = publish("11", config, strategy, checkpoints, 0, None)

    summary, document = (folder / "summary.md").read_text(), json.loads((folder / "metrics.json").read_text())
    # The config is the coordinator's own (its outputs folder); all the rest came from the sites.
    from_sites = json.dumps({key: value for key, value in document.items() if key != "config"})
    for text in (summary, from_sites):
        assert not leaks(text, base, data)
        assert "the site's training failed: " in text
    assert "FAILED EVERY ROUND: st-olav (the site's training failed: " in summary
    assert list(document["failed_every_round"]) == ["st-olav"]
    # No round completed: the folder is kept for reading, but it is not the latest run, and it names
    # no best model, since there is none.
    assert not (base / "out" / "latest").exists() and "best_model" not in summary
    assert not (folder / "best_model.pt").exists()
