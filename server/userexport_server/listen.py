"""Listen addresses: the one parser of "host:port", and a check that a port is free before anything starts.

The check exists for the operator: a port in use must end startup with one line naming the
address, before migrations run and before gRPC's core logs its own multi-line bind failure.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket

_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")
# Errors the probe reports; others (an address of a resolved name this machine lacks, such as
# ::1 without IPv6) are left to the real bind, which succeeds on the addresses that do exist.
_PROBE_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES})


def parse_listen(text: str) -> tuple[str, int]:
    """"host:port" or "[v6 address]:port" -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid_host = _is_ip(host, version=6)
    else:
        valid_host = _is_ip(host, version=4) or bool(_HOSTNAME.fullmatch(host))
    if not sep or not valid_host:
        raise ValueError(f"{text!r} is not HOST:PORT (an IPv6 host goes in brackets: [::1]:50051)")
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} has no valid port (0..65535)")
    return host, int(port)


def check_free(listen: str) -> None:
    """Raise OSError (with `describe_error` wording) if `listen`'s port is taken or forbidden.

    Port 0 (any free port) is always free. The probe binds with SO_REUSEADDR, as servers do, so
    it fails only where a real listener would: on a port someone is listening on.
    """
    host, port = parse_listen(listen)
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in _PROBE_ERRORS:
                    raise
                # otherwise left to the real bind


def describe_error(exc: OSError) -> str:
    """"address in use", "permission denied", ...: the lower-case reason for one-line messages."""
    if isinstance(exc, socket.gaierror):
        return "host not found"
    if exc.errno == errno.EADDRINUSE:
        return "address in use"
    return (exc.strerror or os.strerror(exc.errno or 0) or str(exc)).lower()


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False
