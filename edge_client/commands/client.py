"""``cahfp client``: run the edge client (device agent) over MQTT."""

from __future__ import annotations

import argparse
import os

from cahfp.cli.options import add_broker, add_data_dir, add_device, setup_logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="run the edge client (device agent) over MQTT")
    add_broker(p)
    add_device(p, "auto")
    p.add_argument("--id", required=True, help="client id (= MQTT username when secured)")
    p.add_argument(
        "--federation",
        default="federation",
        help="federation id (the coordinator's federation.name)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="imagefolder:PATH, or fmnist/cifar10/cifar100 "
        "with --partition/--num-clients/--client-index",
    )
    p.add_argument("--partition", default="iid")
    p.add_argument("--num-clients", type=int, default=1)
    p.add_argument("--client-index", type=int, default=0)
    p.add_argument("--train-samples", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-split",
        choices=("test", "validation"),
        default="test",
        help="with validation, leave out the coordinator's held-out images (--eval-samples of "
        "them); must match its data.eval_split, data.eval_samples and federation.seed",
    )
    p.add_argument("--eval-samples", type=int)
    p.add_argument(
        "--profile",
        default=os.environ.get("CAHFP_PROFILE", "auto"),
        help="auto (measure this device; the default, or $CAHFP_PROFILE), none (do not measure: "
        "train what the coordinator assigns) or a device profile name to emulate on this host "
        "(on one core unless --threads says otherwise)",
    )
    p.add_argument("--export-dir", help="write the trained submodel as model.onnx here")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="with --export-dir: export INT8 (static QDQ), activations calibrated on 256 of "
        "this board's images",
    )
    p.add_argument(
        "--until-finished",
        action="store_true",
        help="exit when the coordinator announces that the federation has finished",
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice; 1 when emulating)"
    )
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument(
        "--presence-every",
        type=presence_seconds,
        metavar="SECONDS",
        help="refresh this board's presence every SECONDS (default: the protocol's, "
        "cahfp.mqtt.protocol.PRESENCE_EVERY, 30); the coordinator counts it as gone after "
        "PRESENCE_MISSES (3) missed refreshes",
    )
    p.add_argument("--quiet", action="store_true")
    add_data_dir(p)
    p.set_defaults(handler=run)


def presence_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds in (0, 3600], got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from edge_client.service import run_client

    setup_logging(args)
    return run_client(args)
