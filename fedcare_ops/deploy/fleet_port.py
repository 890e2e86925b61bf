"""The coordinator's one public port (`fedcare-fleet-port`): the Fleet API the sites use, and nothing else.

Flower 1.42 serves its Fleet API (SuperNodes), Control API (`flwr run`, `flwr ls`, `flwr stop`,
`flwr supernode register`) and Runtime API (the ServerApp's executor) on ONE HTTP port, without
authentication on Control unless an OIDC plugin is configured; `--control-api-address` and
`--fleet-api-address` are deprecated there and no longer split them. So any holder of the public
`ca.crt` who can reach that port could list runs or submit an app. fedcare therefore keeps the
SuperLink itself on the coordinator's loopback (or the operator's network) and puts this TLS front
on the public port: it forwards requests under `/v1/fleet/` and `/health` to the SuperLink,
unchanged (node authentication travels in signed headers and still happens in the SuperLink), and
answers everything else with 403. Pinned to flwr >=1.42,<1.43, whose Fleet routes live under
`/v1/fleet/` (flwr/superlink/routers/fleet/router.py).
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
import uvicorn

FLEET_PREFIX = "/v1/fleet/"
ALLOWED_EXACT = {"/health"}
REFUSED = b"fedcare: only the Fleet API is served on this port; the control API is the coordinator operator's\n"
# Hop-by-hop headers are for one connection, not to be forwarded (RFC 9110, section 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer",
              "host", "content-length"}


def allowed(path: str) -> bool:
    """Whether a request path belongs to the Fleet API (or the health check)."""
    return path in ALLOWED_EXACT or (path.startswith(FLEET_PREFIX) and ".." not in path)


class FleetOnly:
    """An ASGI app forwarding Fleet requests to the SuperLink at `upstream` (https, verified by `ca`)."""

    def __init__(self, upstream: str, ca: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        # Model updates are large and rounds can be long: no read timeout beyond the SuperLink's own.
        self.client = httpx.AsyncClient(base_url=upstream, verify=context, timeout=httpx.Timeout(None, connect=10.0))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if not allowed(scope["path"]):
            await _respond(send, 403, [(b"content-type", b"text/plain")], REFUSED)
            return
        body = bytearray()
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP]
        target = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope["query_string"] else "")
        try:
            answer = await self.client.request(scope["method"], target, headers=headers, content=bytes(body))
        except httpx.HTTPError:
            await _respond(send, 502, [(b"content-type", b"text/plain")], b"fedcare: the SuperLink is not reachable\n")
            return
        # httpx decodes the body, so its content-encoding no longer applies.
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()
               if k.lower() not in HOP_BY_HOP | {"content-encoding"}]
        await _respond(send, answer.status_code, out, answer.content)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = headers + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    """`fedcare-fleet-port --listen HOST --port N --upstream HOST:PORT --certfile --keyfile --ca`."""
    parser = argparse.ArgumentParser(description="Serve only the SuperLink's Fleet API on the public port.")
    parser.add_argument("--listen", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the SuperLink (loopback)")
    parser.add_argument("--certfile", type=Path, required=True)
    parser.add_argument("--keyfile", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    args = parser.parse_args(argv)
    app = FleetOnly(f"https://{args.upstream}", args.ca)
    uvicorn.run(app, host=args.listen, port=args.port, ssl_certfile=str(args.certfile),
                ssl_keyfile=str(args.keyfile), log_level="warning", lifespan="on")
    sys.exit(0)


if __name__ == "__main__":
    main()
