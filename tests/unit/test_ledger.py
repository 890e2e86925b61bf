"""The lifetime ledger: round trips, restarts, tamper evidence and atomic writes."""

import hashlib
import json
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta

import pytest

from fedcare.errors import LedgerBusy, LedgerError
from fedcare.privacy import accounting
from fedcare.atomic import write_atomic
from fedcare.privacy.ledger import GENESIS_HASH, Ledger
from fedcare.privacy.record import DP_SGD, NO_DP, PrivacyRecord

Q = 1 / 16


def record(ledger, run_id="run-1", round=1, sigma=1.0, steps=16, delta=1e-5, accountant="rdp", budget=8.0):
    """Append one round the way a site does: epsilon from the ledger's history plus the round."""
    spent = accounting.epsilon_after(ledger.history(), sigma, Q, steps, delta, accountant)
    return ledger.append(run_id, round, Q, sigma, steps, 1.0, delta, accountant, spent, budget)


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path / "site-a" / "ledger.jsonl")


@pytest.fixture
def three_rounds(ledger):
    for number in (1, 2, 3):
        record(ledger, round=number)
    return ledger


def lines(ledger):
    return ledger.path.read_text().splitlines(keepends=True)


def rehash(records):
    """Re-chain edited records as a forger would: our own sha256 of the canonical JSON."""
    previous = GENESIS_HASH
    for entry in records:
        entry["prev_hash"] = previous
        body = {key: value for key, value in entry.items() if key != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        entry["hash"] = previous = hashlib.sha256(canonical.encode()).hexdigest()
    return records


def rewrite_forged(ledger, records):
    rehash(records)
    ledger.path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records))
    ledger.head_path.write_text(json.dumps({"entries": len(records), "hash": records[-1]["hash"]}))


def test_a_missing_ledger_is_empty(ledger):
    assert ledger.entries() == []
    assert ledger.history() == []
    assert ledger.spent(1e-5, "rdp") == 0.0
    assert not ledger.path.parent.exists()


def test_append_and_read_back(three_rounds):
    entries = three_rounds.entries()
    assert [entry.round for entry in entries] == [1, 2, 3]
    assert [round(entry.epsilon, 2) for entry in entries] == [2.76, 3.34, 3.80]
    assert three_rounds.history() == [(1.0, Q, 16)] * 3
    assert three_rounds.spent(1e-5, "rdp") == entries[-1].epsilon
    assert three_rounds.spent(1e-5, "prv") < entries[-1].epsilon
    first = entries[0]
    assert (first.run_id, first.sample_rate, first.steps) == ("run-1", Q, 16)
    assert (first.delta, first.budget_epsilon, first.accountant) == (1e-5, 8.0, "rdp")
    assert first.prev_hash == GENESIS_HASH and entries[1].prev_hash == first.hash
    assert datetime.fromisoformat(first.time).utcoffset() == timedelta(0)
    assert json.loads(three_rounds.head_path.read_text()) == {"entries": 3, "hash": entries[-1].hash}
    for line in lines(three_rounds):
        assert list(json.loads(line)) == sorted(json.loads(line))


def test_each_entry_is_verified_with_its_own_accountant(ledger):
    record(ledger, round=1)
    prv = record(ledger, round=2, accountant="prv")
    assert ledger.entries()[-1] == prv
    assert prv.epsilon == pytest.approx(accounting.epsilon([(1.0, Q, 16)] * 2, 1e-5, "prv"))


def test_the_first_entry_fixes_delta_for_the_ledgers_lifetime(ledger):
    record(ledger, round=1, delta=1e-5)
    with pytest.raises(LedgerError, match="fixed by its first entry"):
        record(ledger, round=2, delta=1e-6)
    assert ledger.delta() == 1e-5 and len(ledger.entries()) == 1


def test_a_round_without_dp_is_recorded_as_an_unbounded_release_that_adds_no_epsilon(ledger):
    first = record(ledger, round=1)
    plain = ledger.append_record("run-1", 2, PrivacyRecord(NO_DP, "patient", 1, 1.0, 0.0, 16, 1.0, 1e-5, "rdp", first.epsilon, 8.0))
    assert not plain.private and ledger.entries()[-1] == plain
    assert ledger.history() == [(1.0, Q, 16)]
    with pytest.raises(LedgerError, match="noise_multiplier"):
        ledger.append_record("run-1", 3, PrivacyRecord(DP_SGD, "patient", 1, 1.0, 0.0, 16, 1.0, 1e-5, "rdp", first.epsilon, 8.0))


def test_a_held_ledger_refuses_another_round_until_released(ledger):
    with ledger.hold():
        record(ledger, round=1)  # the holder itself records as usual
        with pytest.raises(LedgerBusy, match="retry after its round"):
            with Ledger(ledger.path).hold():
                pass
    with Ledger(ledger.path).hold() as again:
        assert len(again.entries()) == 1


def test_spending_survives_a_restart(three_rounds):
    """A fresh process reads the ledger, checks it and appends the next round."""
    script = textwrap.dedent(
        f"""
        from fedcare.privacy import accounting
        from fedcare.privacy.ledger import Ledger
        ledger = Ledger({str(three_rounds.path)!r})
        history = ledger.history()
        spent = accounting.epsilon_after(history, 1.0, 1 / 16, 16, 1e-5, "rdp")
        ledger.append("run-2", 1, 1 / 16, 1.0, 16, 1.0, 1e-5, "rdp", spent, 8.0)
        print(len(history))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "3"
    reopened = Ledger(three_rounds.path)
    assert [entry.run_id for entry in reopened.entries()] == ["run-1"] * 3 + ["run-2"]
    assert reopened.spent(1e-5, "rdp") == pytest.approx(accounting.epsilon([(1.0, Q, 64)], 1e-5))


def test_append_refuses_an_epsilon_the_accountant_does_not_give(three_rounds):
    before = three_rounds.path.read_bytes()
    with pytest.raises(LedgerError, match="refusing to append") as error:
        three_rounds.append("run-1", 4, Q, 1.0, 16, 1.0, 1e-5, "rdp", 3.9, 8.0)
    assert str(three_rounds.path) in str(error.value)
    assert three_rounds.path.read_bytes() == before


@pytest.mark.parametrize("field, value", [("steps", 0), ("accountant", "gdp"), ("delta", 2.0), ("run_id", "")])
def test_append_refuses_impossible_rounds(ledger, field, value):
    arguments = dict(run_id="run-1", round=1, sample_rate=Q, noise_multiplier=1.0, steps=16, max_grad_norm=1.0)
    arguments.update(delta=1e-5, accountant="rdp", epsilon=2.76, budget_epsilon=8.0)
    arguments[field] = value
    with pytest.raises(LedgerError, match="refusing to append"):
        ledger.append(**arguments)
    assert not ledger.path.exists()


def test_append_records_a_round_past_the_budget(ledger):
    """Spending that happened is recorded; refusing rounds is the caller's job, before training."""
    entry = record(ledger, budget=1.0)
    assert entry.epsilon > entry.budget_epsilon
    assert ledger.entries() == [entry]


def edit_line(ledger, number, old, new):
    text = lines(ledger)
    assert old in text[number - 1]
    text[number - 1] = text[number - 1].replace(old, new)
    ledger.path.write_text("".join(text))


def edit_budget(ledger):
    """Only the hash protects the budget: it takes no part in the epsilon recomputation."""
    edit_line(ledger, 2, '"budget_epsilon":8.0', '"budget_epsilon":80.0')


def edit_steps(ledger):
    edit_line(ledger, 2, '"steps":16', '"steps":8')


def duplicate_key(ledger):
    """JSON keeps the last of two equal keys, so the hash still matches; a reader sees steps 1."""
    edit_line(ledger, 2, '{"accountant"', '{"steps":1,"accountant"')


def remove_middle_line(ledger):
    text = lines(ledger)
    ledger.path.write_text(text[0] + text[2])


def remove_last_line(ledger):
    ledger.path.write_text("".join(lines(ledger)[:-1]))


def garbage_line(ledger):
    text = lines(ledger)
    text[1] = "this is not json\n"
    ledger.path.write_text("".join(text))


def incomplete_last_line(ledger):
    text = lines(ledger)
    ledger.path.write_text("".join(text[:2]) + text[2][:40])


def unknown_key(ledger):
    text = lines(ledger)
    entry = json.loads(text[0])
    entry["note"] = "hello"
    text[0] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    ledger.path.write_text("".join(text))


def missing_key(ledger):
    text = lines(ledger)
    entry = json.loads(text[0])
    del entry["delta"]
    text[0] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    ledger.path.write_text("".join(text))


def forged_epsilon(ledger):
    """A consistent chain and head whose only lie is a lower epsilon: only recomputation sees it."""
    records = [json.loads(line) for line in lines(ledger)]
    records[1]["epsilon"] = 3.0
    rewrite_forged(ledger, records)


def forged_steps(ledger):
    """Fewer steps recorded, epsilons left alone, chain and head recomputed."""
    records = [json.loads(line) for line in lines(ledger)]
    records[0]["steps"] = 8
    rewrite_forged(ledger, records)


def delete_head(ledger):
    ledger.head_path.unlink()


def replace_head_hash(ledger):
    ledger.head_path.write_text(json.dumps({"entries": 3, "hash": "f" * 64}))


def delete_ledger(ledger):
    ledger.path.unlink()


@pytest.mark.parametrize(
    "tamper, line",
    [
        (edit_budget, 2),
        (edit_steps, 2),
        (duplicate_key, 2),
        (remove_middle_line, 2),
        (remove_last_line, 3),
        (garbage_line, 2),
        (incomplete_last_line, 3),
        (unknown_key, 1),
        (missing_key, 1),
        (forged_epsilon, 2),
        (forged_steps, 1),
        (delete_head, None),
        (replace_head_hash, 3),
        (delete_ledger, None),
    ],
)
def test_tampering_is_detected(three_rounds, tamper, line):
    tamper(three_rounds)
    def append():
        three_rounds.append("run-1", 4, Q, 1.0, 16, 1.0, 1e-5, "rdp", 4.2, 8.0)

    for read in (three_rounds.entries, three_rounds.history, append):
        with pytest.raises(LedgerError) as error:
            read()
        message = str(error.value)
        assert message.startswith(str(three_rounds.path))
        assert "\n" not in message and "restore it from backup" in message
        if line is not None:
            assert f"line {line}:" in message


def test_a_crash_between_ledger_and_head_is_repaired(three_rounds):
    old_head = three_rounds.head_path.read_text()
    entry = record(three_rounds, round=4)
    three_rounds.head_path.write_text(old_head)  # as if the process died before the head write
    assert len(Ledger(three_rounds.path).entries()) == 4
    assert json.loads(three_rounds.head_path.read_text()) == {"entries": 4, "hash": entry.hash}


def test_an_extra_line_that_breaks_the_chain_is_not_repaired(three_rounds):
    """Head repair accepts only properly chained lines: a duplicated last line is refused."""
    three_rounds.path.write_text("".join(lines(three_rounds)) + lines(three_rounds)[-1])
    with pytest.raises(LedgerError, match="line 4:"):
        three_rounds.entries()


def test_reading_does_not_modify(three_rounds):
    files = [three_rounds.path, three_rounds.head_path]
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in files]
    Ledger(three_rounds.path).entries()
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in files] == before


def test_writes_leave_no_temporary_files(three_rounds):
    names = sorted(path.name for path in three_rounds.path.parent.iterdir())
    assert names == ["ledger.head.json", "ledger.jsonl", "ledger.lock"]


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    blocker = tmp_path / "folder"
    (blocker / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        write_atomic(blocker, b"cannot replace a folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder", "report.json"]


def test_the_first_entry_fixes_the_privacy_unit(ledger):
    record(ledger, round=1)
    spent = accounting.epsilon_after(ledger.history(), 1.0, Q, 16, 1e-5, "rdp")
    with pytest.raises(LedgerError, match="accounts per patient"):
        ledger.append("run-1", 2, Q, 1.0, 16, 1.0, 1e-5, "rdp", spent, 8.0, privacy_unit="image", population=40)
