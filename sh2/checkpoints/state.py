"""Lazily converted state dicts and their validation against a config or a model.

Converting a checkpoint (permuting rows, flipping filters) would, done eagerly, hold a second copy of
most of the model. Instead a converter returns a :class:`LazyStateDict`: for every sh2 key the target
shape and a function producing the tensor. :func:`sh2.checkpoints.load_into` validates every shape first
and then materialises and copies one tensor at a time, so the peak overhead is one tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sh2.checkpoints.files import CheckpointError, CheckpointHint
from sh2.models.config import SH2Config


@dataclass
class LazyTensor:
    """A tensor to be produced on demand: its final ``shape``, the checkpoint key it comes from and ``make``."""

    shape: tuple[int, ...]
    source: str
    make: Callable[[], torch.Tensor]

    def __call__(self) -> torch.Tensor:
        out = self.make()
        if tuple(out.shape) != self.shape:  # a converter bug, not a user error
            raise AssertionError(f"{self.source}: produced shape {tuple(out.shape)}, planned {self.shape}")
        return out


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping ``sh2 key -> tensor`` whose values are converted when accessed."""

    def __init__(self, entries: dict[str, LazyTensor] | None = None) -> None:
        self.entries: dict[str, LazyTensor] = dict(entries or {})

    def add(self, key: str, shape: tuple[int, ...], source: str, make: Callable[[], torch.Tensor]) -> None:
        self.entries[key] = LazyTensor(tuple(int(s) for s in shape), source, make)

    def add_tensor(self, key: str, tensor: torch.Tensor, source: str) -> None:
        self.add(key, tuple(tensor.shape), source, lambda: tensor)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.entries[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def source(self, key: str) -> str:
        return self.entries[key].source

    def materialize(self) -> dict[str, torch.Tensor]:
        """Every tensor converted (holds a converted copy of the permuted tensors)."""
        return {k: e() for k, e in self.entries.items()}


def as_lazy(state_dict: Mapping[str, torch.Tensor]) -> LazyStateDict:
    """Wrap a plain state dict (sources are the keys themselves)."""
    if isinstance(state_dict, LazyStateDict):
        return state_dict
    out = LazyStateDict()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out.add_tensor(key, value, key)
    return out


def expected_shapes(config: SH2Config) -> dict[str, tuple[int, ...]]:
    """The sh2 state-dict keys and shapes of a model with this config (without building it)."""
    from sh2.models.model import SH2Model

    with torch.device("meta"), _outside_zero_init():
        model = SH2Model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@contextmanager
def _outside_zero_init() -> Iterator[None]:
    """Suspend an active ``deepspeed.zero.Init`` (ZeRO-3 ``configure_model``, where init_from is loaded).

    Inside it, every module built is partitioned and materialised, the meta device notwithstanding: the
    shape model above would report empty shapes and allocate its parameters.
    """
    global _suspended
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if zero is None or _suspended:  # nested: the outermost call restores
        yield
        return
    zero.shutdown_init_context()
    _suspended = True
    try:
        yield
    finally:
        _suspended = False
        zero.restore_init_context()


_suspended = False


def check_state(shapes: Mapping[str, tuple[int, ...]], state: LazyStateDict, what: str) -> None:
    """Check that ``state`` has exactly the keys of ``shapes`` with the same shapes.

    Raises:
        CheckpointError: naming the first mismatching key (in model order), the checkpoint key it was
            read from, and both shapes; or the first missing / unexpected key.
    """
    for key, shape in shapes.items():
        if key not in state:
            raise CheckpointError(f"{what}: missing key {key!r} (expected shape {list(shape)}); the checkpoint "
                                  f"does not contain this layer or parameter: is the config right?",
                                  hints=[CheckpointHint.MATCH_ARCHITECTURE])
        got = state.shape(key)
        if tuple(got) != tuple(shape):
            src = state.source(key)
            origin = f" (read from checkpoint key {src!r})" if src != key else ""
            raise CheckpointError(f"{what}: shape mismatch at {key!r}{origin}: checkpoint has {list(got)}, the "
                                  f"model expects {list(shape)}", hints=[CheckpointHint.MATCH_ARCHITECTURE])
    extra = [k for k in state if k not in shapes]
    if extra:
        raise CheckpointError(f"{what}: unexpected key {extra[0]!r} (from {state.source(extra[0])!r}; "
                              f"{len(extra)} unexpected in total); the checkpoint has parameters this config "
                              f"does not (layer count or operator layout differ?)",
                              hints=[CheckpointHint.MATCH_ARCHITECTURE])
