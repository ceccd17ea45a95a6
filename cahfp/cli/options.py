"""Options and helpers several commands share: the data directory, the broker connection,
``--set KEY=VALUE`` overrides and logging. argparse only at import time."""

from __future__ import annotations

import argparse
import os

from cahfp.errors import CAHFPError


def mqtt_level(text: str) -> int:
    """The MQTT protocol level for ``--mqtt-version``: 5, or 4 for 3.1.1."""
    levels = {"5": 5, "3.1.1": 4, "311": 4, "4": 4}
    if text not in levels:
        raise argparse.ArgumentTypeError(f"unknown MQTT version {text!r} (use 5 or 3.1.1)")
    return levels[text]


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", help="dataset root (default: $CAHFP_DATA_DIR, then ~/.cache/cahfp/data)"
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="allow downloading missing public datasets (checksummed)",
    )


def add_device(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--device``: where training, scoring, evaluation and the statistics phase run."""
    p.add_argument(
        "--device",
        default=default,
        help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N"
        + (f" (default {default})" if default else " (default: the config's train.device, auto)"),
    )


def add_broker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument(
        "--credentials",
        help="file with 'username:password' (else CAHFP_MQTT_USERNAME / CAHFP_MQTT_PASSWORD)",
    )
    p.add_argument("--ca", help="CA certificate for mqtts://")
    p.add_argument(
        "--cert",
        help="client certificate (PEM) for a broker that requires one (else CAHFP_CERT)",
    )
    p.add_argument("--key", help="the client certificate's private key (else CAHFP_KEY)")
    p.add_argument(
        "--mqtt-version",
        type=mqtt_level,
        default=5,
        metavar="{5,3.1.1}",
        help="MQTT protocol: 5 (default) or 3.1.1 for brokers without MQTT 5",
    )


def parse_set(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as config overrides (VALUE read as JSON, else as text)."""
    import json

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CAHFPError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def setup_logging(args: argparse.Namespace) -> None:
    """Log lines on stderr: INFO, or WARNING with ``--quiet``."""
    import logging

    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def output_console(stderr: bool = False):
    """A rich console for tables and messages: a terminal's own width, and elsewhere (a pipe, a
    file, a log) as wide as the content, so that nothing is cut to 80 columns."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=1000)
    return console


def add_dashboard(p: argparse.ArgumentParser) -> None:
    """``--dashboard HOST:PORT`` and ``--dashboard-token`` (the coordinator's web page and
    Prometheus ``/metrics``)."""
    p.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        help="serve a live read-only dashboard and Prometheus /metrics there (e.g. "
        "127.0.0.1:8080; off loopback a token is needed)",
    )
    p.add_argument(
        "--dashboard-token",
        default=os.environ.get("CAHFP_DASHBOARD_TOKEN"),
        help="the token a browser off loopback gives (default: $CAHFP_DASHBOARD_TOKEN, else a "
        "random one, printed with the URL)",
    )


def add_tracking(p: argparse.ArgumentParser) -> None:
    """``--tracking tensorboard:DIR|mlflow:URI``."""
    p.add_argument(
        "--tracking",
        metavar="KIND:TARGET",
        help="also log each round's metrics to tensorboard:DIR or mlflow:URI (the "
        "[tensorboard] / [mlflow] extras; metrics.jsonl stays the record)",
    )
