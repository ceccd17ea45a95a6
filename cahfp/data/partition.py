"""Splitting a dataset over clients: ``iid``, ``dirichlet:<alpha>``, ``shards:<k>``.

Every partitioner is deterministic under its seed and assigns each sample to exactly one client.
"""

from __future__ import annotations

import numpy as np

from cahfp.errors import ConfigError, UnknownName

PARTITIONERS = ("iid", "dirichlet:<alpha>", "shards:<k>")


def partition(
    targets, num_clients: int, spec: str, seed: int = 0, min_samples: int = 10
) -> list[np.ndarray]:
    """Indices of each client's samples (sorted), for a partition spec string."""
    labels = np.asarray(targets)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if len(labels) < num_clients:
        raise ValueError(f"{len(labels)} samples cannot be split over {num_clients} clients")
    rng = np.random.default_rng(seed)
    name, _, arg = spec.partition(":")
    if name == "iid" and not arg:
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    elif name == "dirichlet":
        alpha = _number(spec, arg, float)
        if alpha <= 0:
            raise ValueError(f"dirichlet alpha must be > 0 in {spec!r}")
        parts = dirichlet(labels, num_clients, alpha, rng, min_samples)
    elif name == "shards":
        k = _number(spec, arg, int)
        parts = shards(labels, num_clients, k, rng)
    else:
        raise UnknownName(f"unknown partition {spec!r}; known: {', '.join(PARTITIONERS)}")
    return [np.sort(p).astype(np.int64) for p in parts]


def _number(spec: str, arg: str, kind):
    try:
        return kind(arg)
    except ValueError:
        raise ValueError(f"bad partition {spec!r}: {arg!r} is not a {kind.__name__}") from None


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Per class, split its samples over clients by proportions ~ Dir(alpha); redraw until every
    client has at least ``min_samples``."""
    classes = np.unique(labels)
    min_samples = min(min_samples, len(labels) // num_clients)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_samples:
            return merged
    raise ValueError(
        f"dirichlet:{alpha} could not give every one of {num_clients} clients {min_samples} "
        f"samples in {max_tries} draws; lower min_samples or raise alpha"
    )


def shards(labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator):
    """Each client holds exactly ``k`` classes; a class's samples are split evenly among the
    clients holding it. Needs ``num_clients * k >= number of classes`` so every sample has an
    owner."""
    classes = rng.permutation(np.unique(labels))
    n_classes = len(classes)
    if not 1 <= k <= n_classes:
        raise ValueError(f"shards:{k} needs 1 <= k <= {n_classes} classes")
    if num_clients * k < n_classes:
        raise ValueError(
            f"shards:{k} with {num_clients} clients covers only {num_clients * k} "
            f"of {n_classes} classes; samples would be left unassigned"
        )
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            owners[int(classes[(client * k + j) % n_classes])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, clients in owners.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in zip(clients, np.array_split(idx, len(clients)), strict=True):
            parts[client].append(chunk)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def label_histograms(targets, parts: list[np.ndarray], num_classes: int | None = None):
    """``[clients, classes]`` array of label counts per client."""
    labels = np.asarray(targets)
    n = int(labels.max()) + 1 if num_classes is None else num_classes
    return np.stack([np.bincount(labels[p], minlength=n) for p in parts])


def skew(histograms: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the global one
    (0 = identical, 1 = disjoint)."""
    h = histograms.astype(float)
    glob = h.sum(0) / h.sum()
    local = h / np.maximum(h.sum(1, keepdims=True), 1)
    return float(0.5 * np.abs(local - glob).sum(1).mean())


def training_pool(
    n_train: int,
    seed: int,
    train_samples: int | None = None,
    eval_split: str = "test",
    eval_samples: int | None = None,
):
    """Indices (a torch tensor) of the training images the clients share, from a seeded
    permutation, and with ``eval_split="validation"`` the held-out training images to evaluate
    on instead of the test set: the last ``eval_samples`` of the same permutation, which no
    client holds. The simulation, the coordinator and ``cahfp client`` all split this way."""
    import torch

    if eval_split not in ("test", "validation"):
        raise ConfigError(f"eval split must be test or validation, got {eval_split!r}")
    pool = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    held_out = None
    if eval_split == "validation":
        if not eval_samples or eval_samples >= n_train:
            raise ConfigError(
                f"data.eval_split = validation needs data.eval_samples between 1 and {n_train - 1}"
            )
        pool, held_out = pool[: n_train - eval_samples], pool[n_train - eval_samples :]
    if train_samples:
        if train_samples > len(pool):
            raise ConfigError(
                f"data.train_samples = {train_samples} exceeds the {len(pool)} training images "
                "left for clients"
                + (" after the validation hold-out" if held_out is not None else "")
            )
        pool = pool[:train_samples]
    return pool, held_out


def client_shares(
    targets,
    num_clients: int,
    spec: str,
    seed: int,
    *,
    train_samples: int | None = None,
    eval_split: str = "test",
    eval_samples: int | None = None,
    min_samples: int = 10,
):
    """The one split of a training set over a federation: each client's image indices (torch
    tensors into the full training set) and the validation hold-out (``training_pool``, then
    ``partition`` of the pool's labels). ``targets`` is the training set's label tensor. The
    simulation, the coordinator and ``cahfp client`` all call this."""
    import torch

    pool, held_out = training_pool(len(targets), seed, train_samples, eval_split, eval_samples)
    parts = partition(targets[pool].numpy(), num_clients, spec, seed=seed, min_samples=min_samples)
    return [pool[torch.as_tensor(p)] for p in parts], held_out
