"""One privacy record type: the figures of one round at one site, wherever they appear.

A round's plan fixes them before training, the ledger stores them (with its chain fields), the
train reply carries them (with the round's status and the site's lifetime history), the egress
audit allows exactly them, and the server's report reads them back. Each of those is a
conversion of `PrivacyRecord`, so a field is added in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
# What one DP-SGD sample stands for: a patient (all their images, one clipped gradient per step) or one image.
PATIENT, IMAGE = "patient", "image"
PRIVACY_UNITS: tuple[str, ...] = (PATIENT, IMAGE)
DP_SGD = "dp-sgd"
# A round the site's policy let run without DP: its release is unbounded, and every report says so.
NO_DP = "none"
MECHANISMS = (DP_SGD, NO_DP)

# What a train reply's privacy record carries beside the round's figures.
STATUSES = ("ok", "budget-exhausted", "refused")
REPLY_TEXT = ("mechanism", "accountant", "delta_rule", "status", "reason")
# history-run-round: per history event, the round of this run that charged it (0: another run's).
REPLY_NUMBERS = ("epsilon_before", "epsilon_after", "history-noise-multiplier", "history-sample-rate",
                 "history-steps", "history-run-round")


@dataclass(frozen=True)
class PrivacyRecord:
    """What one training round at one site releases, in the accountant's terms."""

    mechanism: str
    privacy_unit: str       # patient | image: what epsilon protects
    population: int         # N: the site's training units (patients or images) the round sampled from
    sample_rate: float
    noise_multiplier: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float          # the site's cumulative lifetime epsilon after the round
    budget_epsilon: float   # the site's lifetime budget when the round ran

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PrivacyRecord":
        """The record's fields out of a larger mapping (a reply's privacy record, a ledger line)."""
        return cls(**{name: values[name] for name in FIELDS})

    @property
    def private(self) -> bool:
        return self.mechanism == DP_SGD

    @property
    def event(self) -> tuple[float, float, int]:
        """The accountant's view of the round: (noise multiplier, sample rate, steps)."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PrivacyRecord))
TEXT_FIELDS = ("mechanism", "privacy_unit", "accountant")
# Every field a train reply's privacy record may hold: the egress audit allows these and no other.
REPLY_FIELDS: frozenset[str] = frozenset((*FIELDS, *REPLY_TEXT, *REPLY_NUMBERS))
