"""Refuse command-line overrides of keys that no config file defines, which MONAI would add unused."""

from __future__ import annotations

import ast
import difflib
import inspect
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.scripts import run
from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

from scripts.utils import ProblemsError

__all__ = ["OverrideError", "check_override_keys", "close_keys", "override_problems", "started_as_bundle_command"]

# keys of MONAI's own that a component holds, never what a user means by a typo
INTERNAL_KEYS = frozenset({"_target_", "_mode_", "_disabled_", "_requires_", "_desc_"})
# the words of a config key: ``mcpm#meta_learning_rate`` -> mcpm, meta, learning, rate
_WORD_SEPARATORS = re.compile(r"[#_:.\-]+")


class OverrideError(ProblemsError):
    """Command-line overrides of keys that no loaded config file defines: MONAI would add them unused."""

    heading = (
        "override check failed: an override must name a key that a config file defines (MONAI would add an "
        "unknown one unused)"
    )
    indent = "  "


def _raw_overrides(argv: Sequence[str]) -> dict[str, str]:
    """``--key value`` and ``--key=value`` pairs of a ``python -m monai.bundle`` command line, as given."""
    found: dict[str, str] = {}
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--") and len(token) > 2:
            key, has_value, value = token[2:].partition("=")
            if not has_value and index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
                index += 1
                value = tokens[index]
            found[key.replace("::", "#")] = value
        index += 1
    return found


def _file_list(value: str) -> list[str]:
    """The config files of ``--config_file``: one path, a Python list literal, or comma-separated paths."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, (list, tuple)):
        return [str(item) for item in parsed]
    return [part for part in str(parsed).split(",") if part]


def _config_keys(config: Any, prefix: str = "") -> tuple[set[str], set[str], set[str]]:
    """Every key path of ``config`` (``train#dataset#data``, list items by index), the paths of its components
    (dicts with a ``_target_``, whose arguments an override may add) and the paths whose value only refers to
    another key (``"@epochs"``), which a user sets through that key: they are not suggested for a typo."""
    keys: set[str] = set()
    components: set[str] = set()
    references: set[str] = set()
    if isinstance(config, Mapping):
        if "_target_" in config:
            components.add(prefix.rstrip("#"))
        items: Any = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return keys, components, references
    for name, value in items:
        path = f"{prefix}{name}"
        keys.add(path)
        if isinstance(value, str) and value.startswith("@"):
            references.add(path)
        sub_keys, sub_components, sub_references = _config_keys(value, f"{path}#")
        keys |= sub_keys
        components |= sub_components
        references |= sub_references
    return keys, components, references


def _words(key: str) -> tuple[str, ...]:
    return tuple(word for word in _WORD_SEPARATORS.split(key.lower()) if word)


def _skipped_words(typed: Sequence[str], words: Sequence[str]) -> int | None:
    """How many of a key's ``words`` a typed key's words leave out when each typed word, in order, stands for
    one or more consecutive words by their beginnings (``lr`` for ``learning rate``, ``epoch`` for ``epochs``,
    ``lrate`` for ``learning rate``); None when the typed words cannot be read that way."""

    @cache
    def skipped(word: int, start: int, index: int) -> float:
        # typed[word][start:] is still to match, from words[index] on
        if word == len(typed):
            return len(words) - index
        if index == len(words):
            return float("inf")
        best = 1 + skipped(word, 0, index + 1) if start == 0 else float("inf")
        rest = typed[word][start:]
        for length in range(1, len(rest) + 1):
            if not words[index].startswith(rest[:length]):
                break
            done = length == len(rest)
            best = min(best, skipped(word + done, 0 if done else start + length, index + 1))
        return best

    count = skipped(0, 0, 0)
    return None if count == float("inf") else int(count)


def close_keys(key: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` known keys closest to the unknown ``key``: first those its words abbreviate (``meta_lr`` for
    ``meta_learning_rate``; at the key's own depth of ``#`` sections first, then with the fewest left-out words),
    then those close in spelling (``difflib``)."""
    known = sorted(set(known))
    typed = _words(key)
    by_words = []
    for candidate in known:
        count = _skipped_words(typed, _words(candidate)) if typed else None
        if count is not None:
            depth = abs(candidate.count("#") - key.count("#"))
            by_words.append((depth, count, -difflib.SequenceMatcher(None, key, candidate).ratio(), candidate))
    by_spelling = difflib.get_close_matches(key, known, n=n, cutoff=0.6)
    return list(dict.fromkeys([c for *_, c in sorted(by_words)] + by_spelling))[:n]


def override_problems(argv: Sequence[str]) -> list[str]:
    """The overrides on the ``monai.bundle`` command line ``argv`` (without the program) whose key no config file
    of ``--config_file`` (nor ``--args_file``) defines, each with the closest known keys. Known as well: the
    arguments of ``monai.bundle run``, the settings ``--tracking`` adds, ``_meta_`` keys, and new arguments of a
    component (a dict with ``_target_``), which MONAI passes to its constructor, so that a wrong one fails there."""
    raw = _raw_overrides(argv)
    if "args_file" in raw:
        args = ConfigParser.load_config_file(raw["args_file"])
        raw = {**{str(k): str(v) for k, v in args.items()}, **raw}
    run_arguments = set(inspect.signature(run).parameters) - {"override"}
    keys: set[str] = set(DEFAULT_MLFLOW_SETTINGS["configs"])
    components: set[str] = set()
    references: set[str] = set()
    files = _file_list(raw.get("config_file", ""))
    for file in files:
        file_keys, file_components, file_references = _config_keys(ConfigParser.load_config_file(file))
        keys |= file_keys
        components |= file_components
        references |= file_references
    problems = []
    for key in raw:
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        if key in run_arguments or key in keys or key.split("#")[0] == "_meta_" or parent in components:
            continue
        suggestible = {k for k in keys - references if not INTERNAL_KEYS.intersection(k.split("#"))}
        close = close_keys(key, suggestible | run_arguments)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        problems.append(f"--{key}: no key of that name in {', '.join(files) or 'the config files'}{hint}")
    return problems


def started_as_bundle_command(argv: Sequence[str]) -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (its ``argv[0]`` is monai/bundle/__main__.py)."""
    return bool(argv) and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def check_override_keys(argv: Sequence[str] | None = None) -> None:
    """Refuse command-line overrides of unknown keys (``--epoch 2`` for ``--epochs``): MONAI adds such a key to
    the config, where nothing reads it, and the run goes on with the default. Does nothing unless the process is
    a ``python -m monai.bundle`` command (MONAI Label and tests that run configs in-process pass no overrides on
    the command line). Raises :py:class:`OverrideError` listing every unknown key."""
    argv = sys.argv if argv is None else argv
    if not started_as_bundle_command(argv):
        return
    problems = override_problems(argv[1:])
    if problems:
        raise OverrideError(problems)
