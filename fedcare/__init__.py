"""fedcare: the library both apps share, and nothing of the operator's tooling (`fedcare_ops`).

The run configuration and its task and network registries, the site's settings and privacy policy,
the readiness rules, training loops, the privacy ledger and accounting, and the report writers live
here, so neither app imports the other.
"""

__version__ = "0.1.0"
