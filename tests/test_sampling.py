"""Group batch samplers: the balanced baseline's batches of one clean and one noisy case, and the fine-tuning
phase's batches of meta cases, with plain training's number of batches."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from scripts.sampling import GroupBatchSampler, split_batch_sampler


def test_every_batch_holds_its_share_of_each_group():
    # by default as many batches as plain training's batches of 2 over the first group: ceil(6 / 2)
    assert len(GroupBatchSampler([6, 2], [1, 1])) == len(list(GroupBatchSampler([6, 2], [1, 1]))) == 3
    batches = list(GroupBatchSampler([6, 2], [1, 1], num_batches=6))
    assert all(len(b) == 2 and b[0] < 6 <= b[1] < 8 for b in batches)
    # each group is walked through in a random order: every noisy case once, every clean case equally often
    assert sorted(b[0] for b in batches) == list(range(6))
    assert collections.Counter(b[1] for b in batches) == {6: 3, 7: 3}


def test_order_follows_torchs_global_seed():
    sampler = GroupBatchSampler([10], [2], num_batches=7)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(0)
    assert list(sampler) == first
    assert list(sampler) != first  # a new epoch, a new order
    assert len(first) == 7 and all(len(b) == 2 for b in first)


@pytest.mark.parametrize(
    "args, message",
    [
        (([4, 2], [1]), "one length"),
        (([0, 2], [1, 1]), "group size"),
        (([4, 2], [0, 0]), "batch size"),
        (([4], [2], 0), "num_batches"),
    ],
)
def test_bad_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        GroupBatchSampler(*args)


def test_split_batch_sampler_reads_the_split_sizes(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{}] * 5, "meta": [{}] * 3}))
    sampler = split_batch_sampler(str(datalist), batch_size=2, clean_per_batch=1)
    assert sampler.group_sizes == [5, 3] and sampler.per_batch == [1, 1] and len(sampler) == 3
    with pytest.raises(ValueError, match="clean_per_batch"):
        split_batch_sampler(str(datalist), batch_size=2, clean_per_batch=3)
