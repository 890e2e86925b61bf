"""What a run prints: each Flower log line once, and the libraries' expected notices explained once.

Opacus calls `logging.basicConfig` when it is imported, which gives the root logger a plain stderr
handler. Flower's `flwr` logger has a coloured console handler of its own, logs at DEBUG and
propagates, so in every process that imports Opacus (the ServerApp's, each site's) every Flower
line was printed twice, coloured then plain, with Flower's DEBUG lines among the plain ones; the
simulation mirrors that process's output to `flwr run --stream`, which showed both.

Some library notices are expected in every round and say nothing new after the first time; each
is listed here with the reason it is expected, silenced where it is raised, and explained in one
log line per process.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

FLOWER_LOGGER_NAME = "flwr"  # flwr.common.logger.LOGGER_NAME; by name, so no Flower import is needed here


@dataclass(frozen=True)
class ExpectedNotice:
    """A library warning the project expects, what it is and why it is harmless here."""

    message: str               # the start of the warning's text, as `warnings.filterwarnings` matches it
    category: type[Warning]
    why: str


SECURE_RNG = ExpectedNotice(
    "Secure RNG turned off", UserWarning,
    "Opacus warns in every round that its secure RNG is off; expected, so said once here: secure_mode stays off because this "
    "site's DP noise and Poisson batches come from generators seeded from the site's own operating-system entropy "
    "every round (fedcare.privacy.randomness), which no coordinator can replay; the privacy report names them")
# Flower's `flwr build` (and the app approval, which hashes the same bundle) still asks pathspec for
# 'gitwildmatch' patterns; the bundle's bytes do not depend on it.
GITWILDMATCH = ExpectedNotice(
    "GitWildMatchPattern", DeprecationWarning,
    "pathspec's notice that 'gitwildmatch' patterns are deprecated comes from Flower's own `flwr build` "
    "(flwr 1.42); it changes nothing in the bundle")

_explained: set[ExpectedNotice] = set()


def one_line_per_record() -> None:
    """Let Flower's own console handler be the only one that prints a Flower record."""
    logging.getLogger(FLOWER_LOGGER_NAME).propagate = False


def silence(notice: ExpectedNotice) -> None:
    """Drop `notice` wherever this process raises it (the caller explains it with `explain_once`)."""
    warnings.filterwarnings("ignore", message=notice.message, category=notice.category)


def explain_once(notice: ExpectedNotice, log: logging.Logger) -> None:
    """One line in `log` saying what `notice` is and why it is expected; later calls say nothing."""
    if notice in _explained:
        return
    _explained.add(notice)
    # WARNING, not INFO: a site's INFO lines are not printed, and the operator should see why it is quiet.
    log.warning("%s", notice.why)
