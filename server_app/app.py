"""The ServerApp: plans the run, sends the global model to every site each round, aggregates
their updates with FedAvg, and writes the run folder (model, metrics, summary, privacy report).

The server never sees a site's data or its ledger: only weights and the numbers sites reply with.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcare.config import RunConfig
from fedcare.errors import FedcareError
from fedcare.model import build_model, check_private_trainable
from fedcare.outputs import RunFolder, metrics_document, summary_markdown
from fedcare.privacy.report import write_privacy_report
from server_app.privacy_summary import privacy_report_data
from server_app.recording import recording

app = ServerApp()
log = logging.getLogger("fedcare.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation for `num-server-rounds` and publish the run folder."""
    try:
        config = RunConfig.from_mapping(context.run_config)
        model = build_model(config)
        if config.dp:
            check_private_trainable(model)  # once, before any site spends budget on it
    except FedcareError as err:
        log.error("run stopped: %s", err)
        raise SystemExit(2) from None

    strategy = recording(FedAvg)(
        fraction_train=1.0, fraction_evaluate=1.0,
        min_train_nodes=config.min_sites, min_evaluate_nodes=config.min_sites,
        min_available_nodes=config.min_sites,
    )
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=config.num_server_rounds,
        timeout=config.round_timeout, train_config=ConfigRecord({"local-epochs": config.local_epochs}),
    )

    run_id = str(context.run_id)
    folder = RunFolder(Path(config.outputs_dir), run_id)
    torch.save(result.arrays.to_torch_state_dict(), folder.path("global_model.pt"))
    document = metrics_document(config.to_dict(), strategy.log.rounds)
    folder.write_json("metrics.json", document)
    write_privacy_report(folder.staging, privacy_report_data(strategy.log.privacy, run_id, config.dp))
    notes = [
        "Differential privacy: " + ("on (DP-SGD on every site); see privacy_report.md" if config.dp
                                    else "OFF: no formal privacy guarantee; see privacy_report.md"),
        f"Final weighted validation AUC: {document['rounds'][-1]['aggregate'].get('auc', float('nan')):.3f}"
        if document["rounds"] else "No round completed.",
    ]
    (folder.path("summary.md")).write_text(summary_markdown(document, run_id, notes))
    final = folder.publish()
    log.info("Run folder: %s (global_model.pt, metrics.json, summary.md, privacy_report.*)", final.resolve())
