"""A decode cache that cannot be written only makes a site slower: its evaluation still answers.

The disk refuses the cache's writes for real: a file-size limit on this process (the kernel fails
every write past it with EFBIG, as a full disk fails them with ENOSPC) or a cache path that is a file.
"""

import resource
import signal
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client_app.app import evaluate_global
from fedcare.config import RunConfig
from fedcare.model import build_model

# Above every small file an evaluation writes (egress line, split, index), below one batch of decoded images.
WRITE_LIMIT = 100_000


@pytest.fixture(scope="module")
def data(demo_site: Path) -> Path:
    return demo_site


def evaluate(data: Path, state: Path, **node) -> Message:
    content = RecordDict({"arrays": ArrayRecord(build_model(RunConfig()).state_dict()),
                          "config": ConfigRecord({"server-round": 1})})
    metadata = Metadata(run_id=12, message_id="e1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=600.0, message_type="evaluate")
    context = Context(run_id=12, node_id=5, state=RecordDict(), run_config={"batch-size": 16},
                      node_config={"site-name": "north", "data-path": str(data), "state-path": str(state),
                                   "budget-epsilon": 8.0, **node})
    return evaluate_global(Message(content, metadata=metadata), context)


def cache_folder(state: Path) -> Path:
    [folder] = [path for path in state.iterdir() if (path / "CACHEDIR.TAG").is_file()]
    return folder


def test_an_evaluation_whose_cache_writes_fail_still_answers(data, tmp_path, caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (WRITE_LIMIT, hard))
    try:
        reply = evaluate(data, tmp_path / "state")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["num-examples"] > 0 and "auc" in reply.content["metrics"]
    assert "cannot be written" in caplog.text and "going on without caching" in caplog.text
    # No half-written batch is left for a later round to read.
    assert not [p.name for p in cache_folder(tmp_path / "state").iterdir() if p.name.startswith((".", "batch-"))]

    # With room again the same site caches as before.
    again = evaluate(data, tmp_path / "state2")
    assert not again.has_error()
    assert any(p.name.startswith("batch-") for p in cache_folder(tmp_path / "state2").iterdir())


def test_a_cache_folder_that_cannot_be_made_is_skipped_with_a_warning(data, tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    (state / "blocked").write_text("a file where the cache folder would go")
    reply = evaluate(data, state, **{"cache-dir": "blocked"})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["num-examples"] > 0
    assert "going on without the decode cache" in caplog.text
