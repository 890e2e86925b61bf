"""Errors a user can fix: each carries one line that names the file or setting and what to do.

The command line prints them without a traceback and exits non-zero; a site inside a run
turns them into a failed reply that names the site.
"""


class FedcareError(Exception):
    """A mistake in input or settings, explained in one line."""


class ConfigError(FedcareError):
    """A run-config or node-config key or value is wrong."""


class SiteDataError(FedcareError):
    """A site's data folder or label manifest cannot be used."""


class LedgerError(FedcareError):
    """A privacy ledger is missing, corrupted or has been tampered with."""


# A site that cannot do what the server asked replies with a Flower Error carrying this code and
# the reason "<site name>: <one line>", so the server can file the failure under the right site.
SITE_ERROR_CODE = 4101


def site_error_reason(site: str, err: Exception) -> str:
    return f"{site}: {err}"


def site_of_error(code: int, reason: str) -> str | None:
    if code != SITE_ERROR_CODE or ": " not in reason:
        return None
    return reason.split(": ", 1)[0]
