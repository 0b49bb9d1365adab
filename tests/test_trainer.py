"""The MCPM trainer: what one iteration changes, the meta interval, warm-up, state output and resuming."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, ThreadDataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader

from scripts.losses import VoxelCrossEntropyLoss, soft_cross_entropy, voxel_cross_entropy
from scripts.meta_net import MetaMaskNet
from scripts.trainer import L2RWTrainer, MCPMTrainer
from tests.conftest import tiny_unet


def _cases(n: int, seed: int, corrupt: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(n):
        label = torch.zeros(1, 16, 16, 16)
        label[:, 4:12, 4:12, 4:12] = 1
        image = label + 0.5 * torch.randn(label.shape, generator=g)
        case = {"image": image, "label": label}
        if corrupt:
            noisy = label.clone()
            noisy[:, 2:14, 2:14, 2:14] = 1  # a dilated label: the shell is corrupted
            case.update(label=noisy, corruption_mask=(noisy != label).to(torch.uint8))
        cases.append(case)
    return cases


def make_trainer(max_epochs: int = 1, network=None, meta_network=None, num_train: int = 4, **kwargs) -> MCPMTrainer:
    network = network or tiny_unet(out_channels=2)
    meta_network = meta_network or MetaMaskNet(hidden_channels=(4,))
    return MCPMTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=DataLoader(_cases(num_train, seed=1, corrupt=True), batch_size=2, shuffle=False),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-2),
        loss_function=VoxelCrossEntropyLoss(reduction="none"),
        meta_data_loader=DataLoader(_cases(2, seed=2), batch_size=1, shuffle=False),
        meta_network=meta_network,
        meta_optimizer=torch.optim.Adam(meta_network.parameters(), 1e-2),
        **kwargs,
    )


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach().clone()


def _track(trainer: MCPMTrainer) -> list[dict]:
    """Record, after every iteration, the meta-net parameters and the output."""
    history: list[dict] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        history.append({"meta": _flat(engine.meta_network), "seg": _flat(engine.network), "output": engine.state.output})

    return history


def test_two_iterations_change_both_networks_and_weights_stay_in_unit_interval():
    trainer = make_trainer()
    seg0, meta0 = _flat(trainer.network), _flat(trainer.meta_network)
    history = _track(trainer)
    trainer.run()
    assert len(history) == 2
    for step in history:
        weights = torch.stack([o["weight"] for o in step["output"]])
        assert weights.shape == (2, 1, 16, 16, 16)
        assert ((weights > 0) & (weights < 1)).all()
        assert math.isfinite(step["output"][0]["meta_loss"])
    assert not torch.equal(history[0]["seg"], seg0) and not torch.equal(history[1]["seg"], history[0]["seg"])
    assert not torch.equal(history[0]["meta"], meta0) and not torch.equal(history[1]["meta"], history[0]["meta"])


def test_output_and_epoch_metrics_like_supervised_trainer():
    trainer = make_trainer()
    trainer.run()
    output = trainer.state.output[0]
    for key in ("image", "label", "pred", "loss", "meta_loss", "weight"):
        assert key in output
    metrics = trainer.state.metrics
    for key in ("meta_loss", "weight_mean", "weight_std", "weight_corrupted", "weight_unchanged"):
        assert key in metrics
    assert 0 < metrics["weight_corrupted"] < 1 and 0 < metrics["weight_unchanged"] < 1


@pytest.mark.parametrize("interval", [2, 3])
def test_meta_interval(interval):
    trainer = make_trainer(max_epochs=3, meta_interval=interval)
    meta0 = _flat(trainer.meta_network)
    history = _track(trainer)
    trainer.run()
    before = [meta0] + [h["meta"] for h in history[:-1]]
    changed = [not torch.equal(prev, h["meta"]) for prev, h in zip(before, history, strict=True)]
    assert changed == [i % interval == 0 for i in range(len(history))]
    # weights from the current meta net are applied on every iteration
    assert all(torch.isfinite(h["output"][0]["weight"]).all() for h in history)


def test_warmup_trains_plainly():
    trainer = make_trainer(max_epochs=2, warmup_epochs=1)
    meta0 = _flat(trainer.meta_network)
    history = _track(trainer)
    trainer.run()
    assert torch.equal(history[1]["meta"], meta0)  # epoch 1: no meta steps
    assert all(torch.equal(o["weight"], torch.ones_like(o["weight"])) for o in history[1]["output"])
    assert not torch.equal(history[3]["meta"], meta0)


def test_warmup_iteration_equals_supervised_trainer():
    """During warm-up, an MCPM iteration is exactly a plain SupervisedTrainer iteration."""
    network = tiny_unet(out_channels=2)
    reference = copy.deepcopy(network)
    make_trainer(network=network, warmup_epochs=1).run()
    SupervisedTrainer(
        device="cpu", max_epochs=1,
        train_data_loader=DataLoader(_cases(4, seed=1, corrupt=True), batch_size=2, shuffle=False),
        network=reference, optimizer=torch.optim.Adam(reference.parameters(), 1e-2),
        loss_function=VoxelCrossEntropyLoss(reduction="mean"),
    ).run()
    for (name, a), b in zip(network.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_warmup_with_the_dice_term_equals_dicece_training():
    """With ``dice_loss_weight`` 1, warm-up iterations (all weights 1) are plain training with MONAI's
    ``DiceCELoss``, the strongest simple baseline: the same loss at every iteration. (The parameters are compared
    through the losses: the biases before batch norm have no effect, and Adam turns their rounding-level gradients
    into full steps.) Training after warm-up stays finite."""
    from monai.losses import DiceCELoss

    network = tiny_unet(out_channels=2)
    reference = copy.deepcopy(network)
    trainer = make_trainer(max_epochs=2, network=network, warmup_epochs=2, dice_loss_weight=1.0)
    supervised = SupervisedTrainer(
        device="cpu", max_epochs=2,
        train_data_loader=DataLoader(_cases(4, seed=1, corrupt=True), batch_size=2, shuffle=False),
        network=reference, optimizer=torch.optim.Adam(reference.parameters(), 1e-2),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
    )
    losses: dict[str, list[float]] = {"mcpm": [], "dicece": []}
    for name, engine in (("mcpm", trainer), ("dicece", supervised)):
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e, n=name: losses[n].append(e.state.output[0]["loss"]))
        engine.run()
    assert len(losses["mcpm"]) == 4 and losses["mcpm"][-1] < losses["mcpm"][0]
    assert losses["mcpm"] == pytest.approx(losses["dicece"], rel=1e-5)
    trainer = make_trainer(max_epochs=1, dice_loss_weight=1.0, clean_loss_weight=1.0)
    trainer.run()
    assert trainer.state.metrics["skipped_steps"] == 0 and math.isfinite(trainer.state.output[0]["loss"])


def test_running_stats_change_only_in_the_real_step():
    """After one MCPM iteration the batch-norm running statistics equal those of a single real forward."""
    trainer = make_trainer(num_train=2)
    expected = copy.deepcopy(trainer.network)
    batch = next(iter(trainer.data_loader))
    expected.train()
    with torch.no_grad():
        expected(batch["image"])
    trainer.run()
    for name, value in trainer.network.named_buffers():
        assert torch.allclose(value, dict(expected.named_buffers())[name]), name


TEACHER = {"correction": "teacher", "weight_normalisation": "mean"}


@pytest.mark.parametrize("options", [{}, TEACHER], ids=["mcpm", "teacher"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, options):
    torch.manual_seed(0)
    uninterrupted = make_trainer(max_epochs=2, **options)
    state0 = (copy.deepcopy(uninterrupted.network.state_dict()), copy.deepcopy(uninterrupted.meta_network.state_dict()))
    uninterrupted.run()

    def restart(max_epochs):
        trainer = make_trainer(max_epochs=max_epochs, **options)
        trainer.network.load_state_dict(state0[0])
        trainer.meta_network.load_state_dict(state0[1])
        if trainer.teacher is not None:  # the teacher starts as the network does
            trainer.teacher.load_state_dict(state0[0])
        return trainer

    first = restart(1)
    first.run()
    path = tmp_path / "checkpoint.pt"
    objects = ("network", "meta_network", "optimizer", "meta_optimizer") + (("teacher",) if options else ())
    torch.save({**{k: getattr(first, k).state_dict() for k in objects}, "trainer": first.state_dict()}, path)

    resumed = restart(2)
    CheckpointLoader(str(path), {**{k: getattr(resumed, k) for k in objects}, "trainer": resumed})(resumed)
    resumed.run()
    assert resumed.state.epoch == 2
    for name in objects[:2] + objects[4:]:
        assert torch.equal(_flat(getattr(resumed, name)), _flat(getattr(uninterrupted, name))), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"meta_gradient": "hessian"}, "meta_gradient"),
        ({"weight_normalisation": "max"}, "weight_normalisation"),
        ({"meta_interval": 0}, "meta_interval"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"virtual_lr": 0.0}, "virtual_lr"),
        ({"virtual_step_params": ["decoder"]}, "virtual_step_params"),
        ({"correction": "ema"}, "correction"),
        ({"teacher_decay": 1.5}, "teacher_decay"),
        ({"dice_loss_weight": -1.0}, "dice_loss_weight"),
        ({"clean_loss_interval": 0}, "clean_loss_interval"),
        ({"reuse_virtual_gradient": "yes"}, "reuse_virtual_gradient must be true or false"),
        ({"reuse_virtual_gradient": True, "meta_gradient": "second_order"}, "set meta_gradient 'jvp'"),
        ({"reuse_virtual_gradient": True, "virtual_step_params": ["model.2"]}, "set virtual_step_params None"),
        ({"reuse_virtual_gradient": True, "dice_loss_weight": 1.0}, "set dice_loss_weight 0"),
        ({"correction": "teacher"}, "set weight_normalisation 'mean', got 'sum'"),
    ],
)
def test_invalid_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(**kwargs)


def test_reduced_loss_is_rejected():
    trainer = make_trainer()
    trainer.loss_function = VoxelCrossEntropyLoss(reduction="mean")
    with pytest.raises(Exception, match="reduction='none'"):
        trainer.run()


def test_empty_meta_loader_is_reported():
    trainer = make_trainer()
    trainer.meta_data_loader = []
    with pytest.raises(Exception, match="meta data loader is empty"):
        trainer.run()


@pytest.mark.parametrize("fail", [False, True])
def test_meta_loader_thread_is_joined_when_the_run_ends(fail):
    """The cycled meta set's iterator is left part-way; a ``ThreadDataLoader`` buffer thread still running at
    interpreter exit can abort a torchrun rank, so the run closes it, on success and on error alike."""
    trainer = make_trainer(max_epochs=2, warmup_epochs=0)
    trainer.meta_data_loader = ThreadDataLoader(_cases(8, seed=2), batch_size=1, shuffle=False)
    before = set(threading.enumerate())
    if fail:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda _: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            trainer.run()
    else:
        trainer.run()
    assert trainer.state.iteration == (3 if fail else 4)
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []


def _nan_batch_trainer(nan_cases: set[int], **kwargs) -> MCPMTrainer:
    trainer = make_trainer(**kwargs)
    cases = _cases(4, seed=1, corrupt=True)
    for index in nan_cases:
        cases[index]["image"] = torch.full_like(cases[index]["image"], float("nan"))
    trainer.data_loader = DataLoader(cases, batch_size=2, shuffle=False)
    return trainer


def test_nonfinite_step_is_skipped_and_undone():
    trainer = _nan_batch_trainer({2, 3}, max_epochs=1)  # the second batch is all NaN
    history = _track(trainer)
    trainer.run()
    assert torch.equal(history[1]["seg"], history[0]["seg"])  # nothing applied from the NaN batch
    assert torch.equal(history[1]["meta"], history[0]["meta"])
    assert all(torch.isfinite(b).all() for b in trainer.network.buffers())
    assert trainer.state.metrics["skipped_steps"] == 1


def test_too_many_nonfinite_steps_stop_training():
    trainer = _nan_batch_trainer({0, 1, 2, 3}, max_epochs=3, max_nonfinite_steps=3)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite steps"):
        trainer.run()
    assert trainer.state.iteration == 3
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())


def test_collapse_is_reported(caplog):
    meta_network = MetaMaskNet(hidden_channels=(4,), initial_logit=-8.0)  # every weight near 0
    trainer = make_trainer(meta_network=meta_network)
    with caplog.at_level("WARNING"):
        trainer.run()
    assert "collapsed" in caplog.text
    assert trainer.state.metrics["weight_extreme"] > 0.95


def test_l2rw_trainer_weights_from_the_meta_gradient():
    network = tiny_unet(out_channels=2)
    trainer = L2RWTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(_cases(4, seed=1, corrupt=True), batch_size=2, shuffle=False),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-2),
        loss_function=VoxelCrossEntropyLoss(reduction="none"),
        meta_data_loader=DataLoader(_cases(2, seed=2), batch_size=1, shuffle=False),
    )
    seg0 = _flat(network)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(engine.state.output))
    trainer.run()
    for output in outputs:
        weights = torch.stack([o["weight"] for o in output])
        assert weights.min() >= 0 and torch.isclose(weights.max(), torch.tensor(1.0))
        assert (weights == 0).any()  # voxels whose step would not help the meta batch get no weight
    assert not torch.equal(_flat(network), seg0)
    assert math.isfinite(trainer.state.metrics["meta_loss"])


def test_clean_loss_joins_the_real_step():
    """With clean_loss_weight the real step also trains on the iteration's meta batch: the loss is the re-weighted
    noisy loss plus the weighted mean loss of that batch, and the gradient moves with it."""
    torch.manual_seed(0)
    network, meta_network = tiny_unet(out_channels=2), MetaMaskNet(hidden_channels=(4,))
    plain, mixed = (
        make_trainer(network=copy.deepcopy(network), meta_network=copy.deepcopy(meta_network), clean_loss_weight=w)
        for w in (0.0, 2.0)
    )
    outputs = {}
    for name, trainer in (("plain", plain), ("mixed", mixed)):
        history = _track(trainer)
        trainer.run()
        outputs[name] = history[0]
    first = {name: h["output"][0] for name, h in outputs.items()}  # the decollated output of the first iteration
    clean = first["mixed"]["clean_loss"]
    assert "clean_loss" not in first["plain"] and clean > 0
    # the same noisy batch, weights and meta step: the losses differ by exactly 2 x the clean loss
    assert math.isclose(float(first["mixed"]["loss"]), float(first["plain"]["loss"]) + 2 * float(clean), rel_tol=1e-5)
    assert not torch.equal(outputs["mixed"]["seg"], outputs["plain"]["seg"])
    assert math.isfinite(mixed.state.metrics["clean_loss"])


@pytest.mark.parametrize("reuse", [False, True])
def test_clean_loss_interval_takes_the_clean_term_every_kth_iteration(reuse):
    """With ``clean_loss_interval`` k the clean term joins the real step on iterations 1, 1 + k, ... only (warm-up
    included), weighted k λ; with ``meta_interval`` k and ``reuse_virtual_gradient`` those are the meta steps, which
    have its gradient already, so no iteration draws a clean batch of its own."""
    trainer = make_trainer(
        max_epochs=3, num_train=8, warmup_epochs=1, meta_interval=2, clean_loss_weight=0.5, clean_loss_interval=2,
        weight_normalisation="class_sum", reuse_virtual_gradient=reuse,
    )
    clean_calls = []
    original = trainer._clean_loss
    trainer._clean_loss = lambda: clean_calls.append(trainer.state.iteration) or original()
    seen: list[dict] = []
    trainer.add_event_handler(
        IterationEvents.LOSS_COMPLETED,
        lambda e: seen.append({"iteration": e.state.iteration, "clean": e.state.output.get("clean_loss")}),
    )
    trainer.run()
    with_clean = [s["iteration"] for s in seen if s["clean"] is not None]
    assert with_clean == [1, 3, 5, 7, 9, 11]  # 4 iterations an epoch, the first epoch warm-up
    assert clean_calls == ([1, 3] if reuse else with_clean)  # after warm-up the meta steps have it
    assert trainer.clean_step_weight() == 0.0  # iteration 12 has no clean term
    trainer.state.iteration = 11
    assert trainer.clean_step_weight() == 1.0  # k λ


def test_teacher_correction_mixes_targets_and_follows_the_network():
    """With the teacher correction each voxel's target is w·label + (1 − w)·p̂: the real loss is the voxel mean of
    w·ℓ + (1 − w)·CE(p̂), p̂ from the teacher, and the teacher is an EMA of the network after every step."""
    torch.manual_seed(0)
    network = tiny_unet(out_channels=2)
    start = copy.deepcopy(network).eval()
    trainer = make_trainer(network=network, teacher_decay=0.25, **TEACHER)
    seen: list[dict] = []
    trainer.add_event_handler(
        IterationEvents.LOSS_COMPLETED,
        lambda e: seen.append({k: v.detach().clone() for k, v in e.state.output.items() if torch.is_tensor(v)}),
    )
    params: list[tuple[torch.Tensor, torch.Tensor]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: params.append((_flat(e.network), _flat(e.teacher))))
    trainer.run()

    first = seen[0]
    with torch.no_grad():
        targets = torch.softmax(start(first["image"]), dim=1)  # the teacher of the first step is the start network
    label_loss = voxel_cross_entropy(first["pred"], first["label"])
    teacher_loss = soft_cross_entropy(first["pred"], targets)
    weights = first["weight"][:, 0]
    expected = (weights * label_loss + (1 - weights) * teacher_loss).mean()
    assert torch.isclose(first["loss"], expected, rtol=1e-5)
    # teacher after step 1 = 0.25 · start + 0.75 · network after step 1
    (seg1, teacher1), (seg2, teacher2) = params
    assert torch.allclose(teacher1, 0.25 * _flat(start) + 0.75 * seg1, atol=1e-6)
    assert torch.allclose(teacher2, 0.25 * teacher1 + 0.75 * seg2, atol=1e-6)
    assert not torch.equal(teacher2, seg2)


def test_adam_look_ahead_needs_an_adam_optimizer():
    trainer = make_trainer(virtual_step="adam", virtual_lr=1e-3)
    trainer.run()
    assert trainer.state.metrics["meta_loss"] > 0
    network = tiny_unet(out_channels=2)
    with pytest.raises(ValueError, match="virtual_step 'adam'"):
        make_trainer(network=network, virtual_step="adam").__class__(
            device="cpu",
            max_epochs=1,
            train_data_loader=[],
            network=network,
            optimizer=torch.optim.SGD(network.parameters(), 0.1),
            loss_function=VoxelCrossEntropyLoss(reduction="none"),
            meta_data_loader=[],
            meta_network=MetaMaskNet(hidden_channels=(4,)),
            meta_optimizer=torch.optim.SGD(network.parameters(), 0.1),
            virtual_step="adam",
        )


def test_rising_meta_loss_is_reported(caplog):
    trainer = make_trainer(max_epochs=5)
    trainer.state.epoch = 1
    with caplog.at_level("WARNING"):
        for epoch, meta_loss in enumerate([0.5, 0.4, 0.6, 0.7, 0.65], start=1):
            trainer.state.epoch, trainer.state.metrics["meta_loss"] = epoch, meta_loss
            trainer._warn_on_rising_meta_loss(trainer)
            assert ("meta loss has stayed above" in caplog.text) == (epoch == 5)


@pytest.mark.parametrize("options", [{}, {"clean_loss_weight": 1.0, "weight_normalisation": "class_sum"}])
def test_bfloat16_autocast_trains_on_the_cpu(options):
    """``amp`` with bfloat16 on the CPU: the forward passes autocast (MONAI's own autocast is CUDA-only), the JVP
    runs in bfloat16, and every step is taken with finite weights and meta loss."""
    trainer = make_trainer(max_epochs=2, amp=True, amp_kwargs={"dtype": torch.bfloat16}, **options)
    dtypes = []
    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, lambda e: dtypes.append(e.state.output["pred"].dtype))
    meta0, seg0 = _flat(trainer.meta_network), _flat(trainer.network)
    history = _track(trainer)
    trainer.run()
    assert dtypes and all(dtype == torch.bfloat16 for dtype in dtypes)
    assert trainer.state.metrics["skipped_steps"] == 0 and math.isfinite(trainer.state.metrics["meta_loss"])
    assert all(((o["weight"] > 0) & (o["weight"] < 1)).all() for h in history for o in h["output"])
    assert not torch.equal(_flat(trainer.meta_network), meta0) and not torch.equal(_flat(trainer.network), seg0)


@pytest.mark.parametrize("clean_loss_weight", [0.0, 1.0])
def test_reused_gradients_are_the_meta_steps(clean_loss_weight):
    """With ``reuse_virtual_gradient``, a meta iteration's real step is an SGD step along the meta step's own
    gradients: the virtual step's (weights before the meta update) plus λ times the meta batch's at θ̂; the
    iterations without a meta step still compute the clean loss, those with one do not."""
    from scripts.meta_gradient import Batch, compute_meta_gradient

    network, meta_network = tiny_unet(out_channels=2), MetaMaskNet(hidden_channels=(4,))
    torch.nn.init.normal_(meta_network.head.weight, std=0.5)
    network_before, meta_before = copy.deepcopy(network), copy.deepcopy(meta_network)
    train_loader = DataLoader(_cases(4, seed=1, corrupt=True), batch_size=2, shuffle=False)
    meta_loader = DataLoader(_cases(2, seed=2), batch_size=1, shuffle=False)
    trainer = MCPMTrainer(
        device="cpu", max_epochs=1, train_data_loader=train_loader, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=VoxelCrossEntropyLoss(reduction="none"),
        meta_data_loader=meta_loader, meta_network=meta_network,
        meta_optimizer=torch.optim.Adam(meta_network.parameters(), 1e-2), meta_interval=2,
        clean_loss_weight=clean_loss_weight, weight_normalisation="class_sum", reuse_virtual_gradient=True,
    )
    clean_calls = []
    original = trainer._clean_loss
    trainer._clean_loss = lambda: clean_calls.append(trainer.state.iteration) or original()
    parameters = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: parameters.append(_flat(e.network)))
    trainer.run()
    assert clean_calls == ([2] if clean_loss_weight > 0 else [])  # iteration 1 had a meta step

    # the first iteration by hand, from the same start
    first, meta_first = next(iter(train_loader)), next(iter(meta_loader))
    image, label = first["image"], first["label"]
    network_before.train()
    logits = network_before(image)
    loss_map = voxel_cross_entropy(logits, label)
    meta_input = meta_before.build_input(loss_map, logits, label, image)
    result = compute_meta_gradient(
        mode="jvp", network=network_before, loss_function=voxel_cross_entropy, batch=Batch(image, label),
        loss_map=loss_map, meta_network=meta_before, meta_input=meta_input,
        meta_batch=Batch(meta_first["image"], meta_first["label"]), virtual_lr=0.1, normalisation="class_sum",
    )
    step = [g + clean_loss_weight * v for g, v in zip(result.virtual_step_grads, result.meta_batch_grads, strict=True)]
    expected = torch.nn.utils.parameters_to_vector(
        [p.detach() - 0.1 * g for p, g in zip(network_before.parameters(), step, strict=True)]
    )
    assert torch.allclose(parameters[0], expected, atol=1e-6)
