"""Per-iteration time and peak memory of plain training and of MCPM variants, measured in one process.

Each variant runs the real trainer iteration (``SupervisedTrainer`` or ``MCPMTrainer``) on random data held in
memory, so data loading is excluded. Times are device-synchronised; the table reports the median and the mean
per iteration after warm-up, and their ratio to plain training (the mean amortises ``meta_interval``).

    python -m scripts.experiments.step_benchmark --device cpu --patch 48 --batch 2 --channels 16 32 64 128
    python -m scripts.experiments.step_benchmark --device cuda --patch 96 --batch 2 --channels 16 32 64 128 256 --amp
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet

from scripts.losses import VoxelCrossEntropyLoss
from scripts.meta_net import MetaMaskNet
from scripts.trainer import MCPMTrainer

# the MCPMTrainer options of each variant; "plain" is MONAI's SupervisedTrainer, the reference of every ratio
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "mcpm second_order": {"meta_gradient": "second_order"},
    "mcpm jvp": {"meta_gradient": "jvp"},
    "mcpm jvp, meta_interval 2": {"meta_gradient": "jvp", "meta_interval": 2},
    "mcpm jvp, meta_interval 4": {"meta_gradient": "jvp", "meta_interval": 4},
    "mcpm jvp, virtual step on the last decoder stage": {"meta_gradient": "jvp", "virtual_step_params": ["model.2"]},
}


def build_trainer(
    variant: dict[str, Any], args: argparse.Namespace, batch: dict[str, torch.Tensor], device: torch.device, amp: bool
) -> SupervisedTrainer:
    """A fresh network and trainer for one variant (same initial weights for every variant)."""
    torch.manual_seed(0)
    strides = [2] * (len(args.channels) - 1)
    network = UNet(
        3, 1, args.classes, channels=args.channels, strides=strides, num_res_units=args.res_units, norm=args.norm
    ).to(device)
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
    if not variant:
        return SupervisedTrainer(**common)
    meta_network = MetaMaskNet().to(device)
    return MCPMTrainer(
        **common,
        meta_data_loader=[batch],
        meta_network=meta_network,
        meta_optimizer=torch.optim.Adam(meta_network.parameters(), 1e-3),
        **variant,
    )


class IterationTimer:
    """Times the real iterations of one trainer, a chunk at a time, so that variants can be interleaved."""

    def __init__(self, trainer: SupervisedTrainer, batch: dict[str, torch.Tensor], device: torch.device) -> None:
        self.trainer, self.batch, self.device = trainer, batch, device
        self.times: list[float] = []
        self.peak_gib = float("nan")
        trainer.state.epoch = 1
        if isinstance(trainer, MCPMTrainer):
            trainer._start_epoch(trainer)

    def _sync(self) -> None:
        """Wait for the device, so that a time covers the iteration's kernels and not only their launch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, iterations: int, record: bool = True) -> None:
        """Run ``iterations`` real iterations; with ``record``, keep their times and the peak memory."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(iterations):
            self.trainer.state.iteration += 1
            self._sync()
            start = time.perf_counter()
            self.trainer._iteration(self.trainer, self.batch)
            self._sync()
            if record:
                self.times.append(time.perf_counter() - start)
        if record and self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.peak_gib = peak if math.isnan(self.peak_gib) else max(self.peak_gib, peak)


def main(argv: list[str] | None = None) -> str:
    """Time every variant (interleaved rounds), print the Markdown table and return it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--res_units", type=int, default=2)
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per round, a multiple of 4")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants, interleaved against drift")
    parser.add_argument("--amp", action="store_true", help="also run every variant with bf16 autocast (CUDA only)")
    parser.add_argument("--cudnn_benchmark", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    shape = (args.batch, 1, args.patch, args.patch, args.patch)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(shape, generator=generator),
        "label": torch.randint(0, args.classes, shape, generator=generator).float(),
    }
    settings = [False] + ([True] if args.amp and device.type == "cuda" else [])
    rows = []
    for amp in settings:
        names = ["plain"] + [v for v in args.variants if v != "plain"]
        timers = {}
        for name in names:
            timers[name] = IterationTimer(build_trainer(VARIANTS[name], args, batch, device, amp), batch, device)
            timers[name].run(args.warmup, record=False)
        for _ in range(args.rounds):
            for timer in timers.values():
                timer.run(args.iterations)
        plain = timers["plain"]
        for name, timer in timers.items():
            median, mean = statistics.median(timer.times), statistics.fmean(timer.times)
            ratio = mean / statistics.fmean(plain.times)
            peak_ratio = timer.peak_gib / plain.peak_gib
            rows.append(
                (name + (" (bf16)" if amp else ""), median * 1e3, mean * 1e3, ratio, timer.peak_gib, peak_ratio)
            )
        del timers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = (
        f"{args.device}, patch {args.patch}³, batch {args.batch}, channels {args.channels}, {args.norm} norm, "
        f"torch {torch.__version__}"
    )
    columns = "| variant | median ms | mean ms | mean / plain | peak GiB | peak / plain |"
    lines = [header, "", columns, "|---|---|---|---|---|---|"]
    for name, median, mean, ratio, peak, peak_ratio in rows:
        lines.append(f"| {name} | {median:.1f} | {mean:.1f} | {ratio:.2f}× | {peak:.2f} | {peak_ratio:.2f}× |")
    table = "\n".join(lines)
    print("\n" + table)
    return table


if __name__ == "__main__":
    main()
