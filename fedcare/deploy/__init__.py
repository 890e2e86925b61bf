"""Deploying fedcare across hospitals: credentials, the container entry point, a loopback federation.

- `credentials`: the CA, the coordinator's TLS certificate and one SECP384R1 key pair per site, and
  the checks that turn a wrong or missing file into one line naming it;
- `entrypoint`: what a container (or a test) starts: the coordinator's SuperLink or a site's
  SuperNode, built from environment variables and checked before Flower sees them;
- `local`: the whole hospital path on loopback (`make deploy-local`).

Starting and stopping the Flower processes, and picking free ports, is `fedcare.processes`.
"""
