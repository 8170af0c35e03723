"""Command-line pieces shared by the `userexport` CLI and `userexport-server` (kept apart from the
CLI, so the server imports nothing of it): the TLS options, and integer arguments with a floor."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

from .api import TlsConfig

# TLS options, also taken by `userexport-server health`; any of them turns TLS on.
TLS_OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--tls-ca-file", "USEREXPORT_TLS_CA_FILE", None, "PEM roots the server's certificate must chain to"),
    ("--tls-client-cert-file", "USEREXPORT_TLS_CLIENT_CERT_FILE", None, "PEM client certificate (mutual TLS)"),
    ("--tls-client-key-file", "USEREXPORT_TLS_CLIENT_KEY_FILE", None, "PEM key of the client certificate"),
    ("--tls-server-name", "USEREXPORT_TLS_SERVER_NAME", None, "name to verify in the server's certificate"),
)
_TLS_FLAG, _TLS_ENV = "--tls", "USEREXPORT_TLS"


def add_tls_options(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None) -> None:
    """The TLS flags, defaulting to their environment variables (environ None: hidden copies)."""
    for flag, env, fallback, help_text in TLS_OPTIONS:
        if environ is None:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, default=environ.get(env) or fallback, help=f"{help_text}; env {env}")
    if environ is None:
        parser.add_argument(_TLS_FLAG, action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    else:
        parser.add_argument(_TLS_FLAG, action="store_true",
                            default=environ.get(_TLS_ENV, "").lower() in ("1", "true", "yes"),
                            help=f"TLS trusting the system's roots (implied by the --tls-* options); env {_TLS_ENV}=1")


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS the options ask for, None for plaintext."""
    config = TlsConfig(ca_file=args.tls_ca_file, cert_file=args.tls_client_cert_file,
                       key_file=args.tls_client_key_file, server_name=args.tls_server_name)
    return config if args.tls or config != TlsConfig() else None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for an integer >= `minimum` whose error says so: argparse's own would read
    "invalid parse value: 'abc'"."""
    wanted = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse
