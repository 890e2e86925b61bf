"""The real site, made faulty by partition: site-1 sends NaN weights, site-2 a wrong shape,
site-3 crashes while training; site-0 behaves."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client_app.app import evaluate_global, train as site_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = int(context.node_config["partition-id"])
    if site == 3:
        raise RuntimeError("simulated disk failure while training")
    reply = site_train(msg, context)
    if reply.has_error() or "arrays" not in reply.content:
        return reply  # the site refused or failed by itself: nothing to corrupt
    arrays = reply.content["arrays"]
    name = next(iter(arrays.keys()))
    values = arrays[name].numpy()
    if site == 1:
        arrays[name] = Array(np.full_like(values, np.nan))
    if site == 2:
        arrays[name] = Array(np.zeros(values.shape + (2,), dtype=values.dtype))
    return reply


app.evaluate()(evaluate_global)
