"""The `jvp` meta-gradient must equal the autograd `second_order` reference, and neither may touch the
real model's batch-norm running statistics."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

from scripts.losses import soft_cross_entropy, voxel_cross_entropy
from scripts.meta_gradient import (
    Batch,
    adam_preconditioner,
    buffer_copies,
    compute_meta_gradient,
    l2rw_weights,
    meta_loss_with,
    normalise_weights,
)
from scripts.meta_net import MetaMaskNet
from scripts.trainer import label_minus_teacher_loss
from tests.conftest import tiny_unet


def _problem(norm: str, inputs=("loss",)):
    network = tiny_unet(norm).double()
    meta_network = MetaMaskNet(inputs=inputs, num_classes=3, hidden_channels=(4,)).double()
    # a non-uniform start, so that the weights depend on the loss map and the gradient is non-trivial
    torch.nn.init.normal_(meta_network.head.weight, std=0.5)
    image = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 1, 16, 16, 16))
    meta_image = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    meta_label = torch.randint(0, 3, (2, 1, 16, 16, 16))
    return network, meta_network, image, label, meta_image, meta_label


def _meta_gradient(
    mode,
    network,
    meta_network,
    image,
    label,
    meta_image,
    meta_label,
    normalisation,
    virtual_step_params=None,
    preconditioner=None,
    teacher_targets=None,
):
    logits = network(image)
    loss_map = voxel_cross_entropy(logits, label)
    meta_input = meta_network.build_input(loss_map, logits, label, image)
    # the teacher correction as MCPMTrainer sets it up: the weights scale ℓ − CE(p̂), the mean CE(p̂) is unscaled
    weighted_map, base_loss, map_function = loss_map, None, None
    if teacher_targets is not None:
        teacher_map = soft_cross_entropy(logits, teacher_targets)
        weighted_map, base_loss = loss_map - teacher_map, teacher_map.mean()
        map_function = functools.partial(label_minus_teacher_loss, voxel_cross_entropy, teacher_targets)
    result = compute_meta_gradient(
        mode=mode, network=network, loss_function=voxel_cross_entropy, batch=Batch(image, label),
        loss_map=weighted_map, meta_network=meta_network, meta_input=meta_input,
        meta_batch=Batch(meta_image, meta_label), virtual_lr=0.1, normalisation=normalisation,
        virtual_step_params=virtual_step_params, preconditioner=preconditioner, base_loss=base_loss,
        loss_map_function=map_function,
    )
    return result.meta_loss, torch.cat([g.flatten() for g in result.grads])


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("normalisation", ["sum", "class_sum", "mean", "none"])
def test_jvp_equals_second_order(norm, normalisation):
    problem = _problem(norm)
    loss_ref, grad_ref = _meta_gradient("second_order", *problem, normalisation)
    loss_jvp, grad_jvp = _meta_gradient("jvp", *problem, normalisation)
    assert grad_ref.norm() > 0
    assert torch.isclose(loss_ref, loss_jvp, rtol=1e-12)
    assert ((grad_jvp - grad_ref).norm() / grad_ref.norm()).item() < 1e-8


def _adam_stepped(network):
    """An Adam optimizer of ``network`` with state from two real steps, and its preconditioner."""
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        network(torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer, adam_preconditioner(optimizer, dict(network.named_parameters()))


def test_adam_preconditioner_is_adams_scaling():
    network = tiny_unet("instance").double()
    optimizer, scales = _adam_stepped(network)
    assert set(scales) == {name for name, _ in network.named_parameters()}
    name, param = next(iter(network.named_parameters()))
    state = optimizer.state[param]
    expected = 1 / ((state["exp_avg_sq"] / (1 - 0.999**2)).sqrt() + 1e-8)
    assert torch.allclose(scales[name], expected)
    # a parameter the optimizer never stepped keeps the plain SGD step
    assert adam_preconditioner(torch.optim.Adam(network.parameters()), dict(network.named_parameters())) == {}


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_preconditioned_jvp_equals_second_order(norm):
    problem = _problem(norm)
    _, scales = _adam_stepped(problem[0])
    _, grad_ref = _meta_gradient("second_order", *problem, "sum", preconditioner=scales)
    _, grad_jvp = _meta_gradient("jvp", *problem, "sum", preconditioner=scales)
    _, grad_sgd = _meta_gradient("jvp", *problem, "sum")
    assert ((grad_jvp - grad_ref).norm() / grad_ref.norm()).item() < 1e-8
    # the preconditioner changes the look-ahead, so the meta-gradient differs from the SGD one
    assert ((grad_jvp - grad_sgd).norm() / grad_sgd.norm()).item() > 1e-3


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_teacher_corrected_jvp_equals_second_order(norm):
    problem = _problem(norm)
    teacher = torch.softmax(torch.randn(2, 3, 16, 16, 16, dtype=torch.float64), dim=1)
    loss_ref, grad_ref = _meta_gradient("second_order", *problem, "mean", teacher_targets=teacher)
    loss_jvp, grad_jvp = _meta_gradient("jvp", *problem, "mean", teacher_targets=teacher)
    _, grad_plain = _meta_gradient("jvp", *problem, "mean")
    assert torch.isclose(loss_ref, loss_jvp, rtol=1e-12)
    assert ((grad_jvp - grad_ref).norm() / grad_ref.norm()).item() < 1e-8
    # the teacher's targets change the virtual step and what the weights trade off, so the meta-gradient
    assert ((grad_jvp - grad_plain).norm() / grad_plain.norm()).item() > 1e-3
    # and both are the meta-gradient of the objective itself: a virtual step on mean_i[w ℓ + (1 − w) CE(p̂)]
    network, meta_network, image, label, meta_image, meta_label = problem
    logits = network(image)
    loss_map = voxel_cross_entropy(logits, label)
    weights = meta_network(meta_network.build_input(loss_map, logits, label, image))
    objective = (weights * loss_map + (1 - weights) * soft_cross_entropy(logits, teacher)).mean()
    params = dict(network.named_parameters())
    grads = torch.autograd.grad(objective, list(params.values()), create_graph=True)
    virtual = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads, strict=True)}
    meta_loss = meta_loss_with(network, voxel_cross_entropy, virtual, Batch(meta_image, meta_label))
    direct = torch.cat([g.flatten() for g in torch.autograd.grad(meta_loss, list(meta_network.parameters()))])
    assert ((grad_jvp - direct).norm() / direct.norm()).item() < 1e-8


def test_jvp_equals_second_order_with_extra_inputs():
    problem = _problem("batch", inputs=("loss", "probability", "image", "label", "boundary"))
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


def test_class_sum_normalisation_keeps_every_class_share():
    weights = torch.rand(2, 4, 4, 4) + 0.01
    label = torch.randint(0, 3, (2, 1, 4, 4, 4))
    weights[label[:, 0] == 2] *= 0.01  # the meta network all but drops class 2
    coefficients = normalise_weights(weights, "class_sum", label)
    for c in range(3):
        in_class = label[:, 0] == c
        assert torch.isclose(coefficients[in_class].sum(), in_class.float().mean(), rtol=1e-5)
    # the plain sum normalisation hands class 2's share to the others
    assert normalise_weights(weights, "sum")[label[:, 0] == 2].sum() < 0.1 * (label == 2).float().mean()
    # uniform weights: the same coefficients as the plain normalisation
    uniform = torch.full_like(weights, 0.3)
    assert torch.allclose(normalise_weights(uniform, "class_sum", label), normalise_weights(uniform, "sum"))
    with pytest.raises(ValueError, match="needs the label"):
        normalise_weights(weights, "class_sum")


def test_class_sum_gradient_is_the_same_at_any_thread_count():
    """The meta-gradient goes through this normalisation's backward; at 2 x 48^3 voxels (above ATen's parallel grain
    of 32768) a multi-threaded CPU must give the one-thread result bit for bit, so that MCPM runs reproduce."""
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 48, 48, 48), generator=generator)
    weights = torch.rand(2, 48, 48, 48, generator=generator)
    sensitivity = torch.randn(2, 48, 48, 48, generator=generator)

    def gradient(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        w = weights.clone().requires_grad_()
        return torch.autograd.grad((normalise_weights(w, "class_sum", label) * sensitivity).sum(), w)[0]

    threads = torch.get_num_threads()
    try:
        serial = gradient(1)
        assert all(torch.equal(gradient(2), serial) for _ in range(5))
    finally:
        torch.set_num_threads(threads)


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


@pytest.mark.parametrize("normalisation", ["sum", "class_sum"])
def test_bfloat16_jvp_agrees_with_float32(normalisation):
    """A mixed-precision run's meta-gradient (bfloat16 autocast forward, the JVP cast wholly to bfloat16) on the
    CPU: finite, and within bfloat16's tolerance of the float32 one."""
    network, meta_network, image, label, meta_image, meta_label = _problem("batch")
    network, meta_network = network.float(), meta_network.float()
    image, meta_image = image.float(), meta_image.float()
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    results = {}
    for dtype in (None, torch.bfloat16):
        context = autocast if dtype is not None else contextlib.nullcontext
        with context():
            logits = network(image)
            loss_map = voxel_cross_entropy(logits, label)
        results[dtype] = compute_meta_gradient(
            mode="jvp", network=network, loss_function=voxel_cross_entropy, batch=Batch(image, label),
            loss_map=loss_map, meta_network=meta_network,
            meta_input=meta_network.build_input(loss_map.float(), logits.float(), label, image),
            meta_batch=Batch(meta_image, meta_label), virtual_lr=0.1, normalisation=normalisation,
            autocast=context, jvp_dtype=dtype,
        )
    reference, mixed = (torch.cat([g.flatten() for g in results[d].grads]) for d in (None, torch.bfloat16))
    assert all(g.dtype == torch.float32 for g in results[torch.bfloat16].grads) and mixed.isfinite().all()
    assert reference.norm() > 0
    assert torch.nn.functional.cosine_similarity(mixed, reference, dim=0) > 0.999
    assert ((mixed - reference).norm() / reference.norm()).item() < 0.05
    assert torch.isclose(results[torch.bfloat16].meta_loss.float(), results[None].meta_loss, rtol=0.02)
