"""Coupled channel groups of a network, found with Torch-Pruning's ``DependencyGraph``.

A *group* is every slice of every layer tied to one set of channels: a convolution's output
filters, its BatchNorm, the next layers' input channels, and all layers joined to them through
residual additions or concatenations. Pruning channel ``i`` of a group removes index ``i`` from
all of them at once. Groups are described by module *names*, so one ``GroupSet`` applies to any
model with the same structure (the global model, a client's copy, a checkpoint).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from cahfp.costs import training_flops_by_module
from cahfp.device.select import model_device
from cahfp.errors import UnsupportedModel

OUT, IN = "out", "in"


@dataclass(frozen=True)
class Member:
    """One layer's share of a group: the indices along its output (``out``) or input (``in``)
    channel dimension, and for each of them the group channel (``root``) it belongs to."""

    module: str
    role: str
    idxs: torch.Tensor
    root: torch.Tensor


@dataclass
class ChannelGroup:
    gid: int
    name: str  # the root layer
    size: int  # number of channels
    members: list[Member]
    producers: list[Member]  # last affine ops whose output carries the group's channels


@dataclass
class GroupSet:
    groups: list[ChannelGroup]
    ignored: list[str]  # layers whose outputs are never pruned (the classifier)
    dim_sizes: dict[tuple[str, str], int]  # (module, role) -> channel count
    flops: dict[str, float]  # dense training FLOPs per sample of each module
    total_flops: float
    depthwise: set[str] = field(default_factory=set)
    # parameters of each module: (count scaling with its output and input channels, count
    # scaling with its output channels only: biases, BatchNorm)
    params: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def num_channels(self) -> int:
        return sum(g.size for g in self.groups)


def param_dims(module: nn.Module, role: str) -> list[tuple[str, int]]:
    """Which tensors of ``module`` (by attribute name) a channel slice of ``role`` cuts, and
    along which dimension."""
    if isinstance(module, _ConvNd):
        if module.groups > 1 and not is_depthwise(module):
            raise UnsupportedModel(
                f"grouped convolution {module} (groups={module.groups}) cannot be channel-pruned; "
                "only groups=1 and depthwise convolutions are supported"
            )
        if is_depthwise(module):
            dims = [("weight", 0), ("bias", 0)]
        elif role == OUT:
            dims = [("weight", 1 if module.transposed else 0), ("bias", 0)]
        else:
            dims = [("weight", 0 if module.transposed else 1)]
    elif isinstance(module, nn.Linear):
        dims = [("weight", 0), ("bias", 0)] if role == OUT else [("weight", 1)]
    elif isinstance(module, _BatchNorm):
        dims = [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
    elif not any(True for _ in module.parameters(recurse=False)) and not list(
        module.buffers(recurse=False)
    ):
        dims = []
    else:
        raise UnsupportedModel(
            f"layer type {type(module).__name__} cannot be channel-pruned (supported: Conv, "
            "ConvTranspose, depthwise Conv, Linear, BatchNorm and parameter-free layers)"
        )
    return [(n, d) for n, d in dims if getattr(module, n, None) is not None]


def is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, _ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def resize_module(module: nn.Module) -> None:
    """Update a layer's size attributes after its tensors were sliced."""
    if isinstance(module, _ConvNd):
        w = module.weight
        out_c = w.shape[1] * module.groups if module.transposed else w.shape[0]
        if is_depthwise(module) or (module.groups > 1 and w.shape[0] != module.out_channels):
            module.groups = module.in_channels = module.out_channels = w.shape[0]
            return
        in_c = w.shape[0] if module.transposed else w.shape[1] * module.groups
        module.out_channels, module.in_channels = out_c, in_c
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _BatchNorm):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Layers whose output units are the model's outputs (never pruned): a registered model's
    ``classifier``, else the last Conv/Linear producing as many channels as the model outputs."""
    names = {m: n for n, m in model.named_modules()}
    if isinstance(getattr(model, "classifier", None), (nn.Linear, _ConvNd)):
        return [names[model.classifier]]
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _a, out: order.append((names[mod], out)))
        for m in model.modules()
        if isinstance(m, (nn.Linear, _ConvNd))
    ]
    try:
        with torch.no_grad():
            out = model(example_input)
    finally:
        for h in hooks:
            h.remove()
    for name, tensor in reversed(order):
        if tensor is out or tensor.shape[1] == out.shape[1]:
            return [name]
    raise UnsupportedModel("could not find the output layer; pass ignored_layers=[name]")


_CACHE: OrderedDict[tuple, GroupSet] = OrderedDict()
CACHE_SIZE = 64  # structures kept (FIARSE's submodels change every round: bounded memory)


def structure_key(model: nn.Module, example_input: torch.Tensor) -> tuple:
    """What decides a model's groups and FLOPs: its class, its layers' settings (``repr``:
    strides, kernels, groups, which parameter-free layers an ``nn.Sequential`` holds), its
    tensor shapes and the input shape."""
    return (
        type(model).__module__,
        type(model).__qualname__,
        repr(model),
        tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()),
        tuple(example_input.shape[1:]),
    )


def find_groups(
    model: nn.Module, example_input: torch.Tensor, ignored_layers: list[str] | None = None
) -> GroupSet:
    """All prunable channel groups of ``model`` (cached per structure)."""
    key = (*structure_key(model, example_input), tuple(ignored_layers or ()))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    _CACHE[key] = groups = _build(model, example_input, ignored_layers)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)  # the least recently used structure
    return groups


def _build(model: nn.Module, x: torch.Tensor, ignored_layers: list[str] | None) -> GroupSet:
    x = x.to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        ignored = list(ignored_layers) if ignored_layers else output_layers(model, x)
        mods = dict(model.named_modules())
        missing = [n for n in ignored if n not in mods]
        if missing:
            raise UnsupportedModel(f"ignored layers not in the model: {missing}")
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
        raw = list(
            dg.get_all_groups(
                ignored_layers=[mods[n] for n in ignored],
                root_module_types=(_ConvNd, nn.Linear),
            )
        )
        names = {m: n for n, m in model.named_modules()}
        groups = [_convert(i, g, dg, names) for i, g in enumerate(raw)]
    finally:
        model.train(was_training)
    dim_sizes: dict[tuple[str, str], int] = {}
    depthwise = {n for n, m in mods.items() if is_depthwise(m)}
    for g in groups:
        for mem in g.members:
            m = mods[mem.module]
            dims = param_dims(m, mem.role)  # raises on unsupported layers
            if dims:
                name, dim = dims[0]
                dim_sizes[(mem.module, mem.role)] = getattr(m, name).shape[dim]
    flops = training_flops_by_module(model, x)
    params = {}
    for name, m in mods.items():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        weight = own.get("weight")
        scaled_both = isinstance(m, (_ConvNd, nn.Linear)) and weight is not None
        full = weight.numel() if scaled_both else 0
        params[name] = (float(full), float(sum(p.numel() for p in own.values()) - full))
    return GroupSet(groups, ignored, dim_sizes, flops, sum(flops.values()), depthwise, params)


def _convert(gid: int, group, dg, names: dict) -> ChannelGroup:
    members: dict[tuple[str, str], Member] = {}
    for item in group.items:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or module not in names:
            continue
        if not any(True for _ in module.parameters(recurse=False)) and not list(
            module.buffers(recurse=False)
        ):
            continue  # element-wise, reshape, pooling...: nothing to slice
        handler = item.dep.handler.__name__
        role = IN if handler == "prune_in_channels" else OUT
        if isinstance(module, _BatchNorm):
            role = OUT
        key = (names[module], role)
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        if key in members:  # the same slice reached twice: merge
            old = members[key]
            idxs, root = torch.cat([old.idxs, idxs]), torch.cat([old.root, root])
            uniq, pos = _unique_first(idxs)
            idxs, root = uniq, root[pos]
        members[key] = Member(names[module], role, idxs, root)
    root_item = group.items[0]
    root_name = names[root_item.dep.target.module]
    size = len(root_item.idxs)
    producers = _producers(list(members.values()), dg, names)
    if not producers:
        raise UnsupportedModel(f"channel group rooted at {root_name} has no producing layer")
    return ChannelGroup(gid, root_name, size, list(members.values()), producers)


def _unique_first(idxs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen: dict[int, int] = {}
    for pos, v in enumerate(idxs.tolist()):
        seen.setdefault(v, pos)
    return torch.tensor(list(seen), dtype=torch.long), torch.tensor(list(seen.values()))


def _producers(members: list[Member], dg, names: dict) -> list[Member]:
    """The last affine op of each layer that writes the group's channels: a BatchNorm fed
    directly by a member Conv/Linear, else the Conv/Linear itself."""
    by_name = {m.module: m for m in members if m.role == OUT}
    modules = {n: m for m, n in names.items()}
    result = []
    for mem in by_name.values():
        module = modules[mem.module]
        node = dg.module2node.get(module)
        if isinstance(module, _BatchNorm):
            fed_by = [i.module for i in node.inputs] if node else []
            if any(names.get(f) in by_name and not isinstance(f, _BatchNorm) for f in fed_by):
                result.append(mem)
        elif isinstance(module, (_ConvNd, nn.Linear)):
            feeds = [o.module for o in node.outputs] if node else []
            if not any(isinstance(f, _BatchNorm) and names.get(f) in by_name for f in feeds):
                result.append(mem)
    return result
