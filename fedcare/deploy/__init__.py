"""Deploying fedcare across hospitals: credentials, the container entry point, a loopback federation.

- `credentials`: the CA, the coordinator's TLS certificate and one SECP384R1 key pair per site, and
  the checks that turn a wrong or missing file into one line naming it;
- `entrypoint`: what a container (or a test) starts: the coordinator's SuperLink or a site's
  SuperNode, built from environment variables and checked before Flower sees them;
- `processes`: starting and stopping Flower processes by process group;
- `local`: the whole hospital path on loopback (`make deploy-local`).
"""

from fedcare.federation import _free_port as free_port  # one implementation of "a free loopback port"

__all__ = ["free_port"]
