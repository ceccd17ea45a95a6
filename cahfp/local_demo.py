"""A small in-process FedAvg federation on Fashion-MNIST (the quick-start job until the MQTT
federation lands): real data, real local training, real evaluation."""

from __future__ import annotations

import argparse
import copy

import torch
from rich.console import Console

from cahfp.data import load_dataset, partition
from cahfp.models import build_model
from cahfp.training import Recipe, evaluate, train


def run_local_demo(args: argparse.Namespace) -> int:
    console = Console()
    torch.manual_seed(args.seed)
    train_set = load_dataset("fmnist", "train", args.data_dir, args.download)
    test_set = load_dataset("fmnist", "test", args.data_dir, args.download).subset(range(2000))
    gen = torch.Generator().manual_seed(args.seed)
    pool = torch.randperm(len(train_set), generator=gen)[: args.clients * args.samples_per_client]
    parts = partition(train_set.targets[pool], args.clients, "dirichlet:0.5", seed=args.seed)
    clients = [train_set.subset(pool[p]) for p in parts]
    model = build_model("vgg11", 10, 1, width=0.25, seed=args.seed)
    recipe = Recipe(epochs=1, batch_size=32, lr=0.05)
    first = evaluate(model, test_set)
    console.print(
        f"FedAvg demo: vgg11 x0.25, {args.clients} clients "
        f"({', '.join(str(len(c)) for c in clients)} samples), "
        f"initial accuracy {first.accuracy:.3f}"
    )
    for rnd in range(1, args.rounds + 1):
        total = sum(len(c) for c in clients)
        avg = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}
        for i, data in enumerate(clients):
            local = copy.deepcopy(model)
            train(local, data, recipe, seed=args.seed * 1000 + rnd * 10 + i)
            for k, v in local.state_dict().items():
                avg[k] += v.float() * (len(data) / total)
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in avg.items()})
        res = evaluate(model, test_set)
        console.print(f"round {rnd}: test accuracy {res.accuracy:.3f}  loss {res.loss:.3f}")
    return 0
