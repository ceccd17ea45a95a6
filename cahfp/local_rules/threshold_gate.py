"""FIARSE's threshold gate (Wu et al., "FIARSE: Model-Heterogeneous Federated Learning via
Importance-Aware Submodel Extraction", NeurIPS 2024), per channel: at every step each kept
channel's producing weights and biases are multiplied by ``m_c = Bern(s_c(W), theta_g)``, 1
while the channel's importance (mean ``|w|``, ``cahfp.pruning.threshold``), recomputed from
the current weights, is at least its group's threshold, else 0: a channel that falls below the
threshold drops out of the submodel for the rest of the round.

``ste``: the mask is a float whose backward is the official ``Bern.backward``, ``dm/ds =
2 theta / (s + theta)^2`` on kept channels, so the threshold function is trained through.
Without it the mask is a constant and gradients are the plain masked ones, which is what the
official code computes (its ``Bern.forward`` returns a bool tensor, so autograd never calls its
backward; docs/method.md). Channels the plan kept although below the threshold (a layer's floor,
or importance measured here on the submodel's own weights) keep gate 1."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from cahfp.errors import InvalidTask
from cahfp.pruning import find_groups
from cahfp.pruning.threshold import mean_magnitude, producing_tensors


class Bern(torch.autograd.Function):
    """``(s >= theta)`` as a float, with FIARSE's surrogate gradient ``2 theta / (s + theta)^2``
    where the mask is 1 (``theta`` a number or one per channel)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, theta) -> torch.Tensor:
        theta = torch.as_tensor(theta, dtype=scores.dtype, device=scores.device)
        mask = (scores >= theta).to(scores.dtype)
        ctx.save_for_backward(scores, mask, theta)
        return mask

    @staticmethod
    def backward(ctx, grad):
        scores, mask, theta = ctx.saved_tensors
        return grad * mask * 2 * theta / ((scores + theta) ** 2).clamp_min(1e-24), None


class ThresholdGate:
    """The ``cahfp.training.Step`` of a ``threshold-gate`` rule (deterministic: ``seed`` is
    not used)."""

    def __init__(self, rule, module: nn.Module, example: torch.Tensor, seed: int):
        groups = find_groups(module, example)
        unknown = [g.name for g in groups if g.name not in rule.thresholds]
        if unknown:
            raise InvalidTask(f"threshold-gate rule has no threshold for groups {unknown[:3]}")
        self.ste = rule.ste
        params = dict(module.named_parameters())
        producing = producing_tensors(module, groups)
        # per group: (producing tensors, size, per-channel threshold, channels gated)
        self.groups = []
        with torch.no_grad():
            for g in groups:
                theta = float(rule.thresholds[g.name])
                own = mean_magnitude(params, producing[g.gid], g.size)
                reference = own
                if g.name in rule.scores:  # the coordinator's importances of these channels
                    reference = torch.tensor(
                        rule.scores[g.name], dtype=own.dtype, device=own.device
                    )
                    if reference.shape != own.shape:
                        raise InvalidTask(
                            f"threshold-gate rule has {len(reference)} importances for group "
                            f"{g.name}, the submodel keeps {g.size} channels"
                        )
                # a channel leaves when its own importance falls by the factor that would take
                # the coordinator's below theta: theta x own / reference on the client's scale
                per_channel = theta * own / reference.clamp_min(1e-12)
                gated = reference >= theta
                if gated.any():
                    self.groups.append((producing[g.gid], g.size, per_channel, gated))
        self.dims = {key: dim for tensors, *_ in self.groups for key, dim, _, _ in tensors}

    def gates(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each gated tensor's per-index gate along its channel dimension, by name."""
        out: dict[str, torch.Tensor] = {}
        for producing, size, theta, gated in self.groups:
            if self.ste:
                s = mean_magnitude(params, producing, size)
                m = Bern.apply(s, theta)
            else:
                with torch.no_grad():
                    m = (mean_magnitude(params, producing, size) >= theta).double()
            m = torch.where(gated, m, torch.ones_like(m))
            for key, dim, idxs, root in producing:
                n = params[key].shape[dim]
                base = out.get(key, torch.ones(n, dtype=m.dtype, device=m.device))
                out[key] = base.index_copy(0, idxs.to(m.device), m[root.to(m.device)])
        return out

    def gated(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s gated tensors: each producing weight or bias times its channels' gates."""
        params = dict(model.named_parameters())
        tensors = {}
        for key, gate in self.gates(params).items():
            w, dim = params[key], self.dims[key]
            shape = [1] * w.dim()
            shape[dim] = -1
            tensors[key] = w * gate.to(w.dtype).view(shape)
        return tensors

    def __call__(self, model: nn.Module, x, y, shift) -> tuple[torch.Tensor, float]:
        out = functional_call(model, self.gated(model), (x,))
        if shift is not None:
            out = out + shift
        return torch.nn.functional.cross_entropy(out, y), 1.0
