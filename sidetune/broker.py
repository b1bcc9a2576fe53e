"""`sidetune broker ...`: provision a broker folder, add, rotate and remove boards.

The work is in sidetune.provision; this module parses the command line and tells the
operator what was written and what to do next.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from schemas.errors import UsageError
from sidetune.certs import san_entry
from sidetune.provision import (
    SYSTEM_FRAGMENT,
    BrokerParams,
    add_device,
    init_broker,
    load_params,
    reload_broker,
    remove_device,
    set_cohort,
    write_configs,
)


def _port(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"bad {what} {text!r}: a port number") from None


def _user_exists(user: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _default_hostname() -> list[str]:
    name = socket.getfqdn()
    try:
        san_entry(name)
    except UsageError:
        return []
    return [] if name in ("localhost", "localhost.localdomain") else [name]


def cmd_init(args: argparse.Namespace) -> int:
    hostnames = args.hostname or _default_hostname()
    params = BrokerParams(hostnames=hostnames, tls_port=_port(args.tls_port, "--tls-port"),
                          plain_port=_port(args.plain_port, "--plain-port"), bind=args.bind, user=args.user,
                          redis_port=_port(args.redis_port, "--redis-port"))
    d = Path(args.dir).absolute()
    if not args.hostname:
        print(f"no --hostname given: the certificate names {', '.join([*hostnames, 'localhost', '127.0.0.1'])}")
    written = init_broker(d, params, force=args.force)
    if os.geteuid() == 0 and params.user != "root" and not _user_exists(params.user):
        print(f"sidetune: warning: user {params.user} does not exist: mosquitto started as root will not start "
              f"until it does (apt-get install mosquitto creates it), or pass --user", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    plain = f"plaintext on 127.0.0.1:{params.plain_port}" if params.plain_port else "no plaintext listener"
    if not params.plain_port:
        print("sidetune: warning: no plaintext listener: the side server connects over TLS, where the broker makes "
              "the client id the user name, so run ONE server worker (a second would take the first's session)",
              file=sys.stderr)
    print(f"broker: TLS on {params.bind}:{params.tls_port} for {', '.join(hostnames) or 'localhost'}; {plain}; "
          f"Redis on 127.0.0.1:{params.redis_port} with a password")
    print(f"""next steps:
  either Debian's broker:  cp {d}/conf.d/sidetune.conf {SYSTEM_FRAGMENT} && systemctl restart mosquitto
  or a broker of its own:  mosquitto -c {d}/mosquitto.conf
  Redis:                   install -m 0640 -g redis {d}/redis.conf /etc/redis/sidetune.conf
                           echo 'include /etc/redis/sidetune.conf' >> /etc/redis/redis.conf && systemctl restart redis-server
                           (or: redis-server {d}/redis.conf --dir {d}/state)
  side server:             sidetune server --config {d}/server.toml
  each board:              sidetune broker add-device BOARD_ID --dir {d}""")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    d = Path(args.dir).absolute()
    for path in write_configs(d, load_params(d)):
        print(f"wrote {path}")
    print(f"certificates and passwords unchanged; restart the broker and Redis to apply "
          f"(`systemctl restart mosquitto redis-server`, or restart `mosquitto -c {d}/mosquitto.conf`)")
    return 0


def _reload(d: Path, no_reload: bool) -> None:
    if no_reload:
        print(f"not reloaded (--no-reload): `systemctl reload mosquitto` or "
              f"`kill -HUP $(cat {d}/state/mosquitto.pid)` applies it")
        return
    print(reload_broker(d)[1])


def cmd_add_device(args: argparse.Namespace) -> int:
    d = Path(args.dir).absolute()
    bundle = add_device(d, args.device_id, broker_host=args.broker_host, rotate=args.rotate, cohort=args.cohort)
    print(f"{'new password for' if args.rotate else 'account'} {args.device_id} in {d / 'passwd'}")
    if args.cohort:
        print(f"member of cohort {args.cohort} in {d / 'cohorts.json'}; put the cohort's secret in the bundle as "
              f"{bundle / 'cohort.json'} (`sidetune cohort secret {args.cohort} --out FILE`, made once, off the "
              "server, and copied to every member)")
    for name in ("edge.toml", "ca.crt", "edge.password"):
        print(f"wrote {bundle / name}")
    _reload(d, args.no_reload)
    print(f"next: copy {bundle}/ to the board and run deploy/install-board.sh --bundle FOLDER SIDETUNE_SOURCE "
          f"there{' (then restart its agent: systemctl restart sidetune-edge)' if args.rotate else ''}")
    return 0


def cmd_set_cohort(args: argparse.Namespace) -> int:
    d = Path(args.dir).absolute()
    if args.none == (args.cohort is not None):
        raise UsageError("give a cohort name, or --none to take the device out of its cohort")
    new = args.cohort
    before = set_cohort(d, args.device_id, new)
    print(f"{args.device_id}: cohort {before or '(none)'} -> {new or '(none)'} in {d / 'cohorts.json'} "
          "(the workers follow within a second)")
    if new and new != before:
        print(f"the board needs cohort = \"{new}\" and the cohort's secret in its edge.toml (cohort_secret_file)")
    return 0


def cmd_remove_device(args: argparse.Namespace) -> int:
    d = Path(args.dir).absolute()
    remove_device(d, args.device_id)
    print(f"removed the account {args.device_id} and {d / 'devices' / args.device_id}")
    _reload(d, args.no_reload)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `sidetune broker` and its subcommands to the CLI's subparsers."""
    broker = sub.add_parser("broker", help="provision a broker: CA, certificates, accounts, board bundles")
    bsub = broker.add_subparsers(dest="broker_cmd", required=True, metavar="COMMAND")

    init = bsub.add_parser("init", help="write a complete broker folder (CA, certificates, accounts, configs)")
    init.add_argument("dir", help="the broker folder to create (e.g. /etc/sidetune/broker)")
    init.add_argument("--hostname", action="append", default=[],
                      help="a name or address boards use for the broker (repeatable; the server certificate "
                           "covers every one, plus localhost and 127.0.0.1; the first goes into board bundles)")
    init.add_argument("--tls-port", default="8883", help="the TLS listener's port (default 8883)")
    init.add_argument("--plain-port", default="1883",
                      help="a plaintext listener on 127.0.0.1 only, for the side server (default 1883; 0: none)")
    init.add_argument("--bind", default="0.0.0.0", help="the TLS listener's address (default 0.0.0.0)")
    init.add_argument("--user", default="mosquitto", help="the user mosquitto runs as (default mosquitto)")
    init.add_argument("--redis-port", default="6379", help="Redis's port (default 6379)")
    init.add_argument("--force", action="store_true",
                      help="replace an existing broker folder (new CA: every board needs a new bundle)")
    init.set_defaults(func=cmd_init)

    refresh = bsub.add_parser("refresh", help="re-render the configuration files from the templates "
                                              "(after an upgrade); certificates and passwords are kept")
    refresh.add_argument("--dir", required=True)
    refresh.set_defaults(func=cmd_refresh)

    add = bsub.add_parser("add-device", help="create a board's account and bundle, reload the broker")
    add.add_argument("device_id", metavar="ID")
    add.add_argument("--dir", required=True, help="the broker folder")
    add.add_argument("--broker-host", default=None,
                     help="the name the board connects to (default: init's first --hostname)")
    add.add_argument("--rotate", action="store_true", help="the device exists: give it a new password")
    add.add_argument("--no-reload", action="store_true", help="do not signal the running mosquitto")
    add.add_argument("--cohort", default=None, metavar="NAME",
                     help="make the board a member of this cohort (boards of one task that train together)")
    add.set_defaults(func=cmd_add_device)

    sc = bsub.add_parser("set-cohort", help="move a board into a cohort, or out of its cohort (--none)")
    sc.add_argument("device_id", metavar="ID")
    sc.add_argument("cohort", nargs="?", default=None, metavar="NAME")
    sc.add_argument("--none", action="store_true", help="take the board out of its cohort")
    sc.add_argument("--dir", required=True, help="the broker folder")
    sc.set_defaults(func=cmd_set_cohort)

    rm = bsub.add_parser("remove-device", help="delete a board's account and bundle, reload the broker")
    rm.add_argument("device_id", metavar="ID")
    rm.add_argument("--dir", required=True, help="the broker folder")
    rm.add_argument("--no-reload", action="store_true", help="do not signal the running mosquitto")
    rm.set_defaults(func=cmd_remove_device)
