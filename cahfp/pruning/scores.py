"""Channel significance scores behind one interface (higher = more important = kept first).

* ``curvature`` (CA-HFP): ``|-g.w + 1/2 w'Fw|`` with the group's Fisher block (default), or the
  diagonal empirical Fisher / Hutchinson diagonal for ablations; first-order term optional.
* ``taylor``: first-order ``|g.w|`` for the same ``w``.
* ``magnitude``: L1 norm of the group's producing filters.
* ``random``: seeded uniform noise.
* ``ordered`` (HeteroFL): the first channels.
* ``rolling`` (FedRolex): a window of channels that advances by one each round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch import nn

from cahfp.errors import UnknownName
from cahfp.pruning import curvature
from cahfp.pruning.groups import OUT, GroupSet, find_groups, param_dims

METHODS = ("curvature", "magnitude", "taylor", "random", "ordered", "rolling")
CURVATURES = ("fisher-block", "diag-fisher", "hutchinson")
LOSS_BASED = ("curvature", "taylor")  # scores in loss units: comparable across layers


@dataclass
class Scores:
    """One score per channel of each group: ``values[gid]`` is a float64 tensor ``[size]``.
    Curvature scores also keep ``directional``, every scoring sample's ``g_x.w`` for every
    channel (``[samples, channels]``, groups in order), from which the planner evaluates the
    second-order loss of removing channels together."""

    groups: GroupSet
    values: dict[int, torch.Tensor]
    method: str
    info: dict = field(default_factory=dict)
    directional: torch.Tensor | None = None

    def flat(self) -> torch.Tensor:
        return torch.cat([self.values[g.gid] for g in self.groups])


def score_groups(
    model: nn.Module,
    batches: Iterable | None = None,
    method: str = "curvature",
    example_input: torch.Tensor | None = None,
    *,
    round_idx: int = 0,
    seed: int = 0,
    num_batches: int = 4,
    curvature_kind: str = "fisher-block",
    first_order: bool = True,
    probes: int = 4,
    ignored_layers: list[str] | None = None,
) -> Scores:
    """Score every channel of every coupled group of ``model`` on local ``batches``
    (``(inputs, targets)`` pairs; only the first ``num_batches`` are used). The model's
    parameters, gradients and training mode are left as they were."""
    if method not in METHODS:
        raise UnknownName(f"unknown scoring method {method!r}; known: {', '.join(METHODS)}")
    batches = iter(batches) if batches is not None else iter(())
    first = next(batches, None)
    if example_input is None:
        if first is None:
            raise ValueError("score_groups needs example_input or at least one batch")
        example_input = first[0][:2]
    groups = find_groups(model, example_input, ignored_layers)
    data = [first, *islice(batches, num_batches - 1)] if first is not None else []
    start = time.perf_counter()
    info: dict = {"method": method}
    directional = None
    if method in LOSS_BASED:
        if not data:
            raise ValueError(f"{method} scores need local data batches")
        values, info2, directional = _loss_based(
            model, groups, data, method, curvature_kind, first_order, probes, seed
        )
        info.update(info2)
    elif method == "magnitude":
        values = _magnitude(model, groups)
    elif method == "random":
        gen = torch.Generator().manual_seed(seed)
        values = {g.gid: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in groups}
    elif method == "ordered":
        values = {g.gid: torch.arange(g.size, 0, -1, dtype=torch.float64) for g in groups}
    else:  # rolling
        values = {}
        for g in groups:
            offset = (torch.arange(g.size) - round_idx) % g.size
            values[g.gid] = (g.size - offset).to(torch.float64)
    info["seconds"] = time.perf_counter() - start
    return Scores(groups, values, method, info, directional)


def _loss_based(model, groups, data, method, kind, first_order, probes, seed):
    if kind not in CURVATURES:
        raise UnknownName(f"unknown curvature estimate {kind!r}; known: {', '.join(CURVATURES)}")
    was_training = model.training
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.eval()
    try:
        if method == "taylor" or kind == "fisher-block":
            collect = method == "curvature"
            terms = curvature.directional_terms(model, groups, data, len(data), collect)
        elif kind == "diag-fisher":
            terms = curvature.diagonal_fisher_terms(model, groups, data, len(data))
        else:
            terms = curvature.hutchinson_terms(model, groups, data, len(data), probes, seed)
    finally:
        model.train(was_training)
        for name, p in model.named_parameters():
            p.grad = grads[name]
    s1, s2, n = terms.s1, terms.s2, terms.n
    values = {}
    for g in groups:
        gw = s1[g.gid] / n  # g.w: mean directional derivative
        if method == "taylor":
            values[g.gid] = gw.abs()
            continue
        curv = 0.5 * s2[g.gid] / n  # 1/2 w'Hw
        values[g.gid] = (curv - gw).abs() if first_order else curv.abs()
    info = {
        "samples": n,
        "batches": len(data),
        "curvature": kind if method == "curvature" else None,
        "first_order": first_order,
    }
    return values, info, terms.per_sample


def _magnitude(model: nn.Module, groups: GroupSet) -> dict[int, torch.Tensor]:
    """L1 norm of each channel's filters over every Conv/Linear that produces the group."""
    modules = dict(model.named_modules())
    values = {}
    for g in groups:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for mem in g.members:
            module = modules[mem.module]
            if mem.role != OUT or not hasattr(module, "weight") or module.weight is None:
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            dim = dict(param_dims(module, OUT))["weight"]
            w = module.weight.detach().abs().double().movedim(dim, 0)
            l1 = w.reshape(w.shape[0], -1).sum(1)
            acc.index_add_(0, mem.root, l1[mem.idxs].cpu())
        values[g.gid] = acc
    return values
