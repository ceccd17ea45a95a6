"""The simulation job of the backend comparison, for this project and for Flower 1.42's
simulation engine, set up identically: VGG-11 x0.25 on Fashion-MNIST, 10 clients (15,000
training images), 10 rounds, FedAvg, this project's data split, initial model, recipe and
client round (``run_task``), the statistics phase off, the global model evaluated before round
1 and after every round.

``job_config()`` is the job for ``cahfp simulate``; ``job_task`` is the task this project's
engine sends a client, which Flower's client (``benchmarks.flower_app``) runs."""

from __future__ import annotations

import uuid

JOB = {
    "federation.strategy": "fedavg",
    "federation.clients": 10,
    "federation.rounds": 10,
    "federation.seed": 0,
    "model.name": "vgg11",
    "model.width": 0.25,
    "aggregation.measure_statistics": False,
    # 1500 images per client: this project's in-process round takes about the 10 s the issue
    # measured for its job (with all 60,000 a round takes about 40 s here)
    "data.train_samples": 15000,
}


def job_config(rounds: int | None = None, data_dir: str | None = None):
    from cahfp.config import load_config

    more = {"federation.rounds": rounds, "data.data_dir": data_dir}
    return load_config(None, {**JOB, **{k: v for k, v in more.items() if v is not None}})


def job_task(cfg, spec, pid: int, rnd: int):
    """The task this project's engine sends client ``pid`` in round ``rnd`` under FedAvg."""
    from cahfp.messages import TaskMessage
    from coordinator.engine import task_seed
    from coordinator.simulation import client_id

    return TaskMessage(
        task_id=uuid.uuid4().hex,
        round=rnd,
        client_id=client_id(pid),
        model=spec,
        recipe=cfg.train.recipe(),
        seed=task_seed(cfg.federation.seed, rnd, pid),
        budget=cfg.clients.settings(),
        keep=None,
        payload="state",
        deadline_s=cfg.federation.deadline_s,
    )
