"""``cahfp deploy``: broker configuration, certificates and device credentials."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="broker configuration, certificates and device credentials")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("init", help="a secured broker configuration for one federation")
    q.add_argument("--out", required=True)
    q.add_argument("--devices", default="", help="comma-separated device names")
    q.add_argument("--federation", default="federation")
    q.add_argument("--host", help="comma-separated broker host names / IPs for the certificate")
    q.add_argument("--port", type=int, default=8883)
    q.add_argument("--bind", default="0.0.0.0")
    q.add_argument(
        "--client-certs", action="store_true", help="also issue and require client certificates"
    )
    for action, helptext in (
        ("add-device", "add one device"),
        ("revoke-device", "revoke one device"),
    ):
        q = dsub.add_parser(action, help=helptext)
        q.add_argument("--dir", required=True, help="the deployment directory")
        q.add_argument("name")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from deploy.broker import config as bc

    if args.action == "init":
        devices = [d for d in (args.devices or "").split(",") if d]
        hosts = [h for h in (args.host or "").split(",") if h] or None
        d = bc.init(
            args.out,
            devices,
            federation=args.federation,
            hosts=hosts,
            port=args.port,
            bind=args.bind,
            client_certs=args.client_certs,
        )
        print(
            f"deployment for federation {args.federation!r} in {d}: {len(devices)} devices; "
            f"run the broker with: mosquitto -c {d}/mosquitto.conf"
        )
        print(
            f"copy {d}/clients/<name>/ to each board (deploy/provision/provision-board.sh "
            "--bundle ...), clients/coordinator/ to the coordinator host"
        )
    elif args.action == "add-device":
        out = bc.add_device(args.dir, args.name)
        cert = " (with its client certificate)" if (out / "client.crt").is_file() else ""
        print(f"added {args.name}; its bundle{cert} is {out}; reload the broker to apply")
    else:
        cert = bc.revoke_device(args.dir, args.name)
        what = "its password and certificate" if cert else "its password"
        print(
            f"revoked {args.name}; reload the broker (systemctl reload mosquitto or "
            f"kill -HUP <its pid>) so that it stops accepting {what}"
        )
    return 0
