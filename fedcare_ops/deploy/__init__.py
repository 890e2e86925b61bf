"""Deploying fedcare across hospitals: credentials, the container entry point, a loopback federation.

- `credentials`: the CA, the coordinator's TLS certificate and one SECP384R1 key pair per site, and
  the checks that turn a wrong or missing file into one line naming it;
- `entrypoint`: what a container (or a test) starts: the coordinator's SuperLink and its Fleet-only
  public port, or a site's SuperNode and its gate, built from environment variables and checked
  before Flower sees them; `supervise` runs a role's processes together;
- `fleet_port`: the coordinator's public port, which passes on only the Fleet API (Flower 1.42 serves
  its control API on the SuperLink's one port, so that port stays on the operator's network);
- `approvals`, `site_cli`: the digest of an app bundle and the site's approved digests
  (`fedcare app digest`, `fedcare site approve|list|revoke`);
- `site_exec`, `gate`: the site's executor and gate, which run a ClientApp only from an approved
  bundle and write the site's egress log for every reply;
- `register`, `identities`: site keys registered with the SuperLink, and the registry binding each
  site's name to its key's node id, which the ServerApp files replies by;
- `local`: the whole hospital path on loopback (`make deploy-local`).

Starting and stopping the Flower processes, and picking free ports, is `fedcare_ops.processes`.
"""
