"""Errors a user can fix: each carries one line that names the file or setting and what to do.

The command line prints them without a traceback and exits non-zero; a site inside a run logs
the line on its own machine and sends the server only its name and the kind of problem.
"""


class FedcareError(Exception):
    """A mistake in input or settings, explained in one line."""

    # What the server may learn of it: a kind, never the line itself (see site_error_reason).
    kind = "the site stopped on an error"


class ConfigError(FedcareError):
    """A run-config or node-config key or value is wrong."""

    kind = "a run-config or node-config setting is wrong"


class RunTooLarge(ConfigError):
    """The run's network or samples are larger than the site's policy lets it build or prepare."""

    kind = "the run's network or samples are larger than this site allows (its max-model-parameters, max-sample-voxels)"


class SiteDataError(FedcareError):
    """A site's data folder or label manifest cannot be used."""

    kind = "the site's data folder or label manifest cannot be used"


class SiteNotReady(SiteDataError):
    """A site's data falls below what the run needs for a meaningful, private result."""

    kind = "the site is not ready for this run (`fedcare check-site` on the site says why and what to do)"


class LedgerError(FedcareError):
    """A privacy ledger is missing, corrupted or has been tampered with."""

    kind = "the site's privacy ledger is missing, corrupted or tampered with, so it does not train"


class LedgerBusy(FedcareError):
    """Another run holds the site's ledger for a round of its own."""

    kind = "another run is training a round on the site's privacy ledger; retry after its round"


class StateError(FedcareError):
    """A site's state folder shows earlier participation but its ledger is gone."""

    kind = ("the site's state folder shows earlier rounds but no privacy ledger, so it does not train "
            "until its operator re-initialises it")


# A site that cannot do what the server asked replies with a Flower Error carrying this code and
# the reason "<site name>: <kind of problem>", so the server can file the failure under the right site.
SITE_ERROR_CODE = 4101
# The site's gate refused the run before any of its app ran (fedcare_ops/deploy/gate.py): the reason is
# "<site name>: app not approved by this site: digest <sha256>" or the site's policy refusal.
APP_REFUSED_CODE = 4102
SITE_LOG_HINT = "the site's own log names the file or setting"


STAGES = {"train": "training", "evaluate": "evaluation"}


def site_error_reason(site: str, err: BaseException, stage: str = "") -> str:
    """The failed reply's reason: the site and the kind of problem, not the one-line detail.

    The detail names the site's files and folders, and a hospital's folder or file names can hold
    a patient's name or record number, so it stays in the site's log. An error that is not one of
    fedcare's own is named by its type alone ("the site's training failed: IndexError"): its text
    and traceback can quote paths and values, so they stay in the site's log as well.
    """
    if isinstance(err, FedcareError):
        kind = err.kind
    else:
        kind = f"the site's {STAGES.get(stage, stage or 'work')} failed: {type(err).__name__}"
    return f"{site}: {kind} ({SITE_LOG_HINT})"


def site_of_error(code: int, reason: str) -> str | None:
    if code not in (SITE_ERROR_CODE, APP_REFUSED_CODE) or ": " not in reason:
        return None
    return reason.split(": ", 1)[0]
