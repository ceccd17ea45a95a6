import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cahfp.data import label_histograms, partition, skew
from cahfp.errors import UnknownName

LABELS = np.repeat(np.arange(10), 200)


def assert_exact_cover(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == n and len(np.unique(flat)) == n


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1", "dirichlet:100", "shards:2", "shards:10"])
def test_every_sample_assigned_exactly_once(spec):
    parts = partition(LABELS, 8, spec, seed=3)
    assert len(parts) == 8
    assert_exact_cover(parts, len(LABELS))


def test_dirichlet_skew_orders_with_alpha():
    low = skew(label_histograms(LABELS, partition(LABELS, 10, "dirichlet:0.1", seed=0)))
    high = skew(label_histograms(LABELS, partition(LABELS, 10, "dirichlet:100", seed=0)))
    assert low > 0.5 and high < 0.1


def test_dirichlet_minimum_samples():
    parts = partition(LABELS, 20, "dirichlet:0.1", seed=1, min_samples=30)
    assert min(len(p) for p in parts) >= 30


def test_shards_give_k_classes_per_client():
    parts = partition(LABELS, 10, "shards:3", seed=0)
    hist = label_histograms(LABELS, parts, 10)
    assert ((hist > 0).sum(1) == 3).all()


def test_same_seed_same_split_other_seed_differs():
    a = partition(LABELS, 5, "dirichlet:0.5", seed=11)
    b = partition(LABELS, 5, "dirichlet:0.5", seed=11)
    c = partition(LABELS, 5, "dirichlet:0.5", seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_bad_specs():
    with pytest.raises(UnknownName, match="iid"):
        partition(LABELS, 4, "zipf:2")
    with pytest.raises(ValueError, match="not a float"):
        partition(LABELS, 4, "dirichlet:abc")
    with pytest.raises(ValueError, match="unassigned"):
        partition(LABELS, 2, "shards:3")


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    clients=st.integers(1, 30),
    spec=st.sampled_from(["iid", "dirichlet:0.3", "dirichlet:5", "shards:5"]),
)
def test_partition_properties(seed, clients, spec):
    assume(spec != "shards:5" or clients * 5 >= 10)
    parts = partition(LABELS, clients, spec, seed=seed, min_samples=1)
    assert_exact_cover(parts, len(LABELS))
    hist = label_histograms(LABELS, parts, 10)
    assert hist.sum() == len(LABELS) and (hist.sum(0) == 200).all()


def test_a_client_holds_the_share_the_simulation_gives_it(fmnist_root):
    """``cahfp client --data fmnist --num-clients N --client-index I`` trains on exactly the
    images the simulation (and the coordinator's demo) gives client I: one split, ``client_shares``,
    validation hold-out and sample cap included."""
    import torch

    from cahfp.cli import build_parser
    from cahfp.config import load_config
    from coordinator.simulation import federation_data
    from edge_client.service import local_data

    settings = {
        "federation.clients": 3,
        "federation.seed": 4,
        "data.partition": "dirichlet:0.5",
        "data.train_samples": 3000,
        "data.eval_split": "validation",
        "data.eval_samples": 500,
        "data.data_dir": str(fmnist_root),
    }
    clients, _, _ = federation_data(load_config(None, settings))
    for index in (0, 2):
        args = build_parser().parse_args(
            f"client --broker mqtt://127.0.0.1:1 --id c{index} --data fmnist --partition "
            f"dirichlet:0.5 --num-clients 3 --client-index {index} --train-samples 3000 --seed 4 "
            f"--eval-split validation --eval-samples 500 --data-dir {fmnist_root}".split()
        )
        mine = local_data(args)
        assert len(mine) == len(clients[index])
        assert torch.equal(mine.images, clients[index].images)
        assert torch.equal(mine.targets, clients[index].targets)
    assert len(clients[0]) != len(clients[2])  # dirichlet: the shares differ
