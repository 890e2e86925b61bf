"""A coordinator cannot make a site build a network that fills its memory: the site's own cap decides.

Written as the coordinator would attack: the run config names MONAI's DenseNet121 with arguments
that give it 440 million parameters (1.8 GB of weights before any gradient), which a site without a
cap would allocate on its first request.
"""

from __future__ import annotations

import resource
from pathlib import Path

from client_app.app import evaluate_global, train
from fedcare.config import RunConfig
from fedcare.errors import SITE_LOG_HINT, ConfigError, NetworkTooLarge
from fedcare.model import build_model, network_parameters
from tests.unit.test_client_app import context, request

HUGE = {"model": "DenseNet121", "model-args": '{"init_features": 512, "growth_rate": 256}'}


def test_the_network_is_counted_without_being_built() -> None:
    config = RunConfig.from_mapping({"model": "densenet121"})
    assert network_parameters(config) == sum(p.numel() for p in build_model(config).parameters())
    assert network_parameters(RunConfig.from_mapping(HUGE)) == 439_801_858


def test_a_site_refuses_to_build_a_network_over_its_cap(demo_site: Path, tmp_path: Path, caplog) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for handler in (train, evaluate_global):
        reply = handler(request(handler.__name__.split("_")[0]), context(demo_site, tmp_path, run=HUGE))
        assert reply.has_error() and reply.error.reason == f"st-olav: {NetworkTooLarge.kind} ({SITE_LOG_HINT})"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500 * 1024  # nothing of 1.8 GB was built
    assert "439,801,858 parameters, over the 100,000,000 this site builds" in caplog.text


def test_a_site_that_lifts_its_cap_gets_to_the_weights(demo_site: Path, tmp_path: Path) -> None:
    small = {"model": "DenseNet121", "model-args": '{"init_features": 8, "growth_rate": 4}'}
    reply = train(request("train"), context(demo_site, tmp_path, run=small, max_model_parameters=1000))
    assert reply.error.reason == f"st-olav: {NetworkTooLarge.kind} ({SITE_LOG_HINT})"
    # Without the cap the same request gets as far as the weights (the request's are the default network's).
    reply = train(request("train"), context(demo_site, tmp_path, run=small, max_model_parameters=0))
    assert reply.error.reason == f"st-olav: {ConfigError.kind} ({SITE_LOG_HINT})"
