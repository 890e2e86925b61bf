"""fedcare: code that the ServerApp, the ClientApp and the command line share.

The model factory, the run configuration, the privacy ledger and accounting, the report
writers and the `fedcare` command line live here, so neither app imports the other.
"""

__version__ = "0.1.0"
