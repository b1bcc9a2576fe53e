"""`sidetune cohort secret NAME --out FILE`: a cohort's shared secret, made on the operator's machine.

Every member of a cohort mixes its targets with this one basis, so that the server can train
one side network on all of them; the server never holds it (it would decode the members'
targets into classes). Copy the file into each member's bundle as ``cohort.json``
(deploy/install-board.sh installs it beside ``edge.toml``) and keep it away from the server.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edge_agent.secret import cohort_secret_json
from schemas.errors import UsageError, WireError
from schemas.topics import check_device_id


def cmd_secret(args: argparse.Namespace) -> int:
    try:
        check_device_id(args.name)
    except WireError:
        raise UsageError(f"bad cohort name {args.name!r}: 1-64 characters from A-Z a-z 0-9 _ -") from None
    if not 2 < args.out_dim <= 256:
        raise UsageError(f"bad --out-dim {args.out_dim}: 3-256 (the boards' out_dim, above their class count)")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists: a new secret would split the cohort (members mixing with the old one); "
                         "--force replaces it")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cohort_secret_json(args.name, args.out_dim))
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out} (0600): the secret of cohort {args.name}, out_dim {args.out_dim}. Copy it into each "
          "member's bundle as cohort.json; never onto the server.")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cohort = sub.add_parser("cohort", help="cohorts: boards of one task that train one side network")
    csub = cohort.add_subparsers(dest="cohort_cmd", required=True, metavar="COMMAND")
    sec = csub.add_parser("secret", help="make a cohort's shared mixing secret (on the operator's machine)")
    sec.add_argument("name", metavar="NAME")
    sec.add_argument("--out", required=True, help="the file to write (0600)")
    sec.add_argument("--out-dim", type=int, default=8, help="K, the members' out_dim (default 8)")
    sec.add_argument("--force", action="store_true", help="replace an existing file")
    sec.set_defaults(func=cmd_secret)
