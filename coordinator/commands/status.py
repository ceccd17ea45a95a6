"""``cahfp status``: a federation's state from the broker's retained topics (the coordinator's
status, its last model announcement, each board's presence and hello), read with any account
that may read them: `cahfp deploy` makes a read-only ``observer`` one for this."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cahfp.cli.options import add_broker


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="the federation's round, boards online and last result, from the broker"
    )
    add_broker(p)
    p.add_argument("--federation", required=True, help="the federation's name")
    p.add_argument(
        "--wait", type=float, default=3.0, help="seconds to collect retained messages (default 3)"
    )
    p.add_argument("--json", action="store_true", help="print the state as JSON")
    p.set_defaults(handler=run)


def collect(args: argparse.Namespace) -> dict:
    """The retained state: ``status``, ``model``, ``boards`` ({id: {presence, hello}}) and the
    ``problems`` of messages that did not parse."""
    import secrets

    from cahfp.mqtt.link import MqttLink, client_certificate, read_credentials
    from cahfp.mqtt.protocol import (
        Hello,
        ModelAnnouncement,
        Presence,
        ProtocolError,
        Status,
        Topics,
        check_name,
        parse_json,
    )

    check_name("federation id", args.federation)
    topics = Topics(args.federation)
    user, password = read_credentials(args.credentials)
    cert, key = client_certificate(args.cert, args.key)
    link = MqttLink(
        args.broker,
        user or f"status-{secrets.token_hex(4)}",  # the broker names it by its account anyway
        username=user,
        password=password,
        ca_file=args.ca,
        cert_file=cert,
        key_file=key,
        protocol=args.mqtt_version,
        session_expiry=0,
    )
    for topic in (topics.status, topics.model, topics.presence(), topics.hello()):
        link.subscribe(topic)
    state: dict = {"status": None, "model": None, "boards": {}, "problems": []}
    link.start(min(args.wait + 10, 30))
    try:
        end = time.monotonic() + args.wait
        quiet_until = None
        while time.monotonic() < end:
            msg = link.get(0.1)
            if msg is None:
                if quiet_until and time.monotonic() > quiet_until:
                    break  # the retained messages come at once: a quiet half second ends it
                continue
            quiet_until = time.monotonic() + 0.5
            if not msg.payload:
                continue
            try:
                kind, client, _ = topics.parse(msg.topic)
                if kind == "status":
                    state["status"] = parse_json(Status, msg.payload).model_dump()
                elif kind == "model":
                    state["model"] = parse_json(ModelAnnouncement, msg.payload).model_dump()
                elif kind in ("presence", "hello") and client:
                    board = state["boards"].setdefault(client, {"presence": None, "hello": None})
                    cls = Presence if kind == "presence" else Hello
                    board[kind] = parse_json(cls, msg.payload).model_dump()
            except ProtocolError as exc:
                state["problems"].append(f"{msg.topic}: {exc}")
    finally:
        link.stop()
    return state


def render(state: dict, federation: str) -> str:
    s, m = state["status"], state["model"]
    lines = []
    if s is None:
        lines.append(f"federation {federation}: no retained status (no coordinator has run it "
                     "on this broker, or this account may not read it)")  # fmt: skip
    else:
        run = f" (run {s['run'][:8]})" if s.get("run") else ""
        detail = f": {s['detail']}" if s.get("detail") else ""
        lines.append(f"federation {federation}{run}: {s['state']}, round {s['round']}{detail}")
    if m is not None:
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.4f}"
        lines.append(f"last model: round {m['round']}, accuracy {acc}, "
                     f"{m['bytes'] / 1e6:.2f} MB, sha256 {m['sha256'][:12]}")  # fmt: skip
    boards = state["boards"]
    online = [b for b, v in boards.items() if (v["presence"] or {}).get("status") == "online"]
    lines.append(f"boards: {len(boards)} known, {len(online)} online (as their last presence "
                 "says)")  # fmt: skip
    for cid in sorted(boards):
        p, h = boards[cid]["presence"] or {}, boards[cid]["hello"] or {}
        profile = (h.get("profile") or {}).get("profile", "")
        keep = h.get("keep_estimate")
        parts = [p.get("status", "no presence"), profile,
                 f"keep estimate {keep:.2f}" if keep is not None else "",
                 f"{h['samples']} samples" if h.get("samples") is not None else "",
                 f"cannot take part: {h['problem']}" if h.get("problem") else ""]  # fmt: skip
        lines.append(f"  {cid}: " + ", ".join(x for x in parts if x))
    for problem in state["problems"]:
        lines.append(f"ignored: {problem}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    state = collect(args)
    if args.json:
        print(json.dumps(state, indent=1))
    else:
        print(render(state, args.federation))
    if state["status"] is None:
        print(f"note: nothing retained for federation {args.federation}", file=sys.stderr)
        return 1
    return 0
