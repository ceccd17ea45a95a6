"""Building the physically smaller submodel of a plan, and the index map that ties it to the
global model: for every sliced tensor, the kept global indices along each sliced dimension."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from cahfp.pruning.groups import GroupSet, param_dims, resize_module
from cahfp.pruning.plan import Plan

IndexMap = dict[str, dict[int, torch.Tensor]]


@dataclass
class Submodel:
    module: nn.Module
    index_map: IndexMap
    plan: Plan | None = None


def index_map_for(model_or_state, groups: GroupSet, keep: dict[int, torch.Tensor]) -> IndexMap:
    """Index map of keeping ``keep[gid]`` channels of each group. ``model_or_state`` is the
    global model (or any model of the same structure)."""
    modules = dict(model_or_state.named_modules())
    pruned: dict[tuple[str, str], set[int]] = {}
    for g in groups:
        drop = torch.ones(g.size, dtype=torch.bool)
        drop[keep[g.gid]] = False
        for mem in g.members:
            sel = mem.idxs[drop[mem.root]]
            if len(sel):
                pruned.setdefault((mem.module, mem.role), set()).update(sel.tolist())
    drops: dict[str, dict[int, set[int]]] = {}
    sizes: dict[str, torch.Size] = {}
    for (module_name, role), drop_idx in pruned.items():
        module = modules[module_name]
        for pname, dim in param_dims(module, role):
            key = f"{module_name}.{pname}" if module_name else pname
            sizes[key] = getattr(module, pname).shape
            drops.setdefault(key, {}).setdefault(dim, set()).update(drop_idx)
    imap: IndexMap = {}
    for key, dims in drops.items():
        imap[key] = {
            dim: torch.tensor(sorted(set(range(sizes[key][dim])) - dropped), dtype=torch.long)
            for dim, dropped in sorted(dims.items())
        }
    return imap


def kept_channels(model: nn.Module, groups: GroupSet, imap: IndexMap) -> dict[int, torch.Tensor]:
    """The inverse view of an index map: the kept channels of every group (all of them where
    the map does not slice the group)."""
    from cahfp.pruning.groups import OUT

    modules = dict(model.named_modules())
    out = {}
    for g in groups:
        kept = torch.arange(g.size)
        for mem in g.members:
            if mem.role != OUT:
                continue
            dims = dict(param_dims(modules[mem.module], OUT))
            key = f"{mem.module}.weight" if mem.module else "weight"
            if "weight" in dims and dims["weight"] in imap.get(key, {}):
                idx = imap[key][dims["weight"]]
                kept = torch.unique(mem.root[torch.isin(mem.idxs, idx)])
                break
        out[g.gid] = kept
    return out


def same_index_map(a: IndexMap, b: IndexMap) -> bool:
    """Whether two index maps keep exactly the same indices of the same tensors."""
    if a.keys() != b.keys():
        return False
    for key, dims in a.items():
        if dims.keys() != b[key].keys():
            return False
        if any(not torch.equal(idx, b[key][d]) for d, idx in dims.items()):
            return False
    return True


def slice_tensor(t: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    for dim, idx in sorted(dims.items()):
        t = t.index_select(dim, idx.to(t.device))
    return t


def extract(model: nn.Module, plan: Plan) -> Submodel:
    """A new, smaller module keeping the plan's channels; ``model`` is not modified."""
    imap = index_map_for(model, plan.groups, plan.kept)
    return Submodel(build_compact(model, imap), imap, plan)


def build_compact(model: nn.Module, imap: IndexMap) -> nn.Module:
    """Copy ``model`` with every tensor in ``imap`` sliced to its kept indices."""
    sub = copy.deepcopy(model)
    modules = dict(sub.named_modules())
    touched = set()
    for key, dims in imap.items():
        module_name, _, attr = key.rpartition(".")
        module = modules[module_name]
        old = getattr(module, attr)
        new = slice_tensor(old.detach(), dims).clone()
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module.register_buffer(attr, new)
        touched.add(module_name)
    for name in touched:
        resize_module(modules[name])
    return sub
