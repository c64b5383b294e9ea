"""Which parameters a probe reads and how they lie in its flat buffers.

``select_parameters`` resolves a parameter spec; ``FlatLayout`` lays the chosen parameters end to end in one flat
vector (the target gradient, part means, per-group sums all use it) and copies gradients into and out of it - over
whole parameters, or over this rank's local shards of FSDP2 ``DTensor`` parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeGuard, cast

import torch
from torch import nn

__all__ = [
    "FlatLayout",
    "ParameterSpec",
    "flat_dtype",
    "is_ddp",
    "is_dtensor",
    "local_shard",
    "select_parameters",
    "single_device",
    "unwrap",
]

ParameterSpec = None | str | Sequence[str] | Callable[[str, nn.Parameter], bool]


def is_ddp(model: nn.Module) -> TypeGuard[nn.parallel.DistributedDataParallel]:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return cast(nn.Module, model.module) if is_ddp(model) else model


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def is_dtensor(t: torch.Tensor) -> bool:
    return callable(getattr(t, "to_local", None)) and hasattr(t, "device_mesh")


def select_parameters(module: nn.Module, spec: ParameterSpec = None) -> list[tuple[str, nn.Parameter]]:
    """Resolve a parameter spec to ``(name, parameter)`` pairs of trainable parameters, in ``named_parameters`` order.

    ``spec``: None (all trainable parameters); a list of name prefixes (``"head"`` matches ``head.weight`` but not
    ``header.weight``); a predicate ``(name, param) -> bool``; or ``"last:N"`` (the last N trainable parameter
    tensors: the layers nearest the loss, a cheap proxy for big models). Raises ``ValueError`` if a prefix matches
    no parameter or the selection is empty.
    """
    named = list(module.named_parameters())
    trainable = [(name, p) for name, p in named if p.requires_grad]
    if spec is None:
        chosen = trainable
    elif isinstance(spec, str):
        if not spec.startswith("last:"):
            raise ValueError(
                f"parameters={spec!r}: a string must be 'last:N'; pass a list of name prefixes to select by name"
            )
        try:
            count = int(spec[len("last:") :])
        except ValueError:
            raise ValueError(f"parameters={spec!r}: N in 'last:N' must be a positive integer") from None
        if count < 1:
            raise ValueError(f"parameters={spec!r}: N in 'last:N' must be a positive integer")
        chosen = trainable[-count:]
    elif callable(spec):
        chosen = [(name, p) for name, p in trainable if spec(name, p)]
    else:
        prefixes = list(spec)
        if not prefixes or not all(isinstance(prefix, str) for prefix in prefixes):
            raise ValueError(f"parameters={spec!r}: expected a non-empty list of parameter-name prefixes")

        def matches(name: str, prefix: str) -> bool:
            stripped = prefix.rstrip(".")
            return name == stripped or name.startswith(stripped + ".")

        for prefix in prefixes:
            if not any(matches(name, prefix) for name, _ in named):
                known = ", ".join(name for name, _ in named[:8])
                raise ValueError(
                    f"parameters: no parameter is named {prefix!r} or starts with it (model has: {known}"
                    f"{', ...' if len(named) > 8 else ''})"
                )
            if not any(matches(name, prefix) for name, _ in trainable):
                raise ValueError(f"parameters: {prefix!r} selects only frozen parameters (requires_grad=False)")
        chosen = [(name, p) for name, p in trainable if any(matches(name, prefix) for prefix in prefixes)]
    if not chosen:
        raise ValueError(f"parameters={spec!r} selects no trainable parameter of the model")
    return chosen


def single_device(named: Sequence[tuple[str, nn.Parameter]]) -> torch.device:
    """The one device the parameters live on (``ValueError`` if several)."""
    devices = {p.device for _, p in named}
    if len(devices) > 1:
        raise ValueError(
            f"probed parameters live on several devices {sorted(map(str, devices))}; "
            "select a subset on one device (parameters=...)"
        )
    return devices.pop()


def flat_dtype(parameters: Iterable[nn.Parameter]) -> torch.dtype:
    """float64 if any parameter is float64, else float32: the dtype of a probe's flat buffers."""
    return torch.float64 if torch.float64 in {p.dtype for p in parameters} else torch.float32


class FlatLayout:
    """Parameters laid end to end in one flat vector; iterating gives ``(name, parameter, offset)``.

    ``shards=True``: each parameter takes the size of its local shard (FSDP2 ``DTensor``) and gradients are read
    from the local shard, so the flat vector is this rank's part of the full one.
    """

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]], *, shards: bool = False) -> None:
        self.shards = shards
        self.entries: list[tuple[str, nn.Parameter, int]] = []
        self.sizes: list[int] = []
        offset = 0
        for name, p in named:
            size = local_shard(p.detach()).numel() if shards else p.numel()
            self.entries.append((name, p, offset))
            self.sizes.append(size)
            offset += size
        self.numel = offset

    def __iter__(self) -> Iterator[tuple[str, nn.Parameter, int]]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p, _ in self.entries]

    def fill(self, buffer: torch.Tensor, tensors: Iterable[torch.Tensor | None]) -> None:
        """Copy one tensor per parameter into its slice of ``buffer`` (zeros where None)."""
        for (_, _, offset), size, t in zip(self.entries, self.sizes, tensors):
            view = buffer[offset : offset + size]
            if t is None:
                view.zero_()
            else:
                view.copy_((local_shard(t) if self.shards else t).reshape(-1))

    def snapshot_grad(self, buffer: torch.Tensor) -> None:
        """buffer <- the current ``.grad`` (zeros where None)."""
        with torch.no_grad():
            self.fill(buffer, [p.grad for _, p, _ in self.entries])

    def grad_minus(self, buffer: torch.Tensor) -> None:
        """buffer <- current ``.grad`` - buffer (the snapshot), in place."""
        for (_, p, offset), size in zip(self.entries, self.sizes):
            view = buffer[offset : offset + size]
            view.neg_()
            if p.grad is not None:
                view.add_((local_shard(p.grad) if self.shards else p.grad).reshape(-1))
