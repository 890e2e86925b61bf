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
