"""Streaming aggregation of updates that cover different parts of the global model.

For every coordinate, the new value is the average of the clients that covered it, weighted by
their sample counts; coordinates nobody covered keep the previous global value. BatchNorm
running statistics are treated the same way; integer buffers (``num_batches_tracked``) take the
largest covering value. Updates are folded in one at a time: memory is a constant number of
model-sized tensors, whatever the number of clients.

Running statistics are special: a client's BatchNorm statistics for a channel describe the
activations of *its submodel*, which lacks the pruned channels upstream, so they are biased for
the dense model. With ``exact_stats`` (and the names of the statistics buffers), statistics are
taken from the updates that trained the dense model whenever at least one did, and from all
covering updates otherwise. A pruned update may then leave its statistics out
(``add_compact(..., statistics=False)``): they count as not covered.

With ``pooled_variance``, a BatchNorm variance is aggregated as the variance of the clients'
pooled activations, not the mean of their variances: the aggregator averages second moments
``var + mean^2`` (with the same weights as the means) and returns ``E[var + mean^2] - E[mean]^2``,
which adds the spread of the clients' means (large under label skew) that a plain average drops.

``uncovered_weight`` (lambda, default 0) lets a client's *uncovered* coordinates count as votes
for the current global value with lambda times its weight: 0 is the coverage-weighted mean used
by HeteroFL-style methods, 1 is FedAvg over reconstructed dense models. It is an ablation knob.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cahfp.errors import InvalidUpdate
from cahfp.pruning.extract import IndexMap, slice_tensor
from cahfp.pruning.reconstruct import Update, check_compact, compact_from_update, scatter_


class Aggregator:
    """Keeps, per coordinate, the running weighted mean of the covering clients and their total
    weight (float32, updated in place: a coordinate covered by one client gets exactly its
    value)."""

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        uncovered_weight: float = 0.0,
        stat_keys: set[str] | None = None,
        exact_stats: bool = False,
        pooled_variance: bool = False,
    ):
        if not 0 <= uncovered_weight <= 1:
            raise ValueError(f"uncovered_weight must be in [0, 1], got {uncovered_weight}")
        self.base = {k: v.detach().clone() for k, v in global_state.items()}
        # running_var key -> its running_mean key, when variances are pooled
        self.pairs = (
            {
                var_key(k): k
                for k in self.base
                if k.endswith(".running_mean") and var_key(k) in self.base
            }
            if pooled_variance
            else {}
        )
        self.folded = self._moments(self.base)  # what uncovered coordinates vote with
        self.lam = uncovered_weight
        self.mean: dict[str, torch.Tensor] = {}
        self.weight: dict[str, torch.Tensor] = {}
        self.int_max: dict[str, torch.Tensor] = {}
        for k, v in self.base.items():
            if v.is_floating_point():
                self.mean[k] = torch.zeros(v.shape, dtype=torch.float32)
                self.weight[k] = torch.zeros(v.shape, dtype=torch.float32)
        # statistics from dense updates only (small: BatchNorm buffers)
        keys = (stat_keys or set()) & set(self.mean) if exact_stats else set()
        self.dense_mean = {k: torch.zeros_like(self.mean[k]) for k in keys}
        self.dense_weight = {k: torch.zeros_like(self.weight[k]) for k in keys}
        self.count = 0
        self.total_weight = 0.0

    def _check_weight(self, weight: float) -> float:
        w = float(weight)
        if not math.isfinite(w) or w <= 0:
            raise InvalidUpdate(f"update weight must be a positive number, got {weight}")
        return w

    def _moments(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``state`` with each pooled variance replaced by its second moment ``var + mean^2``."""
        if not self.pairs:
            return state
        out = dict(state)
        for var, mean in self.pairs.items():
            if var not in state:
                continue  # statistics left out of a pruned update
            out[var] = state[var].to(torch.float32) + state[mean].to(torch.float32) ** 2
        return out

    def add(self, update: Update, weight: float) -> None:
        """Fold in a reconstructed update (``cahfp.pruning.reconstruct``: global-shaped tensors
        and coverage masks). The same fold as ``add_compact``: the kept slice is read back
        through the index map its masks describe (a mask that is not a selection of whole
        indices along each dimension is refused)."""
        compact, imap = compact_from_update(update, self.base)
        self.add_compact(compact, imap, weight)

    def add_compact(
        self,
        compact: Mapping[str, torch.Tensor],
        imap: IndexMap,
        weight: float,
        statistics: bool = True,
    ) -> None:
        """Fold in compact tensors with their index map, working on one tensor's kept slice at
        a time. Validated before anything is touched. With ``statistics=False`` a pruned update
        may leave out its BatchNorm running statistics: they count as not covered."""
        w = self._check_weight(weight)
        if not statistics and not imap:
            raise InvalidUpdate("a dense update must carry its BatchNorm statistics")
        check_compact(compact, imap, self.base, statistics)
        compact = self._moments(compact)
        for k, ref in self.folded.items():
            if k not in compact:
                continue
            dims = imap.get(k, {})
            t = compact[k].detach()
            if not imap and k in self.dense_mean:
                _fold(
                    self.dense_mean[k],
                    self.dense_weight[k],
                    t.to(torch.float32),
                    torch.full(t.shape, w),
                )
            if k not in self.mean:
                if t.numel():
                    self._int(k, t.max())
                continue
            if self.lam:  # dense: uncovered coordinates vote for the global value
                value = ref.to(torch.float32).clone()
                wc = torch.full(ref.shape, self.lam * w)
                scatter_(value, t.to(torch.float32), dims)
                scatter_(wc, torch.full(t.shape, w), dims)
                _fold(self.mean[k], self.weight[k], value, wc)
                continue
            mean, wt = slice_tensor(self.mean[k], dims), slice_tensor(self.weight[k], dims)
            _fold(mean, wt, t.to(torch.float32), torch.full(t.shape, w))
            scatter_(self.mean[k], mean, dims)
            scatter_(self.weight[k], wt, dims)
        self.count += 1
        self.total_weight += w

    def _int(self, k: str, value: torch.Tensor) -> None:
        cur = self.int_max.get(k)
        self.int_max[k] = value.clone() if cur is None else torch.maximum(cur, value)

    def partial(self) -> PartialAggregate:
        """What this aggregator has accumulated, to be merged upstream (hierarchical
        aggregation: an edge aggregator pre-averages its clients' reconstructed updates with
        their coverage weights; merging partials is exact)."""
        return PartialAggregate(
            {k: v.clone() for k, v in self.mean.items()},
            {k: v.clone() for k, v in self.weight.items()},
            {k: v.clone() for k, v in self.dense_mean.items()},
            {k: v.clone() for k, v in self.dense_weight.items()},
            {k: v.clone() for k, v in self.int_max.items()},
            self.count,
            self.total_weight,
        )

    def add_partial(self, part: PartialAggregate) -> None:
        """Fold in another aggregator's partial result (same global state and settings)."""
        for k, ref in self.base.items():
            if k in self.mean and (k not in part.mean or part.mean[k].shape != ref.shape):
                raise InvalidUpdate(f"partial aggregate lacks or mis-shapes {k}")
        for k in self.mean:
            _fold(self.mean[k], self.weight[k], part.mean[k], part.weight[k])
        for k in self.dense_mean:
            if k in part.dense_mean:
                _fold(
                    self.dense_mean[k],
                    self.dense_weight[k],
                    part.dense_mean[k],
                    part.dense_weight[k],
                )
        for k, v in part.int_max.items():
            self._int(k, v)
        self.count += part.count
        self.total_weight += part.total_weight

    def result(self) -> dict[str, torch.Tensor]:
        """The new global state (previous values where nobody covered a coordinate)."""
        out: dict[str, torch.Tensor] = {}
        covered: dict[str, torch.Tensor] = {}
        for k, ref in self.base.items():
            if k in self.dense_mean and bool((self.dense_weight[k] > 0).any()):
                covered[k] = self.dense_weight[k] > 0
                out[k] = self.dense_mean[k]
            elif k in self.mean:
                covered[k] = self.weight[k] > 0
                out[k] = torch.where(covered[k], self.mean[k], ref.to(torch.float32))
            elif k in self.int_max:
                out[k] = self.int_max[k].reshape(ref.shape)
            else:
                out[k] = ref.clone()
        for var, mean in self.pairs.items():  # second moments back to variances
            pooled = (out[var] - out[mean].to(torch.float32) ** 2).clamp_min(0)
            out[var] = torch.where(covered[var], pooled, self.base[var].to(torch.float32))
        return {k: v.to(self.base[k].dtype) for k, v in out.items()}


@dataclass
class PartialAggregate:
    """Per-coordinate weighted means and total weights of a group of updates."""

    mean: dict[str, torch.Tensor]
    weight: dict[str, torch.Tensor]
    dense_mean: dict[str, torch.Tensor]
    dense_weight: dict[str, torch.Tensor]
    int_max: dict[str, torch.Tensor]
    count: int
    total_weight: float


def _fold(mean: torch.Tensor, total: torch.Tensor, value: torch.Tensor, w: torch.Tensor):
    """In place: ``mean`` becomes the weighted mean including ``value`` with weights ``w``."""
    total.add_(w)
    mean.add_((value - mean) * (w / total.clamp_min(1e-30)))


class StatisticsPool:
    """Combines BatchNorm statistics that several clients measured on the *same* model (a
    statistics task, ``TaskMessage.purpose``) into those of their pooled data: the mean of the
    means and ``E[var + mean^2] - E[mean]^2``, weighted by the images each client measured
    (exact for the pooled activations up to the spread between a client's own batches).
    Each set is validated whole before anything is added."""

    def __init__(self, global_state: Mapping[str, torch.Tensor]):
        self.means = sorted(k for k in global_state if k.endswith(".running_mean"))
        self.shapes = {k: tuple(global_state[k].shape) for k in self.means}
        self.dtypes = {k: global_state[k].dtype for k in self.means}
        self.sum_mean: dict[str, torch.Tensor] = {}
        self.sum_square: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, stats: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add one client's statistics (``<bn>.running_mean`` and ``<bn>.running_var`` of every
        BatchNorm layer; ``num_batches_tracked`` is ignored). Raises ``InvalidUpdate``."""
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidUpdate(f"statistics weight must be a positive number, got {weight}")
        wanted = set(self.means) | {var_key(k) for k in self.means}
        present = {k for k in stats if not k.endswith(".num_batches_tracked")}
        if present != wanted:
            raise InvalidUpdate(
                f"statistics do not match the model: missing {sorted(wanted - present)[:3]}, "
                f"unknown {sorted(present - wanted)[:3]}"
            )
        checked = {}
        for k in self.means:
            mean, var = stats[k], stats[var_key(k)]
            for name, t in ((k, mean), (var_key(k), var)):
                if tuple(t.shape) != self.shapes[k] or not t.dtype.is_floating_point:
                    raise InvalidUpdate(
                        f"statistics {name} has shape {tuple(t.shape)} ({t.dtype}), "
                        f"expected {self.shapes[k]}"
                    )
                if not torch.isfinite(t).all():
                    raise InvalidUpdate(f"statistics {name} hold NaN or infinite values")
            if (var < 0).any():
                raise InvalidUpdate(f"statistics {var_key(k)} hold negative variances")
            checked[k] = (mean.double(), var.double())
        for k, (mean, var) in checked.items():
            if k in self.sum_mean:
                self.sum_mean[k] += weight * mean
                self.sum_square[k] += weight * (var + mean * mean)
            else:
                self.sum_mean[k] = weight * mean
                self.sum_square[k] = weight * (var + mean * mean)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The pooled ``running_mean`` and ``running_var`` of every layer (empty before any
        ``add``)."""
        out: dict[str, torch.Tensor] = {}
        if not self.count:
            return out
        for k in self.means:
            mean = self.sum_mean[k] / self.total_weight
            var = (self.sum_square[k] / self.total_weight - mean * mean).clamp_min(0)
            out[k] = mean.to(self.dtypes[k])
            out[var_key(k)] = var.to(self.dtypes[k])
        return out


def var_key(mean_key: str) -> str:
    """``<bn>.running_var`` for ``<bn>.running_mean``."""
    return mean_key[: -len("mean")] + "var"
