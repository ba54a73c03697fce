"""The tiny-model configuration overrides that keep a real training run to seconds, defined once for all tests.

Tests import it like ``tables`` (``from tiny import TINY_MODEL, set_args``): ``tests/`` is on ``sys.path``
because pytest's default ``prepend`` import mode inserts the directory of ``tests/conftest.py`` (a folder
without ``__init__.py``) before collecting, which also covers ``tests/reliability/``.

Three spellings are in use:

* ``KEY=VALUE`` overrides (:meth:`everest.config.EverestConfig.with_overrides`, the flow's ``overrides``
  parameter): :data:`TINY_MODEL` itself, or :func:`overrides` with extra settings appended;
* ``--set=KEY=VALUE`` command-line arguments: :func:`set_args`;
* ``"--set", "KEY=VALUE"`` argument pairs: :func:`set_pairs`.
"""

from __future__ import annotations

from collections.abc import Iterable

TINY_MODEL: tuple[str, ...] = ("model.embed_dim=16", "model.ff_dim=32", "model.num_blocks=1", "model.num_heads=2")
"""A narrow one-block model (the architecture, nothing about training): a tuple, so no test can change it."""

ONE_THREAD = "train.num_threads=1"
BATCH_256 = "train.batch_size=256"


def overrides(*extra: str) -> list[str]:
    """``KEY=VALUE`` overrides: the tiny model, then ``extra`` (later settings win), as a fresh list."""
    return [*TINY_MODEL, *extra]


def set_args(items: Iterable[str] = TINY_MODEL) -> list[str]:
    """``items`` as ``--set=KEY=VALUE`` command-line arguments (``everest train``, ``python -m flows.production``)."""
    return [f"--set={o}" for o in items]


def set_pairs(items: Iterable[str] = TINY_MODEL) -> list[str]:
    """``items`` as ``"--set", "KEY=VALUE"`` argument pairs (job scripts that pass their arguments on)."""
    return [a for o in items for a in ("--set", o)]
