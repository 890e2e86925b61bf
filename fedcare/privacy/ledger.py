"""A site's lifetime privacy ledger: one hash-chained JSON line per training event.

The ledger lives on the site's own disk (``<site state>/ledger.jsonl``) and is the only record
of how much privacy budget the site has spent across every round of every run. A site
rebuilds its accountant from it before each round, so every read verifies it completely:
the hash chain, the sidecar head (``ledger.head.json``, which records the entry count and
the last hash so that a removed last line shows), and each entry's epsilon against a
recomputation by the accountant it names. Anything wrong raises ``LedgerError``.

Its first entry fixes delta for the ledger's lifetime: a later round at another delta is refused,
since epsilons at different deltas cannot be composed into one guarantee. A round the site's
policy let run without DP is recorded too (mechanism "none"), as an unbounded release that adds
nothing the accountant can bound. A round holds the ledger's lock from planning to recording
(`Ledger.hold`), so two runs can never both spend the same remaining budget.

The chain makes accidental corruption and naive edits evident; it is not a signature: anyone
who can write the site's disk can recompute every hash. The site's file permissions and
backups protect the ledger itself.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import numbers
import os
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fedcare.atomic import write_atomic
from fedcare.errors import LedgerBusy, LedgerError
from fedcare.privacy import accounting
from fedcare.privacy.record import DP_SGD, MECHANISMS, PATIENT, PRIVACY_UNITS, PrivacyRecord

GENESIS_HASH = "0" * 64

# Recomputed epsilons are deterministic on one machine; the tolerance only absorbs
# floating-point differences when a ledger is restored onto another machine.
EPSILON_TOLERANCE = 1e-4

_RESTORE = "restore it from backup; a site never trains on a ledger it cannot trust"


@dataclass(frozen=True)
class LedgerEntry(PrivacyRecord):
    """One training event: what the site spent and the cumulative lifetime epsilon after it."""

    run_id: str
    round: int
    time: str
    prev_hash: str
    hash: str

    def to_line(self) -> str:
        """The entry as the ledger stores it: canonical JSON and a newline."""
        return _canonical(dataclasses.asdict(self)) + "\n"


_FIELD_TYPES: dict[str, type] = typing.get_type_hints(LedgerEntry)


def _canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _digest(record: dict) -> str:
    """sha256 of the entry without its own hash; prev_hash is inside, which forms the chain."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(_canonical(body).encode("ascii")).hexdigest()


def _plain_numbers(record: dict) -> dict:
    """numpy and other numeric types as the int or float each field holds, so JSON can store them."""
    plain = dict(record)
    for name, kind in _FIELD_TYPES.items():
        value = plain[name]
        if isinstance(value, bool):
            continue
        if kind is float and isinstance(value, numbers.Real):
            plain[name] = float(value)
        elif kind is int and isinstance(value, numbers.Integral):
            plain[name] = int(value)
    return plain


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a ledger may hold")


def _type_problem(record: dict) -> str | None:
    missing = sorted(_FIELD_TYPES.keys() - record.keys())
    unknown = sorted(record.keys() - _FIELD_TYPES.keys())
    if missing or unknown:
        return f"has missing keys {missing} and unknown keys {unknown}"
    for name, kind in _FIELD_TYPES.items():
        value = record[name]
        allowed = (int, float) if kind is float else (kind,)
        if isinstance(value, bool) or not isinstance(value, allowed):
            return f"has {name}={value!r}, which is not of type {kind.__name__}"
    return None


def _value_problem(record: dict) -> str | None:
    """What makes an entry impossible for a DP-SGD round, or None."""

    def positive(name: str) -> bool:
        return record[name] > 0 and math.isfinite(record[name])

    private = record["mechanism"] == DP_SGD
    checks = [
        (record["mechanism"] in MECHANISMS, f"mechanism {record['mechanism']!r} is not one of {', '.join(MECHANISMS)}"),
        (record["privacy_unit"] in PRIVACY_UNITS, f"privacy_unit {record['privacy_unit']!r} is not patient or image"),
        (record["population"] >= 1, f"population {record['population']!r} is below 1"),
        (bool(record["run_id"]), "run_id is empty"),
        (record["round"] >= 0, f"round {record['round']} is negative"),
        (0 < record["sample_rate"] <= 1, f"sample_rate {record['sample_rate']!r} is not in (0, 1]"),
        (positive("noise_multiplier") if private else record["noise_multiplier"] == 0,
         f"noise_multiplier {record['noise_multiplier']!r} is not positive (or 0 for a round without DP)"),
        (record["steps"] >= 1, f"steps {record['steps']!r} is below 1"),
        (positive("max_grad_norm"), f"max_grad_norm {record['max_grad_norm']!r} is not positive"),
        (0 < record["delta"] < 1, f"delta {record['delta']!r} is not in (0, 1)"),
        (record["accountant"] in accounting.ACCOUNTANTS, f"accountant {record['accountant']!r} is not rdp or prv"),
        (record["epsilon"] >= 0 and math.isfinite(record["epsilon"]), f"epsilon {record['epsilon']!r} is not finite"),
        (positive("budget_epsilon"), f"budget_epsilon {record['budget_epsilon']!r} is not positive"),
    ]
    return next((problem for ok, problem in checks if not ok), None)


class Ledger:
    """The lifetime privacy ledger at ``path``, verified on every read.

    Write order is ledger first, head second, and read order is head first, ledger second,
    so a reader racing a writer can only see the ledger ahead of its head, never behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_suffix(".head.json")
        self.lock_path = self.path.with_suffix(".lock")
        self._held = False

    def _error(self, problem: str, line: int | None = None) -> LedgerError:
        where = f"{self.path}: line {line}" if line is not None else f"{self.path}"
        return LedgerError(f"{where}: {problem}; {_RESTORE}")

    def entries(self) -> list[LedgerEntry]:
        """Every entry, oldest first, after full verification; [] if no ledger exists yet."""
        head = self._read_head()
        if not self.path.exists():
            if head is not None and head["entries"] > 0:
                raise self._error(f"the ledger is missing but {self.head_path.name} records {head['entries']} entries")
            return []
        entries = self._read_chain()
        head_is_behind = self._check_head(entries, head)
        self._check_epsilons(entries)
        if head_is_behind:
            # More chained entries than the head records means a crash between writing the
            # ledger and its head. Keeping them can only over-count spending, which is safe;
            # a removed entry (the dangerous direction) still fails above.
            self._write_head(entries)
        return entries

    def history(self) -> list[tuple[float, float, int]]:
        """(noise_multiplier, sample_rate, steps) per DP-SGD entry: Opacus' accountant history."""
        return private_history(self.entries())

    def delta(self) -> float | None:
        """The delta the ledger's first entry fixed for its lifetime; None while it is empty."""
        entries = self.entries()
        return entries[0].delta if entries else None

    @property
    def initialised(self) -> bool:
        """Whether this site has a ledger (possibly still empty): its head file exists."""
        return self.head_path.is_file()

    def initialise(self) -> None:
        """Start an empty ledger, so that a later missing ledger shows as lost rather than new."""
        if self.initialised:
            # Nothing to write, so no lock to wait for: another run's round may hold it for minutes,
            # and this run's round is then refused at once as busy instead of silently waiting.
            return
        with self._locked():
            if not self.initialised and not self.path.exists():
                self._write_head([])

    @contextlib.contextmanager
    def hold(self) -> Iterator["Ledger"]:
        """Hold the ledger for one round, planning to recording; another run's round is refused meanwhile."""
        with self._locked(wait=False):
            self._held = True
            try:
                yield self
            finally:
                self._held = False

    def spent(self, delta: float, accountant: str) -> float:
        """Lifetime epsilon of the whole ledger at ``delta``; 0.0 when it is empty."""
        return accounting.epsilon(self.history(), delta, accountant)

    def append(
        self,
        run_id: str,
        round: int,
        sample_rate: float,
        noise_multiplier: float,
        steps: int,
        max_grad_norm: float,
        delta: float,
        accountant: str,
        epsilon: float,
        budget_epsilon: float,
        privacy_unit: str = PATIENT,
        population: int = 1,
    ) -> LedgerEntry:
        """Record one DP-SGD training event that has happened; returns the entry written."""
        record = PrivacyRecord(DP_SGD, privacy_unit, population, sample_rate, noise_multiplier, steps, max_grad_norm,
                               delta, accountant, epsilon, budget_epsilon)
        return self.append_record(run_id, round, record)

    def append_record(self, run_id: str, round: int, release: PrivacyRecord) -> LedgerEntry:
        """Record one training event that has happened; returns the entry written.

        ``epsilon`` must equal the accountant's recomputation over the ledger plus this event
        (accounting.epsilon_after gives it; a round without DP leaves it where it was), and
        ``delta`` the ledger's. The budget is NOT enforced here: a round that has trained has
        spent, and refusing to record it would hide that spending.
        """
        if self._held:
            return self._append(run_id, round, release)
        with self._locked():
            return self._append(run_id, round, release)

    def _append(self, run_id: str, round: int, release: PrivacyRecord) -> LedgerEntry:
        entries = self.entries()
        record = _plain_numbers(
            {
                **release.to_dict(),
                "run_id": run_id,
                "round": round,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "prev_hash": entries[-1].hash if entries else GENESIS_HASH,
                "hash": "",
            }
        )
        problem = _type_problem(record) or _value_problem(record)
        if problem:
            raise LedgerError(f"{self.path}: refusing to append this round: {problem}; the ledger is unchanged")
        if entries and record["privacy_unit"] != entries[0].privacy_unit:
            raise LedgerError(f"{self.path}: refusing to append a round per {record['privacy_unit']}: the ledger "
                              f"accounts per {entries[0].privacy_unit}; the ledger is unchanged")
        if entries and record["delta"] != entries[0].delta:
            raise LedgerError(f"{self.path}: refusing to append delta {record['delta']!r}: the ledger's delta is "
                              f"{entries[0].delta!r}, fixed by its first entry; the ledger is unchanged")
        accountant = record["accountant"]
        history = private_history(entries)
        expected = (accounting.epsilon_after(history, record["noise_multiplier"], record["sample_rate"],
                                             record["steps"], record["delta"], accountant)
                    if record["mechanism"] == DP_SGD else accounting.epsilon(history, record["delta"], accountant))
        if not math.isclose(record["epsilon"], expected, rel_tol=EPSILON_TOLERANCE):
            raise LedgerError(
                f"{self.path}: refusing to append epsilon {record['epsilon']!r}: the {accountant} accountant gives "
                f"{expected!r} for the ledger plus this round; compute it with accounting.epsilon_after"
            )
        record["hash"] = _digest(record)
        entry = LedgerEntry(**record)
        entries.append(entry)
        write_atomic(self.path, "".join(e.to_line() for e in entries).encode("ascii"))
        self._write_head(entries)
        return entry

    @contextlib.contextmanager
    def _locked(self, wait: bool = True) -> Iterator[None]:
        # Two processes appending at once would each rewrite the ledger from the same old
        # copy and one round's spending would vanish; an exclusive lock serialises them.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise LedgerBusy(f"{self.path}: another run is training a round on this ledger; "
                                 "retry after its round") from None
            yield

    def _read_head(self) -> dict | None:
        try:
            text = self.head_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            head = json.loads(text)
        except ValueError:
            head = None
        valid = (
            isinstance(head, dict)
            and head.keys() == {"entries", "hash"}
            and type(head["entries"]) is int
            and head["entries"] >= 0
            and isinstance(head["hash"], str)
        )
        if not valid:
            raise self._error(f'its head file {self.head_path.name} is not {{"entries": n, "hash": h}}')
        return head

    def _write_head(self, entries: list[LedgerEntry]) -> None:
        head = {"entries": len(entries), "hash": entries[-1].hash if entries else GENESIS_HASH}
        write_atomic(self.head_path, (_canonical(head) + "\n").encode("ascii"))

    def _read_chain(self) -> list[LedgerEntry]:
        try:
            text = self.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise self._error("is not UTF-8 text") from None
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        entries: list[LedgerEntry] = []
        for number, line in enumerate(lines, start=1):
            entry = self._parse_line(number, line)
            expected_prev = entries[-1].hash if entries else GENESIS_HASH
            if entry.prev_hash != expected_prev:
                raise self._error(
                    "does not follow the line before it (its prev_hash breaks the chain: "
                    "a line was removed or reordered)",
                    number,
                )
            entries.append(entry)
        return entries

    def _parse_line(self, number: int, line: str) -> LedgerEntry:
        try:
            record = json.loads(line, parse_constant=_reject_constant)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise self._error("is not a JSON object (an incomplete write or a manual edit)", number)
        problem = _type_problem(record)
        if problem:
            raise self._error(problem, number)
        if line != _canonical(record):
            raise self._error("is not in the canonical form the ledger writes (it was edited)", number)
        if record["hash"] != _digest(record):
            raise self._error("was edited: its content does not match its hash", number)
        problem = _value_problem(record)
        if problem:
            raise self._error(f"is impossible: {problem}", number)
        values = {name: float(record[name]) if kind is float else record[name] for name, kind in _FIELD_TYPES.items()}
        return LedgerEntry(**values)

    def _check_head(self, entries: list[LedgerEntry], head: dict | None) -> bool:
        """Raises if the head shows entries missing; True if the head is behind the ledger."""
        if head is None:
            if entries:
                raise self._error(
                    f"its head file {self.head_path.name} is missing but the ledger has {len(entries)} entries"
                )
            return False
        recorded = head["entries"]
        if recorded > len(entries):
            raise self._error(
                f"is missing: {self.head_path.name} records {recorded} entries but the ledger has {len(entries)} "
                "(the last line(s) were removed)",
                len(entries) + 1,
            )
        hash_at_head = entries[recorded - 1].hash if recorded else GENESIS_HASH
        if hash_at_head != head["hash"]:
            raise self._error(
                f"does not match the hash {self.head_path.name} records for it (the entry was replaced)",
                max(recorded, 1),
            )
        return recorded < len(entries)

    def _check_epsilons(self, entries: list[LedgerEntry]) -> None:
        history: list[tuple[float, float, int]] = []
        for number, entry in enumerate(entries, start=1):
            if entry.private:
                history.append(entry.event)
            expected = accounting.epsilon(history, entry.delta, entry.accountant)
            if not math.isclose(entry.epsilon, expected, rel_tol=EPSILON_TOLERANCE):
                raise self._error(
                    f"records epsilon {entry.epsilon!r} but the {entry.accountant} accountant gives {expected!r} "
                    "for the history up to it",
                    number,
                )


def private_history(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    """The accountant's history of the DP-SGD entries; a round without DP adds nothing it can bound."""
    return [entry.event for entry in entries if entry.private]
