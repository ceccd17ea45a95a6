"""Server momentum: the coordinator's step on the global model (FedAvgM).

Aggregation gives the round's step ``d = aggregate - previous``. With momentum beta the global
model moves by ``m = beta * m + d`` instead, ``m`` carried from round to round (heavy ball, server
learning rate 1). Only trainable tensors move this way: BatchNorm running statistics describe the
model as it is and take the aggregate's (or the statistics phase's) values, and integer buffers
are left alone. A coordinate nobody covered this round has ``d = 0`` but still moves by
``beta * m``, as in FedAvgM.

The buffer is state of the federation, like the model: the coordinator saves it with every
checkpoint and loads it on ``--resume`` (``state`` / ``load``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cahfp.errors import CAHFPError


class ServerMomentum:
    """Heavy-ball momentum on the global model's step; beta 0 passes the aggregate through."""

    def __init__(self, beta: float, skip: set[str] | frozenset[str] = frozenset()):
        if not 0 <= beta < 1:
            raise ValueError(f"server momentum must be in [0, 1), got {beta}")
        self.beta = beta
        self.skip = set(skip)
        self.buffer: dict[str, torch.Tensor] = {}

    def _moves(self, key: str, value: torch.Tensor) -> bool:
        return key not in self.skip and value.is_floating_point()

    def step(
        self, previous: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next global state from the previous one and the round's aggregate."""
        out = dict(new)
        if self.beta == 0:
            return out
        for k, v in new.items():
            if not self._moves(k, v):
                continue
            base = previous[k].to(torch.float32)
            d = v.to(torch.float32) - base
            m = self.buffer.get(k)
            self.buffer[k] = d if m is None else m.mul_(self.beta).add_(d)
            out[k] = (base + self.buffer[k]).to(v.dtype)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The buffer, for a checkpoint (empty before the first step or with beta 0)."""
        return {f"momentum/{k}": v for k, v in self.buffer.items()}

    def load(self, saved: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> None:
        """Restore a checkpoint's buffer, checked against the global model's tensors; nothing
        changes if any entry is unknown, mis-shaped or not finite."""
        buffer = {}
        for name, t in saved.items():
            key = name.removeprefix("momentum/")
            ref = model.get(key)
            if not name.startswith("momentum/") or ref is None or not self._moves(key, ref):
                raise CAHFPError(f"momentum checkpoint has an entry {name!r} the model lacks")
            if t.shape != ref.shape or not t.is_floating_point() or not torch.isfinite(t).all():
                raise CAHFPError(
                    f"momentum checkpoint entry {name!r} is mis-shaped or not finite "
                    f"({tuple(t.shape)} against the model's {tuple(ref.shape)})"
                )
            buffer[key] = t.to(torch.float32).clone()
        self.buffer = buffer
