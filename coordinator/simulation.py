"""In-process federated simulation: the coordinator's round engine and every client's task in
one process, over the in-process transport (same messages and payloads as over MQTT)."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from rich.console import Console

from cahfp.client_round import ClientState
from cahfp.config import Config
from cahfp.data import ImageData, client_shares, load_dataset
from cahfp.data import training_pool as data_training_pool
from cahfp.device.select import resolve_device
from cahfp.errors import CAHFPError, ConfigError
from cahfp.messages import ModelSpec
from cahfp.training import evaluate
from coordinator import snapshot
from coordinator.engine import RoundEngine, RoundRecord
from coordinator.inprocess import InProcessTransport
from coordinator.records import (
    NoCheckpoint,
    RunRecorder,
    check_new_run,
    load_checkpoint,
    load_checkpoint_tensors,
    load_metrics,
    load_server_state,
)
from coordinator.transport import Transport
from coordinator.view import ProgressView

log = logging.getLogger("cahfp.simulate")


def client_id(i: int) -> str:
    return f"client-{i:03d}"


def training_pool(n_train: int, cfg: Config):
    """The clients' training images and the validation hold-out, for this config."""
    d = cfg.data
    return data_training_pool(
        n_train, cfg.federation.seed, d.train_samples, d.eval_split, d.eval_samples
    )


def distillation_data(cfg: Config, train_set: ImageData | None = None) -> ImageData | None:
    """The coordinator's unlabelled images for ensemble distillation
    (``aggregation.distill_steps``): the ``data.distill_samples`` training images after the
    clients' ``data.train_samples`` in the pool's seeded order (none with distillation off).
    Their labels are never read."""
    d = cfg.data
    if not cfg.aggregation.distill_steps:
        return None
    if train_set is None:
        train_set = load_dataset(d.dataset, "train", d.data_dir, d.download)
    pool, _ = data_training_pool(
        len(train_set), cfg.federation.seed, None, d.eval_split, d.eval_samples
    )
    end = d.train_samples + d.distill_samples
    if end > len(pool):
        raise ConfigError(
            f"data.train_samples + data.distill_samples = {end} exceed the {len(pool)} training "
            "images available"
        )
    return train_set.subset(pool[d.train_samples : end])


def evaluation_data(
    cfg: Config, train_set: ImageData | None = None, held_out: torch.Tensor | None = None
) -> ImageData:
    """The coordinator's evaluation set: the first ``eval_samples`` test images, or with
    ``data.eval_split = "validation"`` the held-out training images (``train_set`` and
    ``held_out`` are loaded and computed here unless the caller already has them)."""
    d = cfg.data
    if d.eval_split == "validation":
        if train_set is None:
            train_set = load_dataset(d.dataset, "train", d.data_dir, d.download)
        if held_out is None:
            held_out = training_pool(len(train_set), cfg)[1]
        data = train_set.subset(held_out)
    else:
        data = load_dataset(d.dataset, "test", d.data_dir, d.download)
    if d.eval_samples and d.eval_samples < len(data):
        data = data.subset(range(d.eval_samples))
    return data


def federation_data(cfg: Config) -> tuple[list[ImageData], ImageData, ModelSpec]:
    """Client partitions of the training set, the held-out evaluation set, and the model spec."""
    d = cfg.data
    train_set = load_dataset(d.dataset, "train", d.data_dir, d.download)
    shares, held_out = client_shares(
        train_set.targets,
        cfg.federation.clients,
        d.partition,
        cfg.federation.seed,
        train_samples=d.train_samples,
        eval_split=d.eval_split,
        eval_samples=d.eval_samples,
        min_samples=d.min_samples,
    )
    test_set = evaluation_data(cfg, train_set, held_out)
    clients = [train_set.subset(share) for share in shares]
    spec = ModelSpec(
        name=cfg.model.name,
        width=cfg.model.width,
        num_classes=train_set.num_classes,
        in_channels=train_set.in_channels,
        image_size=train_set.image_size,
    )
    return clients, test_set, spec


def simulate(
    cfg: Config,
    out_dir: str | Path | None = None,
    quiet: bool = False,
    console: Console | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    dashboard: str | None = None,
    dashboard_token: str | None = None,
    tracking: str | None = None,
) -> dict:
    """Run a whole federation; with ``out_dir`` write metrics, checkpoints, model and plots.
    An ``out_dir`` that already holds a run is refused unless ``force`` (start over) or
    ``resume`` (continue from its last usable checkpoint, exactly as if never interrupted).
    ``dashboard``: serve the live dashboard and /metrics on that ``HOST:PORT``; ``tracking``:
    mirror the per-round metrics to TensorBoard or MLflow (``coordinator.tracking``)."""
    if resume and out_dir is None:
        raise CAHFPError("--resume needs the run directory (--out) of the interrupted run")
    if out_dir and not resume:
        check_new_run(out_dir, force)
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    clients, test_set, spec = federation_data(cfg)
    states = {
        client_id(i): ClientState(client_id(i), data, compute_device=device)
        for i, data in enumerate(clients)
    }
    if cfg.clients.budget == "measured":
        keeps = emulate_devices(cfg, spec, states, device)
    else:
        keeps = {client_id(i): cfg.keep_of(i) for i in range(len(clients))}
    listeners, server, tracker = [], None, None
    if tracking:
        from coordinator.tracking import Tracker

        tracker = Tracker(tracking, cfg, Path(out_dir).name if out_dir else cfg.federation.name)
        listeners.append(tracker.event)
    transport = make_transport(cfg, states)
    try:
        if dashboard:
            from coordinator.dashboard import serve
            from coordinator.monitor import Monitor

            monitor = Monitor(cfg)
            listeners.append(monitor.event)
            server = serve(monitor, dashboard, dashboard_token)
            log.warning("dashboard: %s (metrics: /metrics)", server.url)
        engine, records, recorder = _run_rounds(
            cfg, spec, transport, states, test_set, device, keeps, out_dir, resume, quiet,
            console, listeners,
        )  # fmt: skip
    finally:
        transport.close()
        if server:
            server.stop()
        if tracker:
            tracker.close()
    wall = time.perf_counter() - start
    if recorder:
        return recorder.finish(engine.state, wall)
    from coordinator.records import record_dict, summarize

    return summarize([record_dict(r) for r in records], cfg, engine.dense_flops, wall)


def _run_rounds(
    cfg, spec, transport, states, test_set, device, keeps, out_dir, resume, quiet, console,
    listeners=(),
):  # fmt: skip
    """The engine over ``transport``, resumed or started, run to the last round; ``listeners``
    hear the engine's events (the initial record too) before the progress view."""
    console = console or Console(stderr=True)
    view = ProgressView(cfg, console, quiet)

    def events(kind: str, data: dict) -> None:
        for listen in listeners:
            listen(kind, data)
        view.event(kind, data)

    engine = RoundEngine(
        cfg,
        spec,
        transport,
        evaluator(test_set, device),
        keeps,
        on_event=events,
        distill_images=distillation_data(cfg),
    )
    recorder = RunRecorder(out_dir, cfg, engine.dense_flops, resume=resume) if out_dir else None
    done = _resume(engine, states, recorder) if resume else 0
    records = []
    if done:
        last = next(r for r in reversed(load_metrics(out_dir)) if r["accuracy"] is not None)
        view.start(RoundRecord(done, last["accuracy"], last["loss"], 0.0, 0), resumed=done)
    else:
        initial = engine.initial_record()
        records.append(initial)
        if recorder:
            recorder.round(initial, engine.state)
        view.start(initial)
        for listen in listeners:
            listen("initial", {"record": initial})
    try:
        for rnd in range(done + 1, cfg.federation.rounds + 1):
            rec = engine.run_round(rnd)
            records.append(rec)
            if recorder:
                extra, tensors = snapshot.capture(engine, states)
                recorder.round(
                    rec, engine.state, extra, engine.momentum.state(), more={"sim": tensors}
                )
    finally:
        view.stop()
    return engine, records, recorder


def make_transport(cfg: Config, states: dict[str, ClientState]) -> Transport:
    """The simulation's transport (``federation.backend``): the clients one after another in
    this process, a round's clients in parallel worker processes, or on Ray actors. ``auto``
    takes worker processes when more than one core is free and a round has more than one
    client, except inside a daemonic process (a multiprocessing pool's worker cannot start
    processes); it never picks Ray."""
    import multiprocessing as mp

    from cahfp.device.measure import measure_device

    backend = cfg.federation.backend
    if backend == "inprocess":
        return InProcessTransport(states)
    per_round = max(1, round(len(states) * cfg.federation.participation))
    free = max(1, int(measure_device().usable_cores))
    if backend == "ray":
        from coordinator.ray_workers import RayTransport

        return RayTransport(
            states,
            cfg.federation.client_resources,
            workers=cfg.federation.workers,
            per_round=per_round,
            local_cpus=free,
        )
    workers = cfg.federation.workers or min(free, per_round)
    daemon = mp.current_process().daemon
    if backend == "auto" and (workers < 2 or daemon):
        return InProcessTransport(states)
    if daemon:
        raise CAHFPError(
            "the processes backend cannot start inside a daemonic process (e.g. a "
            'multiprocessing pool worker); set federation.backend = "inprocess"'
        )
    from coordinator.workers import ProcessTransport

    threads = max(1, torch.get_num_threads() // workers)
    return ProcessTransport(states, workers, threads)


def _resume(engine: RoundEngine, states: dict[str, ClientState], recorder: RunRecorder) -> int:
    """Load the run's last usable checkpoint into the engine and the clients; the round it
    completed (0, a fresh start, when the run has none yet)."""
    try:
        done, state, entry = load_checkpoint(recorder.dir, like=engine.state)
    except NoCheckpoint as exc:
        log.warning("%s: starting from round 1", exc)
        recorder.resume = False
        return 0
    snapshot.restore(engine, states, entry, load_checkpoint_tensors(recorder.dir, done, "sim"))
    engine.momentum.load(load_server_state(recorder.dir, done), state)
    engine.state = state
    engine.model.load_state_dict(state)
    engine.round = done
    recorder.truncate_after(done)
    log.info("resuming %s after round %d", recorder.dir, done)
    return done


def evaluator(test_set, device: torch.device):
    """How the simulation scores the global model: on ``device`` (a copy there when it is not
    the CPU; the global model itself stays on the CPU, where aggregation runs)."""
    if device.type == "cpu":
        return lambda m: evaluate(m, test_set)
    return lambda m: evaluate(copy.deepcopy(m).to(device), test_set)


def emulate_devices(
    cfg: Config,
    spec: ModelSpec,
    states: dict[str, ClientState],
    device: torch.device | None = None,
):
    """Give every simulated client the budget of the board it emulates (its
    ``clients.profiles`` entry), set up as a real client's is (``device_budget``), calibrated
    on ``device`` (where the clients train; the CPU by default). Returns each client's initial
    keep estimate (its 'hello')."""
    from cahfp.client_round import announced_keep
    from cahfp.device.budget import device_budget
    from cahfp.device.calibrate import calibrate
    from cahfp.device.profiles import load_profile

    calibration = calibrate(spec, cfg.train.batch_size, device=device)
    scored = cfg.pruning.score_batches * cfg.train.batch_size
    keeps = {}
    for i, (cid, state) in enumerate(sorted(states.items())):
        state.device = device_budget(calibration, 0, load_profile(cfg.profile_of(i)))
        keeps[cid], _ = announced_keep(
            state, cfg.train, cfg.federation.deadline_s, cfg.clients.settings(), scored
        )
    return keeps
