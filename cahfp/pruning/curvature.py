"""Second-order estimates of the loss increase caused by removing a channel.

For channel ``c`` of a group, let ``w`` be the parameters of the group's *last affine ops* for
that channel (BatchNorm weight and bias where a BatchNorm follows the layer, else the filter and
bias). Setting ``w`` to zero removes the channel exactly, and the op's output ``y_c`` is linear
and homogeneous in ``w``, so for every sample ``x``

    g_x . w = sum over positions of y_c(x) * dL_x/dy_c(x)        (one number per sample)

is the per-sample directional derivative along ``w``, obtained from one forward and one backward
pass with hooks, without per-sample weight gradients. Then, with ``delta = -w``,

    dL ~= -g.w + 1/2 w'Hw,   g.w = E_x[g_x.w],   w'Hw ~= E_x[(g_x.w)^2]   (Fisher block)

Scores are computed with BatchNorm in eval mode (running statistics), so that samples do not
interact and per-sample gradients are well defined. See docs/method.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from cahfp.device.select import model_device
from cahfp.pruning.groups import GroupSet


@dataclass
class Terms:
    """Per group channel: ``s1`` = sum over samples of the first-order term ``g_x.w``, ``s2`` =
    sum of the curvature term, ``n`` samples; ``per_sample`` is ``[n, channels]`` (all groups'
    channels in group order) when collected."""

    s1: dict[int, torch.Tensor]
    s2: dict[int, torch.Tensor]
    n: int
    per_sample: torch.Tensor | None = None


class _Capture:
    """Forward hooks that keep each producer's output (before any in-place op downstream can
    overwrite it) and, optionally, its input."""

    def __init__(self, model: nn.Module, names: Iterable[str], keep_inputs: bool = False):
        self.outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.inputs: dict[str, list[tuple]] = defaultdict(list)
        modules = dict(model.named_modules())
        self.modules = {n: modules[n] for n in names}
        self.hooks = [
            m.register_forward_hook(self._hook(n, keep_inputs)) for n, m in self.modules.items()
        ]

    def _hook(self, name: str, keep_inputs: bool):
        def hook(_module, args, out):
            self.outputs[name].append(out)
            if keep_inputs:
                self.inputs[name].append(tuple(a.detach() for a in args))
            return out.clone()  # later in-place ops modify the clone, not the saved output

        return hook

    def clear(self) -> None:
        self.outputs.clear()
        self.inputs.clear()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _per_sample_channel(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: sum over all positions of ``y * g`` for each sample and channel (dim 1)."""
    prod = (y * g).double()
    return prod.sum(dim=tuple(range(2, prod.dim()))) if prod.dim() > 2 else prod


def _to_groups(per_module: dict[str, torch.Tensor], groups: GroupSet, batch: int):
    """Sum producer channels into their groups' channels: ``{gid: [B, size]}``."""
    out = {}
    for g in groups:
        acc = torch.zeros(batch, g.size, dtype=torch.float64)
        for p in g.producers:
            acc.index_add_(1, p.root, per_module[p.module][:, p.idxs].to(acc.device))
        out[g.gid] = acc
    return out


def directional_terms(
    model: nn.Module,
    groups: GroupSet,
    batches: Iterable,
    max_batches: int,
    collect: bool = False,
) -> Terms:
    """Per group channel: sums over samples of ``g_x.w`` and of ``(g_x.w)^2`` (the Fisher
    block); with ``collect`` also every sample's ``g_x.w``. One forward and one backward pass per
    batch."""
    producers = sorted({p.module for g in groups for p in g.producers})
    dev = model_device(model)  # batches come from the CPU
    s1 = {g.gid: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    s2 = {g.gid: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    n = 0
    rows: list[torch.Tensor] = []
    cap = _Capture(model, producers)
    try:
        for b, (x, y) in enumerate(batches):
            if b >= max_batches:
                break
            cap.clear()
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y, reduction="sum")
            saved = [(name, t) for name in producers for t in cap.outputs[name]]
            grads = torch.autograd.grad(loss, [t for _, t in saved], allow_unused=True)
            per_module: dict[str, torch.Tensor] = {}
            for (name, t), gr in zip(saved, grads, strict=True):
                a = _per_sample_channel(t.detach(), gr) if gr is not None else None
                if a is not None:
                    per_module[name] = per_module[name] + a if name in per_module else a
            for name in producers:  # a producer not reached by the loss contributes zero
                per_module.setdefault(
                    name, torch.zeros(len(y), _width(cap.modules[name]), dtype=torch.float64)
                )
            per_group = _to_groups(per_module, groups, len(y))
            for gid, a in per_group.items():
                s1[gid] += a.sum(0)
                s2[gid] += (a * a).sum(0)
            if collect:
                rows.append(torch.cat([per_group[g.gid] for g in groups], 1).float())
            n += len(y)
    finally:
        cap.close()
    return Terms(s1, s2, n, torch.cat(rows) if rows else None)


def _width(module: nn.Module) -> int:
    for attr in ("num_features", "out_channels", "out_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise ValueError(f"cannot tell the channel count of {module}")


def per_sample_param_grads(
    module: nn.Module, inputs: tuple, grad_out: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``module``'s own parameters, given its inputs and the gradient of
    the per-sample loss with respect to its output (``[B, ...]`` each)."""
    params = {k: v.detach() for k, v in module.named_parameters(recurse=False)}
    buffers = {k: v.detach() for k, v in module.named_buffers(recurse=False)}

    def contract(p, args, g):
        out = functional_call(module, (p, buffers), tuple(a.unsqueeze(0) for a in args))
        return (out * g.unsqueeze(0)).sum()

    return vmap(grad(contract), in_dims=(None, 0, 0))(params, inputs, grad_out)


def channel_dims(module: nn.Module) -> dict[str, int]:
    """For each own parameter of a producer, the dimension indexing its output channels."""
    from cahfp.pruning.groups import OUT, param_dims

    return {n: d for n, d in param_dims(module, OUT) if n in dict(module.named_parameters())}


def _reduce_to_channels(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum a ``[B, *param_shape]`` tensor to ``[B, C]`` over all but the channel dim."""
    t = t.movedim(dim + 1, 1)
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def diagonal_fisher_terms(
    model: nn.Module, groups: GroupSet, batches: Iterable, max_batches: int
) -> Terms:
    """Like ``directional_terms`` but the curvature term is the diagonal empirical Fisher,
    ``sum_i E_x[g_{x,i}^2] w_i^2``, from per-sample parameter gradients (more expensive)."""
    producers = sorted({p.module for g in groups for p in g.producers})
    dev = model_device(model)  # batches come from the CPU
    s1 = {g.gid: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    s2 = {g.gid: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    n = 0
    cap = _Capture(model, producers, keep_inputs=True)
    try:
        for b, (x, y) in enumerate(batches):
            if b >= max_batches:
                break
            cap.clear()
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y, reduction="sum")
            saved = [(name, i, t) for name in producers for i, t in enumerate(cap.outputs[name])]
            grads = torch.autograd.grad(loss, [t for *_, t in saved], allow_unused=True)
            first: dict[str, torch.Tensor] = {}
            diag: dict[str, torch.Tensor] = {}
            for (name, i, t), gr in zip(saved, grads, strict=True):
                if gr is None:
                    continue
                module = cap.modules[name]
                a = _per_sample_channel(t.detach(), gr)
                first[name] = first[name] + a if name in first else a
                per_sample = per_sample_param_grads(module, cap.inputs[name][i], gr)
                weights = dict(module.named_parameters(recurse=False))
                d = sum(
                    _reduce_to_channels(
                        per_sample[p].double() ** 2 * weights[p].detach().double() ** 2, dim
                    )
                    for p, dim in channel_dims(module).items()
                )
                diag[name] = diag[name] + d if name in diag else d
            for name in producers:
                zero = torch.zeros(len(y), _width(cap.modules[name]), dtype=torch.float64)
                first.setdefault(name, zero)
                diag.setdefault(name, zero)
            a1 = _to_groups(first, groups, len(y))
            a2 = _to_groups(diag, groups, len(y))
            for g in groups:
                s1[g.gid] += a1[g.gid].sum(0)
                s2[g.gid] += a2[g.gid].sum(0)
            n += len(y)
    finally:
        cap.close()
    return Terms(s1, s2, n)


def hutchinson_terms(
    model: nn.Module,
    groups: GroupSet,
    batches: Iterable,
    max_batches: int,
    probes: int = 4,
    seed: int = 0,
) -> Terms:
    """First-order term as above; curvature ``sum_i H_ii w_i^2`` with the Hessian diagonal of
    the mean batch loss estimated by Hutchinson's method (``E_v[v * Hv]``, Rademacher ``v``,
    ``probes`` Hessian-vector products per batch). Sums are scaled per sample like the others."""
    producers = sorted({p.module for g in groups for p in g.producers})
    dev = model_device(model)  # batches come from the CPU
    modules = dict(model.named_modules())
    params = {
        (name, pname): p
        for name in producers
        for pname, p in modules[name].named_parameters(recurse=False)
        if pname in channel_dims(modules[name])
    }
    keys = list(params)
    gen = torch.Generator().manual_seed(seed)
    grad_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    hdiag_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    n = 0
    for b, (x, y) in enumerate(batches):
        if b >= max_batches:
            break
        x, y = x.to(dev), y.to(dev)
        loss = F.cross_entropy(model(x), y)
        gs = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=True)
        acc = {k: torch.zeros_like(params[k], dtype=torch.float64) for k in keys}
        for _ in range(probes):
            # drawn on the CPU (the same probes on every device), then moved
            vs = [
                torch.randint(0, 2, p.shape, generator=gen).to(p.device, p.dtype) * 2 - 1
                for p in gs
            ]
            hv = torch.autograd.grad(
                gs, [params[k] for k in keys], grad_outputs=vs, retain_graph=True
            )
            for k, v, h in zip(keys, vs, hv, strict=True):
                acc[k] += (v * h).double() / probes
        for k, gk in zip(keys, gs, strict=True):
            grad_sum[k] += gk.detach().double() * len(y)
            hdiag_sum[k] += acc[k] * len(y)
        n += len(y)
    s1 = {g.gid: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    s2 = {g.gid: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    for (name, pname), p in params.items():
        dim = channel_dims(modules[name])[pname]
        w = p.detach().double()
        first = _reduce_to_channels((grad_sum[(name, pname)] * w).unsqueeze(0), dim)[0].cpu()
        curv = _reduce_to_channels((hdiag_sum[(name, pname)] * w * w).unsqueeze(0), dim)[0]
        curv = curv.cpu()
        for g in groups:
            for prod in g.producers:
                if prod.module == name:
                    s1[g.gid].index_add_(0, prod.root, first[prod.idxs])
                    s2[g.gid].index_add_(0, prod.root, curv[prod.idxs])
    return Terms(s1, s2, n)
