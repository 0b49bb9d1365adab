"""Per-iteration time and peak memory of plain training and of MCPM variants, measured in one process; the cost
of each part of an exact MCPM iteration and their sum, the floor; and how both grow with patch and batch size.

Each variant runs the real trainer iteration (``SupervisedTrainer`` or ``MCPMTrainer``) on random data held in
memory, so data loading is excluded. The MCPM variants start from the bundle's defaults (the ``mcpm`` section of
``configs/train.json``) and change one thing each. Times are device-synchronised; the table reports the median and
the mean per iteration after warm-up, and their ratio to plain training (the mean amortises ``meta_interval``).
Peak memory is CUDA's ``max_memory_allocated`` on a GPU and the process's peak resident set (``VmHWM``, reset per
variant) on the CPU; the CPU figure includes the interpreter and every live trainer, so read its differences.

    python -m scripts.experiments.step_benchmark --device cpu --components
    python -m scripts.experiments.step_benchmark --device cpu --patch 32 48 64 96 --batch 1 2 4 \\
        --variants plain "mcpm (default)" --plot docs/performance_scaling.png
    python -m scripts.experiments.step_benchmark --device cuda --patch 96 --batch 2 --channels 16 32 64 128 256 --amp
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet

from scripts.experiments.methods import CE_MCPM, CONFIGS, PAPER_MCPM
from scripts.losses import VoxelCrossEntropyLoss, weighted_soft_dice
from scripts.meta_gradient import Batch, loss_map_jvp, meta_loss_with, normalise_weights
from scripts.meta_net import MetaMaskNet
from scripts.trainer import MCPMTrainer
from scripts.utils import figure, save_figure

# what each variant changes in the bundle's mcpm section; None is MONAI's SupervisedTrainer, the reference of every
# ratio. meta_batch_size and meta_learning_rate set the meta batch and the meta optimizer, the rest are trainer options
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "mcpm (default)": {},
    "mcpm second_order": {"meta_gradient": "second_order"},
    "mcpm meta_interval 2": {"meta_interval": 2},
    "mcpm meta_interval 4": {"meta_interval": 4},
    "mcpm meta_interval 8": {"meta_interval": 8},
    "mcpm meta batch 1": {"meta_batch_size": 1},
    "mcpm meta_interval 4, meta batch 1": {"meta_interval": 4, "meta_batch_size": 1},
    "mcpm without the Dice term": dict(CE_MCPM),
    # reuse needs the cross-entropy alone (docs/mcpm.md)
    "mcpm reuse": {**CE_MCPM, "reuse_virtual_gradient": True},
    "mcpm reuse, meta_interval 2": {**CE_MCPM, "reuse_virtual_gradient": True, "meta_interval": 2},
    "mcpm reuse, meta_interval 4": {**CE_MCPM, "reuse_virtual_gradient": True, "meta_interval": 4},
    "mcpm reuse, meta and clean every 2nd": {
        **CE_MCPM, "reuse_virtual_gradient": True, "meta_interval": 2, "clean_loss_interval": 2
    },
    "mcpm reuse, meta and clean every 4th": {
        **CE_MCPM, "reuse_virtual_gradient": True, "meta_interval": 4, "clean_loss_interval": 4
    },
    "mcpm virtual step on the last decoder stage": {"virtual_step_params": ["model.2"]},
    "mcpm as published": dict(PAPER_MCPM),
}
# the part of an exact iteration that only the Dice term (mcpm#dice_loss_weight > 0) adds
DICE_PART = "soft Dice terms (training and meta batch)"
# mcpm options that are not MCPMTrainer arguments
NOT_TRAINER_OPTIONS = ("meta_batch_size", "meta_learning_rate")


def bundle_mcpm_options() -> dict[str, Any]:
    """The ``mcpm`` section of ``configs/train.json``: the defaults every MCPM variant starts from."""
    return json.loads((CONFIGS / "train.json").read_text())["mcpm"]


def random_batch(shape: tuple[int, ...], classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A batch of noise images and random labels of ``shape`` (B, 1, *spatial), the same for every variant."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(shape, generator=generator),
        "label": torch.randint(0, classes, shape, generator=generator).float(),
    }


def build_network(args: argparse.Namespace, device: torch.device) -> UNet:
    """The bundle's U-Net at the benchmark's widths, with the same initial weights on every call."""
    torch.manual_seed(0)
    strides = [2] * (len(args.channels) - 1)
    return UNet(
        3, 1, args.classes, channels=args.channels, strides=strides, num_res_units=args.res_units, norm=args.norm
    ).to(device)


def build_trainer(
    variant: dict[str, Any] | None,
    args: argparse.Namespace,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    amp: bool,
) -> SupervisedTrainer:
    """A fresh network and trainer for one variant (same initial weights for every variant)."""
    network = build_network(args, device)
    common = dict(
        device=device,
        max_epochs=1,
        train_data_loader=[batch],
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3),
        loss_function=VoxelCrossEntropyLoss(reduction="none"),
        amp=amp,
        amp_kwargs={"dtype": torch.bfloat16} if amp else None,
    )
    if variant is None:
        return SupervisedTrainer(**common)
    options = {**bundle_mcpm_options(), **variant, "warmup_epochs": 0}
    meta_shape = (options["meta_batch_size"], *batch["image"].shape[1:])
    meta_batch = random_batch(meta_shape, args.classes, seed=1)
    meta_network = MetaMaskNet(num_classes=args.classes).to(device)
    return MCPMTrainer(
        **common,
        meta_data_loader=[meta_batch],
        meta_network=meta_network,
        meta_optimizer=torch.optim.Adam(meta_network.parameters(), options["meta_learning_rate"]),
        **{key: value for key, value in options.items() if key not in NOT_TRAINER_OPTIONS},
    )


def _sync(device: torch.device) -> None:
    """Wait for the device, so that a time covers the kernels and not only their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """The peak memory in GiB since the last :py:meth:`reset`: CUDA's allocator on a GPU, the process's peak
    resident set on Linux otherwise (NaN where neither can be read)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        try:
            found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        except OSError:
            return math.nan
        return int(found.group(1)) / 2**20 if found else math.nan


class IterationTimer:
    """Times the real iterations of one trainer, a chunk at a time, so that variants can be interleaved."""

    def __init__(self, trainer: SupervisedTrainer, batch: dict[str, torch.Tensor], device: torch.device) -> None:
        self.trainer, self.batch, self.device = trainer, batch, device
        self.memory = PeakMemory(device)
        self.times: list[float] = []
        self.peak_gib = math.nan
        trainer.state.epoch = 1
        if isinstance(trainer, MCPMTrainer):
            trainer._start_epoch(trainer)

    def run(self, iterations: int, record: bool = True) -> None:
        """Run ``iterations`` real iterations; with ``record``, keep their times and the peak memory."""
        self.memory.reset()
        for _ in range(iterations):
            self.trainer.state.iteration += 1
            _sync(self.device)
            start = time.perf_counter()
            self.trainer._iteration(self.trainer, self.batch)
            _sync(self.device)
            if record:
                self.times.append(time.perf_counter() - start)
        if record:
            peak = self.memory.read()
            self.peak_gib = peak if math.isnan(self.peak_gib) else max(self.peak_gib, peak)


def time_variants(
    args: argparse.Namespace, device: torch.device, patch: int, batch_size: int, amp: bool
) -> list[dict[str, Any]]:
    """Time every variant of ``args.variants`` at one patch and batch size, interleaved; one row per variant."""
    batch = random_batch((batch_size, 1, patch, patch, patch), args.classes, seed=0)
    names = ["plain"] + [v for v in args.variants if v != "plain"]
    timers = {}
    for name in names:
        timers[name] = IterationTimer(build_trainer(VARIANTS[name], args, batch, device, amp), batch, device)
        timers[name].run(args.warmup, record=False)
    for _ in range(args.rounds):
        for timer in timers.values():
            timer.run(args.iterations)
    plain_mean = statistics.fmean(timers["plain"].times)
    rows = []
    for name, timer in timers.items():
        mean = statistics.fmean(timer.times)
        rows.append(
            {
                "variant": name + (" (bf16)" if amp else ""),
                "patch": patch,
                "batch": batch_size,
                "median_ms": statistics.median(timer.times) * 1e3,
                "mean_ms": mean * 1e3,
                "ratio": mean / plain_mean,
                "peak_gib": timer.peak_gib,
            }
        )
    if device.type == "cuda":
        del timers
        torch.cuda.empty_cache()
    return rows


def _median_time(
    function: Callable[..., Any], device: torch.device, repeats: int, setup: Callable[[], Any] | None = None
) -> float:
    """The median wall time of ``function()`` in ms over ``repeats`` calls after one warm-up call; with ``setup``,
    of ``function(setup())``, ``setup`` untimed."""
    times = []
    for _ in range(repeats + 1):
        arguments = () if setup is None else (setup(),)
        _sync(device)
        start = time.perf_counter()
        function(*arguments)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def component_times(args: argparse.Namespace, device: torch.device, patch: int, batch_size: int) -> dict[str, float]:
    """The median time in ms of each part of an exact MCPM iteration at the bundle's defaults, each run alone with
    the primitives the trainer uses (``scripts.meta_gradient``), and of a plain iteration's two parts."""
    options = bundle_mcpm_options()
    network = build_network(args, device).train()
    meta_network = MetaMaskNet(num_classes=args.classes).to(device).train()
    loss_function = VoxelCrossEntropyLoss(reduction="none")
    raw = random_batch((batch_size, 1, patch, patch, patch), args.classes, seed=0)
    raw_meta = random_batch((options["meta_batch_size"], 1, patch, patch, patch), args.classes, seed=1)
    batch = Batch(raw["image"].to(device), raw["label"].to(device))
    meta_batch = Batch(raw_meta["image"].to(device), raw_meta["label"].to(device))
    params = dict(network.named_parameters())
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    meta_optimizer = torch.optim.Adam(meta_network.parameters(), 1e-3)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        pred = network(batch.image)
        return pred, loss_function(pred, batch.label)

    pred, loss_map = forward()
    meta_input = meta_network.build_input(loss_map.detach(), pred.detach(), batch.label, batch.image)

    def backward(graph: tuple[torch.Tensor, torch.Tensor]) -> None:
        torch.autograd.grad(graph[1].mean(), list(params.values()))

    def meta_batch_pass() -> list[torch.Tensor]:
        detached = {name: p.detach().requires_grad_() for name, p in params.items()}
        loss = meta_loss_with(network, loss_function, detached, meta_batch)
        return list(torch.autograd.grad(loss, list(detached.values())))

    direction = meta_batch_pass()

    def meta_network_pass() -> None:
        weights = normalise_weights(meta_network(meta_input), options["weight_normalisation"], batch.label)
        torch.autograd.grad((weights * loss_map.detach()).sum(), list(meta_network.parameters()))

    def optimizer_steps() -> None:
        for p in network.parameters():
            p.grad = torch.zeros_like(p)
        for p in meta_network.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        meta_optimizer.step()

    def dice_terms() -> None:
        # the soft Dice of the training batch (weighted) and of the clean meta batch, each with its gradient to the
        # logits; the network's backward behind them is the one the cross-entropy already pays for
        for logits, label, weights in ((pred, batch.label, voxel_weights), (meta_pred, meta_batch.label, None)):
            leaf = logits.detach().requires_grad_()
            torch.autograd.grad(weighted_soft_dice(leaf, label, weights), leaf)

    repeats = args.iterations
    times = {
        "forward and loss map (training batch)": _median_time(forward, device, repeats),
        "backward (training batch)": _median_time(backward, device, repeats, setup=forward),
        "forward and backward (meta batch)": _median_time(meta_batch_pass, device, repeats),
        "JVP of the loss map": _median_time(
            functools.partial(loss_map_jvp, network, loss_function, batch, params, direction), device, repeats
        ),
        "meta network forward and backward": _median_time(meta_network_pass, device, repeats),
        "optimizer steps (both networks)": _median_time(optimizer_steps, device, repeats),
    }
    if options["dice_loss_weight"] > 0:  # the logits and weights dice_terms reads, made only when it runs
        with torch.no_grad():
            meta_pred, voxel_weights = network(meta_batch.image), meta_network(meta_input)
        times[DICE_PART] = _median_time(dice_terms, device, repeats)
    return times


def floor_ms(times: dict[str, float], clean_loss: bool) -> float:
    """The floor of an exact MCPM iteration from its parts: the forward, two backwards (the virtual and the real
    step), the meta batch at θ̂ (and again at θ for the clean loss term), one JVP, the meta network, the steps, and
    the Dice terms where the defaults have them."""
    meta_passes = 2 if clean_loss else 1
    return (
        times["forward and loss map (training batch)"]
        + 2 * times["backward (training batch)"]
        + meta_passes * times["forward and backward (meta batch)"]
        + times["JVP of the loss map"]
        + times["meta network forward and backward"]
        + times["optimizer steps (both networks)"]
        + times.get(DICE_PART, 0.0)
    )


def variants_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :py:func:`time_variants`' rows."""
    lines = [
        "| variant | patch | batch | median ms | mean ms | mean / plain | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['patch']}³ | {r['batch']} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | "
            f"{r['ratio']:.2f}× | {r['peak_gib']:.2f} |"
        )
    return "\n".join(lines)


def components_table(times: dict[str, float], measured_ms: float | None, clean_loss: bool) -> str:
    """The Markdown table of the parts, the floor, and the measured default iteration against it."""
    lines = ["| part | median ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in times.items()]
    floor = floor_ms(times, clean_loss)
    lines.append(f"| **floor of an exact iteration** (meta batch {'twice' if clean_loss else 'once'}) | {floor:.1f} |")
    if measured_ms is not None:
        lines.append(f"| measured `mcpm (default)` iteration (median) | {measured_ms:.1f} ({measured_ms / floor:.2f}× floor) |")
    return "\n".join(lines)


def plot_scaling(rows: list[dict[str, Any]], path: Path) -> Path:
    """Time per iteration against voxels per batch for each variant, and the ratio to plain training."""
    fig = figure(figsize=(10, 4))
    time_axis, ratio_axis = fig.subplots(1, 2)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for batch_size in sorted({r["batch"] for r in rows}):
            points = sorted((r["patch"], r) for r in rows if r["variant"] == variant and r["batch"] == batch_size)
            if not points:
                continue
            voxels = [batch_size * patch**3 / 1e6 for patch, _ in points]
            label = f"{variant}, batch {batch_size}"
            time_axis.plot(voxels, [r["median_ms"] for _, r in points], marker="o", label=label)
            if variant != "plain":
                ratio_axis.plot(voxels, [r["ratio"] for _, r in points], marker="o", label=label)
    time_axis.set(xscale="log", yscale="log", xlabel="voxels per batch (millions)", ylabel="median ms per iteration")
    ratio_axis.set(xscale="log", xlabel="voxels per batch (millions)", ylabel="mean time / plain")
    time_axis.legend(fontsize=7)
    ratio_axis.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, nargs="+", default=[48], help="cubic patch sizes, each timed")
    parser.add_argument("--batch", type=int, nargs="+", default=[2], help="batch sizes, each timed")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--res_units", type=int, default=2)
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per round, a multiple of 8")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants, interleaved against drift")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="also run every variant with bf16 autocast (on the CPU plain training stays float32: MONAI's "
        "SupervisedTrainer autocasts on CUDA only)",
    )
    parser.add_argument("--cudnn_benchmark", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--components", action="store_true", help="also time each part of an exact iteration")
    parser.add_argument("--plot", type=Path, default=None, help="save the scaling plot (PNG) here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Time every variant at every patch and batch size, optionally the parts of an iteration; print the Markdown
    tables and return them."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    rows = []
    for patch in args.patch:
        for batch_size in args.batch:
            for amp in [False] + ([True] if args.amp else []):
                rows += time_variants(args, device, patch, batch_size, amp)
                print(f"timed patch {patch}³, batch {batch_size}{' (bf16)' if amp else ''}", flush=True)
    header = (
        f"{args.device}, channels {args.channels}, {args.norm} norm, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    parts = [header, "", variants_table(rows)]
    if args.components:
        patch, batch_size = args.patch[0], args.batch[0]
        times = component_times(args, device, patch, batch_size)
        measured = [
            r["median_ms"]
            for r in rows
            if r["variant"] == "mcpm (default)" and r["patch"] == patch and r["batch"] == batch_size
        ]
        clean_loss = bundle_mcpm_options()["clean_loss_weight"] > 0
        parts += ["", f"parts at patch {patch}³, batch {batch_size}:", "",
                  components_table(times, measured[0] if measured else None, clean_loss)]
    if args.plot is not None:
        parts += ["", f"plot: {plot_scaling(rows, args.plot)}"]
    text = "\n".join(parts)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
