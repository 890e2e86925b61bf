"""The operator's tooling, never imported by the apps: the `fedcare` command line, the local
simulation runner, per-site deployment (credentials, entry point, the site's app gate and the
coordinator's Fleet-only port), `check-site`'s printing and the demo data generators.

The ClientApp, the ServerApp and the library they share (`fedcare`, `data_adapters`) import nothing
from here; `tests/unit/test_layering.py` checks that.
"""
