"""Checks that DP-SGD really ran on a batch, shared by the classification and segmentation DP tests: Opacus' per-sample
gradients equal each sample's own gradient, each is clipped to the norm, and the noise has sigma * C."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcare.privacy.dpsgd import PrivateTraining, RoundPlan


def assert_dp_step(private: PrivateTraining, reference: nn.Module, loss_fn: nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor, plan: RoundPlan) -> None:
    """Take one DP-SGD step on a batch of two or more samples and check it; `reference` is a fresh network."""
    assert len(targets) > 1
    reference.load_state_dict(private.model._module.state_dict())
    private.optimizer.zero_grad()
    loss_fn(private.model(inputs), targets).backward()
    params = [p for p in private.model.parameters() if p.requires_grad]

    # Opacus' per-sample gradient of sample i is the gradient of sample i's loss alone: the loss
    # couples no two samples of a batch.
    for i in (0, len(targets) - 1):
        reference.zero_grad()
        loss_fn(reference(inputs[i:i + 1]), targets[i:i + 1]).backward()
        for mine, theirs in zip(params, reference.parameters()):
            torch.testing.assert_close(mine.grad_sample[i], theirs.grad, atol=1e-5, rtol=1e-4)

    private.optimizer.step()
    per_sample = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], dim=1).norm(dim=1)
    scale = (plan.max_grad_norm / (per_sample + 1e-6)).clamp(max=1.0)
    assert ((per_sample * scale) <= plan.max_grad_norm + 1e-5).all()
    assert (per_sample > plan.max_grad_norm).any(), "clipping should bite on an untrained network"
    clipped_sum = torch.cat([torch.einsum("i,i...->...", scale, p.grad_sample).flatten() for p in params])
    summed = torch.cat([p.summed_grad.flatten() for p in params])
    assert torch.allclose(summed, clipped_sum, atol=1e-5)
    noise = torch.cat([p.grad.flatten() for p in params]) * private.optimizer.expected_batch_size - summed
    expected = plan.noise_multiplier * plan.max_grad_norm
    assert noise.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean().item()) < 0.05 * expected
