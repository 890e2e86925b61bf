"""A ClientApp mod that writes every reply this site sends into the site's own egress log.

It sits between Flower and the site's handlers, so no reply can leave without its line, and the
line is on disk before Flower sends the reply. In simulation it is the only writer; in deployment
the site's gate (fedcare_ops/deploy/gate.py), outside the bundle, writes every line and this mod stands down.
"""

from __future__ import annotations

import os

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedcare.config import RunConfig
from fedcare.egress import EGRESS_BY_GATE, append_entry, network_spec, reply_entry
from fedcare.errors import FedcareError
from fedcare.sites import site_from_node_config


def egress_log(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if os.environ.get(EGRESS_BY_GATE):
        return reply  # the site's gate logs this reply; a second line would double-count it
    try:
        config = RunConfig.from_mapping(context.run_config)
        site = site_from_node_config(context.node_config, config)
    except FedcareError:
        return reply  # no state folder to write to; the handler has already answered with the error
    server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    network = network_spec(config)
    append_entry(site.state_path / "egress.jsonl", reply_entry(reply, context.run_id, server_round, network))
    return reply
