"""Multi-process MCPM training with `torchrun` and the gloo backend, as `configs/multi_gpu_train.json` runs it:
both ranks end identical, the warm-up epoch equals single-process training exactly, and the MCPM epoch stays
close to it (under DDP each rank's meta-gradient comes from its own shard, then the ranks average it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from scripts.data.synthetic import generate_dataset
from tests.conftest import BUNDLE_ROOT, CONFIGS, TINY, bundle

# one global batch of all 4 training cases per epoch (2 per rank under DDP), no augmentation, no shuffling,
# instance norm: so that single-process and 2-rank training see the same data in the same order
SETTINGS = {**TINY, "val_interval": 2, "train#random_transforms#1#prob": 0.0, "network_def#norm": "instance"}


def dump_override(path: Path, distributed: bool) -> Path:
    """The config's own ``run`` list, plus saving the networks at the start and after every epoch, per rank."""
    network = "@network.module" if distributed else "@network"
    rank = "str(dist.get_rank())" if distributed else "'0'"
    save = (
        f"torch.save({{'network': {network}.state_dict(), 'meta_network': @meta_network.state_dict()}}, "
        f"@output_dir + '/rank' + {rank} + '_epoch' + str(e.state.epoch) + '.pt')"
    )
    run = json.loads((CONFIGS / ("multi_gpu_train.json" if distributed else "train.json")).read_text())["run"]
    run[-1:-1] = [
        "$os.makedirs(@output_dir, exist_ok=True)",
        f"$torch.save({network}.state_dict(), @output_dir + '/init' + {rank} + '.pt')",
        f"$@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_COMPLETED, lambda e: {save})",
    ]
    path.write_text(json.dumps({"run": run}))
    return path


def flat(state: dict) -> torch.Tensor:
    """All values as one vector, without the convolution biases that instance norm cancels: their gradient is
    zero up to round-off, which Adam turns into full-size steps of random sign."""
    return torch.cat([v.flatten().double() for k, v in state.items() if not k.endswith("conv.bias")])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    generate_dataset(data, seed=5, num_training=4, num_meta=2, num_validation=2, num_test=1, shape=(16, 16, 16))
    common = {"bundle_root": BUNDLE_ROOT, "dataset_dir": data}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    ddp = bundle(
        "run", ["train.json", "multi_gpu_train.json", dump_override(root / "ddp.json", True)], root, launcher=torchrun,
        output_dir=root / "ddp", ckpt_dir=root / "ddp" / "models", batch_size=2, **common,
        **{**SETTINGS, "mcpm#meta_batch_size": 1, "train#sampler#shuffle": False, "train#meta_sampler#shuffle": False},
    )
    bundle(
        "run", ["train.json", dump_override(root / "single.json", False)], root,
        output_dir=root / "single", ckpt_dir=root / "single" / "models", batch_size=4, **common,
        **{**SETTINGS, "mcpm#meta_batch_size": 2, "train#dataloader#shuffle": False, "train#meta_dataloader#shuffle": False},
    )
    (root / "ddp" / "log.txt").write_text(ddp.stdout + ddp.stderr)
    return root


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_both_ranks_end_identical(runs):
    for epoch in (1, 2):
        rank0, rank1 = load(runs / "ddp" / f"rank0_epoch{epoch}.pt"), load(runs / "ddp" / f"rank1_epoch{epoch}.pt")
        for part in ("network", "meta_network"):
            for name, value in rank0[part].items():
                assert torch.equal(value, rank1[part][name]), (epoch, part, name)


def test_warmup_epoch_equals_single_process(runs):
    assert torch.equal(flat(load(runs / "ddp" / "init0.pt")), flat(load(runs / "single" / "init0.pt")))
    ddp, single = load(runs / "ddp" / "rank0_epoch1.pt"), load(runs / "single" / "rank0_epoch1.pt")
    assert torch.allclose(flat(ddp["network"]), flat(single["network"]), atol=1e-5)


def test_mcpm_epoch_is_close_to_single_process(runs):
    after_warmup = flat(load(runs / "single" / "rank0_epoch1.pt")["network"])
    ddp, single = load(runs / "ddp" / "rank0_epoch2.pt"), load(runs / "single" / "rank0_epoch2.pt")
    step = (flat(single["network"]) - after_warmup).norm()
    assert step > 0
    assert (flat(ddp["network"]) - flat(single["network"])).norm() < 0.25 * step
    assert not torch.equal(flat(ddp["meta_network"]), flat(load(runs / "ddp" / "rank0_epoch1.pt")["meta_network"]))


def test_only_rank0_writes_checkpoints(runs):
    final = torch.load(runs / "ddp" / "models" / "checkpoint_final.pt", weights_only=True)
    assert torch.equal(flat(final["model"]), flat(load(runs / "ddp" / "rank0_epoch2.pt")["network"]))
    assert (runs / "ddp" / "log.txt").read_text().count("checkpoint_epoch=1.pt") == 1
