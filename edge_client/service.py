"""``cahfp client``: the device agent as a process, with its local data, its budget model and
signal handling."""

from __future__ import annotations

import argparse
import logging
import signal

import torch

from cahfp.client_round import ClientState
from cahfp.data import client_shares, load_dataset
from cahfp.device.budget import device_budget
from cahfp.device.select import resolve_device
from cahfp.errors import CAHFPError
from cahfp.messages import ModelSpec
from cahfp.mqtt.link import MqttLink, client_certificate, read_credentials
from cahfp.mqtt.protocol import PRESENCE_EVERY, Topics, check_name
from cahfp.training import Recipe
from edge_client.agent import Agent

log = logging.getLogger("cahfp.client")


def local_data(args: argparse.Namespace):
    """The device's own ``imagefolder:PATH`` data, or one partition of a public dataset (the
    same split the simulation makes for the same seed)."""
    data = load_dataset(args.data, "train", args.data_dir, args.download)
    if args.data.startswith("imagefolder:") or args.num_clients <= 1:
        return data
    if not 0 <= args.client_index < args.num_clients:
        raise CAHFPError(f"--client-index must be in [0, {args.num_clients})")
    shares, _ = client_shares(
        data.targets,
        args.num_clients,
        args.partition,
        args.seed,
        train_samples=args.train_samples,
        eval_split=args.eval_split,
        eval_samples=args.eval_samples,
    )
    return data.subset(shares[args.client_index])


def budget_setup(state: ClientState, profile: str):
    """``none``: this device does not measure itself (it trains what the coordinator assigns:
    the dense model, or its fixed tier); ``auto``: it measures itself; a profile name: it
    emulates that board (``cahfp.device.budget.device_budget``). Returns the calibration step
    (run once the federation's model is known) and what the hello describes."""
    if profile == "none":
        return None, {}
    from cahfp.device.calibrate import calibrate
    from cahfp.device.measure import measure_device, training_memory

    info = measure_device()
    described = {"device": {k: v for k, v in info.to_dict().items() if k != "cgroup"}}
    board = None
    if profile != "auto":
        from cahfp.device.profiles import load_profile

        board = load_profile(profile)
        described["profile"] = board.name

    def calibrate_budget(spec: ModelSpec, recipe: Recipe) -> None:
        measured = calibrate(spec, recipe.batch_size, device=state.compute_device)
        memory = training_memory(info, state.compute_device)
        state.device = device_budget(measured, memory, board)
        cal = state.device.model.calibration
        described["calibration"] = {
            "seconds_per_sample": cal.seconds_per_sample,
            "seconds_per_sample_small": cal.seconds_per_sample_small,
            "host_gflops": measured.flops_per_second / 1e9,
            "time_scale": state.time_scale,
            "model": spec.name,
            "width": spec.width,
        }

    return calibrate_budget, described


def run_client(args: argparse.Namespace) -> int:
    check_name("client id", args.id)
    if args.quantize and not args.export_dir:
        raise CAHFPError("--quantize needs --export-dir (where the quantized model is written)")
    topics = Topics(args.federation)
    cert, key = client_certificate(args.cert, args.key)  # before the data: fail at once
    emulated = args.profile not in ("auto", "none")
    if args.threads or emulated:  # boards emulated side by side: one core each unless told
        torch.set_num_threads(args.threads or 1)
    device = resolve_device(args.device)  # before the data: fail at once
    data = local_data(args)
    state = ClientState(args.id, data, compute_device=device)
    calibrate_budget, profile = budget_setup(state, args.profile)
    user, password = read_credentials(args.credentials)
    from cahfp.mqtt.protocol import Presence

    offline = Presence(client_id=args.id, status="offline").model_dump_json().encode()
    link = MqttLink(
        args.broker,
        args.id,
        username=user,
        password=password,
        ca_file=args.ca,
        cert_file=cert,
        key_file=key,
        protocol=args.mqtt_version,
        will=(topics.presence(args.id), offline, 1, True),
    )
    agent = Agent(
        link,
        topics,
        state,
        profile=profile,
        export_dir=args.export_dir,
        quantize=args.quantize,
        calibrate_budget=calibrate_budget,
        until_finished=args.until_finished,
        presence_every=args.presence_every or PRESENCE_EVERY,
    )

    def on_signal(signum, _frame):
        log.info("%s: %s received, stopping", args.id, signal.Signals(signum).name)
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stats = agent.run(connect_timeout=args.connect_timeout)
    log.info(
        "%s: stopped after %d tasks (%d acknowledged, %d rejected)",
        args.id,
        stats.tasks,
        stats.acked,
        stats.rejected,
    )
    if agent.problem:
        raise CAHFPError(f"{args.id}: {agent.problem}")
    return 0
