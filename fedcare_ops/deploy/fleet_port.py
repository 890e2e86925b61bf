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

Every refused connection gets one line in the coordinator's log, with the peer's address: a
request for another path (403), and a connection whose TLS handshake failed (plain HTTP, or a
client that rejects the coordinator's certificate). The handshake is done here, not by uvicorn,
because asyncio drops a failed server handshake without a word outside its debug mode. A peer
that closes before sending anything (a port check, the healthcheck) is not logged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

FLEET_PREFIX = "/v1/fleet/"
ALLOWED_EXACT = {"/health"}
REFUSED = b"fedcare: only the Fleet API is served on this port; the control API is the coordinator operator's\n"
# Hop-by-hop headers are for one connection, not to be forwarded (RFC 9110, section 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer",
              "host", "content-length"}
HANDSHAKE_SECONDS = 30.0
log = logging.getLogger("fedcare.fleet_port")


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
            log.warning("refused %s: %s %s is not the Fleet API (403)", _peer(scope.get("client")), scope["method"],
                        scope["path"][:200])
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


def tls_front(context: ssl.SSLContext) -> type[asyncio.Protocol]:
    """A uvicorn HTTP protocol class that first does the TLS handshake with `context` itself, logging
    the peer of each failed one, then hands the encrypted connection to uvicorn's h11 protocol."""

    class TlsFront(asyncio.Protocol):
        # asyncio calls it for the raw connection, and start_tls for the decrypted one until the
        # handover: the request often arrives with the client's last handshake message, before
        # uvicorn's protocol can be told of the connection, so it is kept here and replayed.
        def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            self.loop = _loop or asyncio.get_event_loop()
            self.http = H11Protocol(config=config, server_state=server_state, app_state=app_state, _loop=self.loop)
            self.pending: list[bytes] = []
            self.eof, self.lost, self.lost_error = False, False, None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # Nothing may be read before start_tls takes over, or the ClientHello would be lost here.
            transport.pause_reading()  # type: ignore[attr-defined]
            self.task = self.loop.create_task(self._handshake(transport))

        def data_received(self, data: bytes) -> None:
            self.pending.append(data)

        def eof_received(self) -> None:
            self.eof = True

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost, self.lost_error = True, exc

        async def _handshake(self, transport: asyncio.BaseTransport) -> None:
            peer = _peer(transport.get_extra_info("peername"))
            if transport.is_closing() or self.lost:
                return
            try:
                secure = await self.loop.start_tls(transport, self, context, server_side=True,  # type: ignore
                                                   ssl_handshake_timeout=HANDSHAKE_SECONDS)
            except ConnectionResetError:
                return  # closed before or during the handshake without a word: a port check, not a refusal
            except ssl.SSLError as err:
                reason = str(err.reason or err)
                why = ("the client rejected this coordinator's certificate, most often a site with another CA"
                       if "ALERT" in reason else "the client does not speak TLS (plain HTTP, or the wrong port)")
                log.warning("refused %s: TLS handshake failed (%s): %s", peer, reason, why)
                return
            except (OSError, asyncio.TimeoutError) as err:
                log.warning("refused %s: no TLS handshake within %.0f s (%s)", peer, HANDSHAKE_SECONDS,
                            type(err).__name__)
                transport.close()
                return
            secure.set_protocol(self.http)
            self.http.connection_made(secure)  # type: ignore[arg-type]
            for data in self.pending:
                self.http.data_received(data)
            if self.eof:
                self.http.eof_received()
            if self.lost:
                self.http.connection_lost(self.lost_error)

    return TlsFront


def _peer(address: Any) -> str:
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "an unknown peer"


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
    # Warnings only: the refusals, not httpx's line per forwarded request.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s fedcare-fleet-port: %(message)s", stream=sys.stderr)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(args.certfile), str(args.keyfile))
    app = FleetOnly(f"https://{args.upstream}", args.ca)
    # The standard event loop: its start_tls never tells an app protocol of a connection whose
    # handshake failed (uvloop's does, and h11 then fails on a transport it never got).
    uvicorn.run(app, host=args.listen, port=args.port, http=tls_front(context), loop="asyncio", log_level="warning",
                lifespan="on")
    sys.exit(0)


if __name__ == "__main__":
    main()
