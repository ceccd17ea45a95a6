"""Flower 1.42's run of the backend-comparison job (``benchmarks.flower_job``). It runs only in
the separate Flower virtualenv that ``benchmarks.simulation_backends`` makes, where this
project is installed beside ``flwr[simulation]``:

    .venv-flower/bin/python -m benchmarks.flower_app OUT_DIR [--client-cpus N] [--rounds R]

The ServerApp runs Flower's FedAvg from this project's initial model with central evaluation on
this project's test split; each ClientApp runs this project's client round (``run_task``) on its
client's share. It writes ``OUT_DIR/flower.json`` (a timestamp after each evaluation, and the
accuracies) and ``OUT_DIR/first_update.safetensors``, the update client 0 sent in round 1, which
the driver compares byte for byte with this project's."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from benchmarks.flower_job import job_config, job_task
from cahfp.client_round import ClientState, run_task
from cahfp.models import build_model
from cahfp.training import evaluate
from cahfp.wire import decode_update, encode_update
from coordinator.simulation import client_id, federation_data

OUT = "CAHFP_FLOWER_OUT"  # where both apps write (an environment variable: Ray's workers see it)
ROUNDS = "CAHFP_FLOWER_ROUNDS"
_cache: dict = {}  # per process: the federation's data and each client's state


def _cfg():
    return job_config(int(os.environ[ROUNDS]) if os.environ.get(ROUNDS) else None)


def _data():
    if "clients" not in _cache:
        _cache["clients"], _cache["test"], _cache["spec"] = federation_data(_cfg())
    return _cache["clients"], _cache["test"], _cache["spec"]


def _model(spec):
    return build_model(
        spec.name, spec.num_classes, spec.in_channels, spec.width, seed=_cfg().federation.seed
    )


def _state(arrays: ArrayRecord, like: dict) -> dict:
    """Flower's arrays as a state of ``like``'s dtypes (its FedAvg averages integer counters
    into floats)."""
    return {k: v.to(like[k].dtype) for k, v in arrays.to_torch_state_dict().items()}


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    clients, _, spec = _data()
    pid = int(context.node_config["partition-id"])
    state = _cache.setdefault(pid, ClientState(client_id(pid), clients[pid]))
    rnd = int(msg.content["config"]["server-round"])
    layout = _model(spec).state_dict()
    sent = encode_update(_state(msg.content["arrays"], layout), {})
    result = run_task(state, job_task(_cfg(), spec, pid, rnd), sent)
    if pid == 0 and rnd == 1:
        out = Path(os.environ[OUT])
        (out / "first_update.safetensors").write_bytes(result.payload)
        (out / "first_update.json").write_text(json.dumps({"threads": torch.get_num_threads()}))
    update, _, _ = decode_update(result.payload, layout)
    content = RecordDict(
        {
            "arrays": ArrayRecord(update),
            "metrics": MetricRecord({"num-examples": result.message.metrics.samples}),
        }
    )
    return Message(content=content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main_app(grid: Grid, context: Context) -> None:
    _, test_set, spec = _data()
    cfg = _cfg()
    model = _model(spec)
    marks: list[dict] = []

    def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(_state(arrays, model.state_dict()))
        result = evaluate(model, test_set)
        marks.append({"round": rnd, "t": time.time(), "accuracy": result.accuracy})
        return MetricRecord({"accuracy": result.accuracy})

    n = cfg.federation.clients
    strategy = FedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.federation.rounds,
        evaluate_fn=central,
    )
    (Path(os.environ[OUT]) / "flower.json").write_text(json.dumps({"marks": marks}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Flower's run of the comparison job")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--client-cpus", type=float, help="client_resources num_cpus (Flower's: 2)")
    p.add_argument("--rounds", type=int)
    args = p.parse_args(argv)
    from flwr.simulation import run_simulation

    args.out_dir.mkdir(parents=True, exist_ok=True)
    os.environ[OUT] = str(args.out_dir.resolve())
    if args.rounds:
        os.environ[ROUNDS] = str(args.rounds)
    backend = {"client_resources": {"num_cpus": args.client_cpus}} if args.client_cpus else None
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=_cfg().federation.clients,
        backend_config=backend,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
