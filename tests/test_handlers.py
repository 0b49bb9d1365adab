"""The fine-tuning switch of the ``finetune`` baseline: noisy cases for the first part of the epochs, then the clean
meta cases, with the same number of batches per epoch."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

from scripts.handlers import FinetuneHandler


def _run(max_epochs: int, fraction: float, start_epoch: int = 0) -> dict[int, set[str]]:
    """Which kind of case ("noisy" or "clean") each epoch of a 4-epoch run trains on."""
    noisy = [{"kind": torch.tensor(0)} for _ in range(6)]
    clean = [{"kind": torch.tensor(1)} for _ in range(2)]
    seen: dict[int, set[str]] = {}
    lengths: dict[int, int] = {}

    def step(engine, batch):
        seen.setdefault(engine.state.epoch, set()).update("clean" if k else "noisy" for k in batch["kind"].tolist())
        lengths[engine.state.epoch] = lengths.get(engine.state.epoch, 0) + 1

    engine = Engine(step)
    FinetuneHandler(clean, batch_size=2, fraction=fraction).attach(engine)
    loader = torch.utils.data.DataLoader(noisy, batch_size=2)
    if start_epoch:  # as a resumed run: the state of a checkpoint taken after ``start_epoch`` epochs

        @engine.on(Events.STARTED)
        def resume(engine):
            engine.state.epoch, engine.state.iteration = start_epoch, start_epoch * len(loader)

    engine.run(loader, max_epochs=max_epochs)
    assert set(lengths.values()) == {3}  # every epoch has the noisy set's 3 batches
    return seen


def test_switches_to_the_clean_cases_after_three_quarters():
    assert _run(max_epochs=4, fraction=0.75) == {1: {"noisy"}, 2: {"noisy"}, 3: {"noisy"}, 4: {"clean"}}
    assert _run(max_epochs=4, fraction=0.5) == {1: {"noisy"}, 2: {"noisy"}, 3: {"clean"}, 4: {"clean"}}


def test_a_resumed_run_continues_on_the_clean_cases():
    assert _run(max_epochs=4, fraction=0.5, start_epoch=3) == {4: {"clean"}}
