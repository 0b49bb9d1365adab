"""The `jvp` meta-gradient must equal the autograd `second_order` reference, and neither may touch the
real model's batch-norm running statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from scripts.losses import voxel_cross_entropy
from scripts.meta_gradient import Batch, buffer_copies, compute_meta_gradient, l2rw_weights, normalise_weights
from scripts.meta_net import MetaMaskNet
from tests.conftest import tiny_unet


def _problem(norm: str, inputs=("loss",)):
    network = tiny_unet(norm).double()
    meta_network = MetaMaskNet(inputs=inputs, hidden_channels=(4,)).double()
    # a non-uniform start, so that the weights depend on the loss map and the gradient is non-trivial
    torch.nn.init.normal_(meta_network.head.weight, std=0.5)
    image = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 1, 16, 16, 16))
    meta_image = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    meta_label = torch.randint(0, 3, (2, 1, 16, 16, 16))
    return network, meta_network, image, label, meta_image, meta_label


def _meta_gradient(
    mode, network, meta_network, image, label, meta_image, meta_label, normalisation, virtual_step_params=None
):
    logits = network(image)
    loss_map = voxel_cross_entropy(logits, label)
    meta_input = meta_network.build_input(loss_map, logits, label, image)
    result = compute_meta_gradient(
        mode=mode, network=network, loss_function=voxel_cross_entropy, batch=Batch(image, label), loss_map=loss_map,
        meta_network=meta_network, meta_input=meta_input, meta_batch=Batch(meta_image, meta_label), virtual_lr=0.1,
        normalisation=normalisation, virtual_step_params=virtual_step_params,
    )
    return result.meta_loss, torch.cat([g.flatten() for g in result.grads])


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("normalisation", ["sum", "mean", "none"])
def test_jvp_equals_second_order(norm, normalisation):
    problem = _problem(norm)
    loss_ref, grad_ref = _meta_gradient("second_order", *problem, normalisation)
    loss_jvp, grad_jvp = _meta_gradient("jvp", *problem, normalisation)
    assert grad_ref.norm() > 0
    assert torch.isclose(loss_ref, loss_jvp, rtol=1e-12)
    assert ((grad_jvp - grad_ref).norm() / grad_ref.norm()).item() < 1e-8


def test_jvp_equals_second_order_with_extra_inputs():
    problem = _problem("batch", inputs=("loss", "probability", "image"))
    _, grad_ref = _meta_gradient("second_order", *problem, "sum")
    _, grad_jvp = _meta_gradient("jvp", *problem, "sum")
    assert ((grad_jvp - grad_ref).norm() / grad_ref.norm()).item() < 1e-8


@pytest.mark.parametrize("mode", ["jvp", "second_order"])
def test_meta_gradient_leaves_running_stats_and_parameters(mode):
    network, meta_network, image, label, meta_image, meta_label = _problem("batch")
    logits = network(image)  # the real forward: the only one allowed to move the running statistics
    state = copy.deepcopy(network.state_dict())
    loss_map = voxel_cross_entropy(logits, label)
    meta_input = meta_network.build_input(loss_map, logits, label, image)
    compute_meta_gradient(
        mode=mode, network=network, loss_function=voxel_cross_entropy, batch=Batch(image, label), loss_map=loss_map,
        meta_network=meta_network, meta_input=meta_input, meta_batch=Batch(meta_image, meta_label), virtual_lr=0.1,
    )
    for name, value in network.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in network.parameters())


def test_meta_gradient_matches_finite_difference():
    """Independent of both implementations: perturb φ along the gradient and watch L_meta(θ̂(φ))."""
    network, meta_network, image, label, meta_image, meta_label = _problem("instance")
    meta_loss, grad = _meta_gradient("jvp", network, meta_network, image, label, meta_image, meta_label, "sum")
    direction = grad / grad.norm()
    eps = 1e-6

    def meta_loss_at(offset: float) -> torch.Tensor:
        shifted = copy.deepcopy(meta_network)
        with torch.no_grad():
            vector = torch.nn.utils.parameters_to_vector(meta_network.parameters()) + offset * direction
            torch.nn.utils.vector_to_parameters(vector, shifted.parameters())
        return _meta_gradient("jvp", network, shifted, image, label, meta_image, meta_label, "sum")[0]

    numeric = (meta_loss_at(eps) - meta_loss_at(-eps)) / (2 * eps)
    assert torch.isclose(numeric, grad.norm(), rtol=1e-4)


def test_normalise_weights():
    w = torch.rand(2, 4, 4, 4) + 0.1
    assert torch.isclose(normalise_weights(w, "sum").sum(), torch.tensor(1.0))
    assert torch.isclose(normalise_weights(w, "mean").sum(), w.mean())
    assert torch.equal(normalise_weights(w, "none"), w)
    with pytest.raises(ValueError, match="weight normalisation"):
        normalise_weights(w, "median")


def test_unknown_mode_is_rejected():
    problem = _problem("batch")
    with pytest.raises(ValueError, match="second_order"):
        _meta_gradient("hessian", *problem, "sum")


def test_late_layers_virtual_step_is_exact_for_its_own_objective():
    problem = _problem("batch")
    _, grad_ref = _meta_gradient("second_order", *problem, "sum", virtual_step_params=["model.2"])
    _, grad_jvp = _meta_gradient("jvp", *problem, "sum", virtual_step_params=["model.2"])
    _, grad_full = _meta_gradient("jvp", *problem, "sum")
    assert ((grad_jvp - grad_ref).norm() / grad_ref.norm()).item() < 1e-8
    assert not torch.allclose(grad_jvp, grad_full)  # an approximation of MCPM, not MCPM


def test_unknown_virtual_step_params_are_rejected():
    with pytest.raises(ValueError, match="model.9"):
        _meta_gradient("jvp", *_problem("batch"), "sum", virtual_step_params=["model.9"])


def test_l2rw_weights_are_the_negative_meta_gradient_of_the_loss_coefficients():
    """Ren et al.'s definition through autograd: ε = 0, θ̂ = θ − α ∇θ Σ ε_i ℓ_i, w = max(0, −∂L_meta(θ̂)/∂ε) / α."""
    network, _, image, label, meta_image, meta_label = _problem("batch")
    meta_loss, weights = l2rw_weights(network, voxel_cross_entropy, Batch(image, label), Batch(meta_image, meta_label))

    alpha = 0.1
    params = dict(network.named_parameters())
    eps = torch.zeros(label.shape[:1] + label.shape[2:], dtype=torch.float64, requires_grad=True)
    loss_map = voxel_cross_entropy(torch.func.functional_call(network, (params, buffer_copies(network)), (image,)), label)
    grads = torch.autograd.grad((eps * loss_map).sum(), list(params.values()), create_graph=True)
    virtual = {n: p - alpha * g for (n, p), g in zip(params.items(), grads, strict=True)}
    meta_logits = torch.func.functional_call(network, (virtual, buffer_copies(network)), (meta_image,))
    reference_meta_loss = voxel_cross_entropy(meta_logits, meta_label).mean()
    (d_eps,) = torch.autograd.grad(reference_meta_loss, eps)
    expected = (-d_eps / alpha).clamp_min(0)

    assert torch.isclose(meta_loss, reference_meta_loss.detach())
    assert (weights > 0).any() and (weights == 0).any()
    assert torch.allclose(weights, expected, rtol=1e-8, atol=1e-12)
