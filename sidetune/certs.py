"""The one way sidetune makes certificates: a CA and a server certificate, with ``openssl``.

`sidetune broker init` uses it for a broker's CA and server certificate; the test and demo
broker (sidetune.services.Mosquitto) calls the same functions for a short-lived one.
Keys are ECDSA P-256 (fast to make, accepted by every TLS stack a board has); a private key is
written 0600 and never exists anywhere with a looser mode.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from schemas.errors import UsageError

#: Always in a server certificate: the side server on the broker's host connects to these.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class CertificateError(UsageError):
    """A host name that cannot go in a certificate, or openssl failing."""


def san_entry(name: str) -> str:
    """``IP:...`` or ``DNS:...`` for a host name or address; a bad one is a usage error."""
    try:
        return f"IP:{ipaddress.ip_address(name)}"
    except ValueError:
        pass
    host = name[:-1] if name.endswith(".") else name
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels) \
            or labels[-1].isdigit():
        raise CertificateError(f"bad host name {name!r}: a DNS name (letters, digits, '-', dots) or an IP address")
    return f"DNS:{host.lower()}"


def subject_alt_names(hostnames: Sequence[str]) -> list[str]:
    """The certificate's subjectAltName entries: every host name, then localhost and 127.0.0.1."""
    out: list[str] = []
    for name in (*hostnames, *LOOPBACK_NAMES):
        entry = san_entry(name)
        if entry not in out:
            out.append(entry)
    return out


def _openssl() -> str:
    path = shutil.which("openssl") or ("/usr/bin/openssl" if os.access("/usr/bin/openssl", os.X_OK) else None)
    if not path:
        raise CertificateError("openssl not found: install it with `apt-get install openssl`")
    return path


def _run(cwd: Path, *args: str) -> None:
    proc = subprocess.run([_openssl(), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise CertificateError(f"openssl {args[0]} failed: {err}")


_REQ_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
subjectAltName = {san}
"""

_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _private_dir(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".certs-", dir=out))  # 0700: keys are born private


def _install(tmp: Path, out: Path, key: str, crt: str) -> None:
    (tmp / key).chmod(0o600)
    (tmp / crt).chmod(0o644)
    os.replace(tmp / key, out / key)
    os.replace(tmp / crt, out / crt)
    shutil.rmtree(tmp)


def make_ca(out: Path, *, name: str = "sidetune broker CA", days: int = 3650) -> Path:
    """``out/ca.key`` (0600) and ``out/ca.crt`` (0644): a self-signed CA. Returns ``out/ca.crt``."""
    tmp = _private_dir(out)
    try:
        (tmp / "req.cnf").write_text(_REQ_CONFIG.format(san="DNS:localhost"))
        _run(tmp, "req", "-x509", *_EC_KEY, "-config", "req.cnf", "-extensions", "ca", "-days", str(days),
             "-subj", f"/CN={name}", "-set_serial", f"0x{secrets.token_hex(16)}",
             "-keyout", "ca.key", "-out", "ca.crt")
        _install(tmp, out, "ca.key", "ca.crt")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "ca.crt"


def make_server_cert(out: Path, hostnames: Sequence[str], *, days: int = 825) -> Path:
    """``out/server.key`` (0600) and ``out/server.crt``, signed by ``out/ca.key``, valid for every
    name in ``hostnames`` plus localhost and 127.0.0.1. Returns ``out/server.crt``."""
    san = subject_alt_names(hostnames)
    cn = next((h for h in hostnames if len(h) <= 64), "sidetune broker")
    if not (out / "ca.key").exists():
        raise CertificateError(f"{out / 'ca.key'} does not exist: make the CA first")
    tmp = _private_dir(out)
    try:
        (tmp / "req.cnf").write_text(_REQ_CONFIG.format(san=",".join(san)))
        _run(tmp, "req", "-new", *_EC_KEY, "-config", "req.cnf", "-subj", f"/CN={cn}",
             "-keyout", "server.key", "-out", "server.csr")
        _run(tmp, "x509", "-req", "-in", "server.csr", "-CA", str((out / "ca.crt").resolve()),
             "-CAkey", str((out / "ca.key").resolve()), "-set_serial", f"0x{secrets.token_hex(16)}",
             "-days", str(days), "-extfile", "req.cnf", "-extensions", "server", "-out", "server.crt")
        _install(tmp, out, "server.key", "server.crt")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "server.crt"
