"""Batch samplers that fix how many cases of each group (noisy training cases, clean meta cases) a batch holds: the
``balanced`` baseline's batches of one clean and one noisy case (the batch ratio of MTCL, Xu et al., MICCAI 2022)
and the meta-set phase of the ``finetune`` baseline, both with the same number of updates per epoch as plain
training."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Sampler

from scripts.utils import check_number

__all__ = ["GroupBatchSampler", "split_batch_sampler"]


class GroupBatchSampler(Sampler[list[int]]):
    """Batches of indices into a dataset made of consecutive groups (``group_sizes``: the first ``group_sizes[0]``
    items, then the next ``group_sizes[1]``, ...), each batch holding ``per_batch[g]`` items of group ``g``.

    Every group is walked through in a fresh random order, restarted when it runs out, so each item of a group is
    drawn equally often and a small group (the clean meta cases) is cycled. ``num_batches`` batches make an epoch;
    by default as many as cover the first group once (``ceil(group_sizes[0] / batch size)``), which gives plain
    training's updates per epoch when the first group is its training set and the batch size is the same.

    The order comes from a seed drawn from torch's global generator at the start of each epoch, as
    ``torch.utils.data.RandomSampler`` draws its own, so ``monai.utils.set_determinism`` makes it reproducible.
    """

    def __init__(self, group_sizes: Sequence[int], per_batch: Sequence[int], num_batches: int | None = None) -> None:
        if len(group_sizes) != len(per_batch) or not group_sizes:
            raise ValueError(
                f"group_sizes {list(group_sizes)} and per_batch {list(per_batch)} must be non-empty and of one length."
            )
        for size, count in zip(group_sizes, per_batch, strict=True):
            check_number("group size", size, 1 if count else 0, integer=True)
            check_number("per_batch entry", count, 0, integer=True)
        self.group_sizes = [int(s) for s in group_sizes]
        self.per_batch = [int(c) for c in per_batch]
        self.batch_size = sum(self.per_batch)
        check_number("batch size (the sum of per_batch)", self.batch_size, 1, integer=True)
        if num_batches is None:
            num_batches = math.ceil(self.group_sizes[0] / self.batch_size)
        check_number("num_batches", num_batches, 1, integer=True)
        self.num_batches = int(num_batches)
        self.offsets = [sum(self.group_sizes[:g]) for g in range(len(self.group_sizes))]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        streams = [self._cycle(size, generator) for size in self.group_sizes]
        for _ in range(self.num_batches):
            batch = []
            for offset, stream, count in zip(self.offsets, streams, self.per_batch, strict=True):
                batch += [offset + next(stream) for _ in range(count)]
            yield batch

    @staticmethod
    def _cycle(size: int, generator: torch.Generator) -> Iterator[int]:
        """Indices 0..size-1 in a fresh random order each time round (nothing when the group is empty)."""
        while size:
            yield from torch.randperm(size, generator=generator).tolist()


def split_batch_sampler(datalist: str, batch_size: int, clean_per_batch: int = 1) -> GroupBatchSampler:
    """The batches of the ``balanced`` baseline over the cases of ``scripts.cases.labelled_cases`` (the training
    cases, then the meta cases of ``datalist``): ``batch_size - clean_per_batch`` noisy and ``clean_per_batch``
    clean cases in every batch, as many batches per epoch as plain training has."""
    check_number("clean_per_batch", clean_per_batch, 0, batch_size, integer=True)
    splits = json.loads(Path(datalist).read_text())
    sizes = [len(splits.get(split, [])) for split in ("training", "meta")]
    return GroupBatchSampler(sizes, [batch_size - clean_per_batch, clean_per_batch])
