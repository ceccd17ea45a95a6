"""Simulation on Ray (``federation.backend = "ray"``, ``cahfp-edge[ray]``): the workers of
``coordinator.workers`` as Ray actors, on this machine or on the cluster ``RAY_ADDRESS`` names,
each reserving ``federation.client_resources`` (CPUs, and a share of a GPU). The fold, and so
the bitwise result, is the one every parallel backend shares."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable

from cahfp.client_round import ClientState, Result
from cahfp.config import ClientResources
from cahfp.errors import CAHFPError
from coordinator.workers import Answer, Item, ParallelTransport, serve


def import_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise CAHFPError(
            "the ray backend needs Ray: pip install 'cahfp-edge[ray]' (or use --backend processes)"
        ) from None
    return ray


def workers_that_fit(cluster: dict[str, float], resources: ClientResources) -> int:
    """How many workers reserving ``resources`` the cluster's totals hold at once."""
    fits = math.floor(cluster.get("CPU", 0) / resources.num_cpus + 1e-9)
    if resources.num_gpus:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / resources.num_gpus + 1e-9))
    return fits


class RayWorker:
    """A Ray actor: its clients' states, one task at a time, with ``threads`` torch threads on
    the CPU or on the GPU Ray gave it."""

    def __init__(self, states: dict[str, ClientState], threads: int, gpu: bool):
        import torch

        from cahfp.device.select import resolve_device

        torch.set_num_threads(threads)
        device = resolve_device("cuda" if gpu else "cpu")
        for state in states.values():
            state.compute_device = device
        self.states = states

    def run(self, item: Item) -> Answer:
        return serve(self.states, item)


class RayTransport(ParallelTransport):
    """Clients on Ray actors. Connects to ``RAY_ADDRESS`` when it is set (a cluster; the
    project must be installed on its nodes), else starts a local Ray with ``local_cpus`` CPUs;
    a Ray already initialised in this process is used as it is. ``workers`` 0 = as many as the
    cluster holds, at most ``per_round``."""

    def __init__(
        self,
        states: dict[str, ClientState],
        resources: ClientResources,
        workers: int = 0,
        per_round: int | None = None,
        local_cpus: int = 1,
        on_result: Callable[[str, Result], None] | None = None,
    ):
        ray = import_ray()
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            try:
                if address:
                    ray.init(address=address, logging_level="WARNING")
                else:
                    ray.init(
                        address="local",
                        num_cpus=local_cpus,
                        include_dashboard=False,
                        logging_level="WARNING",
                    )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CAHFPError(f"cannot start {where}: {first}") from None
            self.started = True
        cluster = ray.cluster_resources()
        fits = workers_that_fit(cluster, resources)
        if fits < 1:
            self.close()
            raise CAHFPError(
                f"no client fits the Ray cluster ({cluster.get('CPU', 0):g} CPUs, "
                f"{cluster.get('GPU', 0):g} GPUs) at num_cpus={resources.num_cpus:g}, "
                f"num_gpus={resources.num_gpus:g} (federation.client_resources)"
            )
        workers = workers or min(fits, per_round or len(states))
        super().__init__(states, workers, on_result)
        actor = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)(RayWorker)
        threads = max(1, int(resources.num_cpus))
        self.actors = [
            actor.remote(
                {c: s for c, s in states.items() if self.worker_of[c] == w},
                threads,
                resources.num_gpus > 0,
            )
            for w in range(workers)
        ]

    def _start(self, w: int, item: Item) -> Hashable:
        return self.actors[w].run.remote(item)

    def _ready(self, handles: list[Hashable]) -> list[Hashable]:
        done, _ = self.ray.wait(handles, num_returns=1)
        return done

    def _answer(self, w: int, handle: Hashable) -> Answer:
        errors = self.ray.exceptions
        try:
            return self.ray.get(handle)
        except errors.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise CAHFPError(
                f"simulation worker {w} crashed: {type(cause).__name__}: {_first_line(cause)}"
            ) from None
        except errors.RayError as exc:  # the actor or its node went away
            raise CAHFPError(
                f"simulation worker {w} died ({type(exc).__name__}; out of memory, or its node "
                "left the cluster?)"
            ) from None

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
