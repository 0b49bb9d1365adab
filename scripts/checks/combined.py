"""Run a command's checks together, so that one refusal lists every problem the run already knows of instead of
one per attempt (a config value, then the output folder, then the data)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scripts.utils import BundleInputError, ProblemsError

__all__ = ["ChecksFailed", "run_checks"]


class ChecksFailed(ProblemsError):
    """More than one check refused the run; ``problems`` holds each check's whole message."""

    heading = "the run was refused for several reasons"


def _refusals(checks: Sequence[Callable[[], object] | None]) -> list[BundleInputError]:
    """Call each of ``checks`` (None, a disabled check, is skipped) and return their refusals."""
    refusals: list[BundleInputError] = []
    for check in checks:
        if check is None:
            continue
        try:
            check()
        except BundleInputError as refusal:
            refusals.append(refusal)
    return refusals


def run_checks(
    checks: Sequence[Callable[[], object] | None], prerequisites: Sequence[Callable[[], object] | None] = ()
) -> None:
    """Call the ``prerequisites``, then (if none refused) each of ``checks``, in order, and collect their refusals
    (:py:class:`scripts.utils.BundleInputError`): one is raised as it is, several as one :py:class:`ChecksFailed`.
    A prerequisite is a check whose refusal makes the others' findings moot: an override of an unknown key, which
    MONAI has added to the config the others read. Any other error stops at once, as a bug would. In a config, each
    check is a component with ``"_mode_": "callable"``, so that this function, not the parser, calls it."""
    refusals = _refusals(prerequisites) or _refusals(checks)
    if len(refusals) == 1:
        raise refusals[0]
    if refusals:
        raise ChecksFailed([str(refusal) for refusal in refusals])
