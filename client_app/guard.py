"""A ClientApp mod that keeps every error inside the site: whatever raises, in a handler or in a
mod below it, the reply that leaves carries only the site's name and the kind of problem.

Flower's own answer to an exception is its type and text, and the text of an OSError or a
KeyError can quote a path or a header value; the traceback goes to the site's own log instead.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedcare.config import RunConfig
from fedcare.errors import SITE_ERROR_CODE, FedcareError, site_error_reason
from fedcare.sites import site_from_node_config

log = logging.getLogger("fedcare.site")


def site_name(context: Context) -> str:
    """The name the site reports under, as its successful replies give it; a fallback if its config is broken."""
    try:
        return site_from_node_config(context.node_config, RunConfig.from_mapping(context.run_config)).name
    except FedcareError:
        return str(context.node_config.get("site-name") or f"site-{context.node_config.get('partition-id', '?')}")


def failed_reply(msg: Message, context: Context, err: BaseException, name: str | None = None) -> Message:
    """The site's reply to a request it could not serve: the full story in its log, the kind in the reply."""
    name = name or site_name(context)
    if isinstance(err, FedcareError):
        log.error("%s: %s", name, err)
    else:
        log.error("%s: unexpected %s while serving the server's %s request", name, type(err).__name__,
                  msg.metadata.message_type, exc_info=err)
    reason = site_error_reason(name, err, msg.metadata.message_type)
    return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=msg)


def site_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The outermost mod: whatever raises below it, the server gets `failed_reply`, never the exception."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - any error at all: its text must not leave the site
        return failed_reply(msg, context, err)
