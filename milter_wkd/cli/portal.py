"""`milter-wkd portal --config FILE [--listen HOST:PORT]`: serve the self-service key page
over HTTPS with granian, as `milter-wkd web` serves the responder (milter_wkd.cli.web).

Reads [portal] (listen, cert_file and key_file, secret_key_file, workers, threads),
[directory] (the milter's write account: the page publishes through it after signing the
user in) and [keys]/[[domains]] (the publication policy). With an empty cert_file it speaks
plain HTTP, for a TLS-terminating reverse proxy on the same host. Each worker builds the
app from the same config file (MILTER_WKD_PORTAL_CONFIG) and keeps its own rate-limit
counters. Runs in the foreground until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from granian import Granian
from granian.constants import Interfaces, SSLProtocols
from granian.http import HTTP1Settings
from granian.log import LogLevels

from milter_wkd import config as config_module
from milter_wkd.errors import MilterWkdError, Refused
from milter_wkd.portal import CONFIG_ENV
from milter_wkd.portal.app import read_secret_key

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    portal = sub.add_parser("portal", help="serve the self-service key page over HTTPS")
    portal.add_argument("--config", metavar="FILE", help="config file (default: "
                        f"{config_module.DEFAULT_PATH})")
    portal.add_argument("--listen", metavar="HOST:PORT",
                        help="address and port to listen on (default: [portal] listen)")
    portal.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    path = Path(args.config or config_module.DEFAULT_PATH).resolve()
    cfg = config_module.load(path)
    portal = cfg.portal
    listen = config_module.parse_host_port(args.listen or portal.listen)
    if listen is None:
        raise Refused(f"--listen: HOST:PORT, not {args.listen!r}")
    host, port = listen
    tls = bool(portal.cert_file)
    for name in (portal.cert_file, portal.key_file) if tls else ():
        if not Path(name).is_file():
            raise MilterWkdError(f"[portal] certificate or key file {name} does not exist")
    read_secret_key(portal.secret_key_file)  # fail here, not in every worker
    os.environ[CONFIG_ENV] = str(path)
    server = Granian(
        "milter_wkd.portal:wsgi_app",
        factory=True,
        interface=Interfaces.WSGI,
        address=host,
        port=port,
        workers=portal.workers,
        blocking_threads=portal.threads,
        http1_settings=HTTP1Settings(header_read_timeout=30_000, keep_alive=True),
        ssl_cert=Path(portal.cert_file) if tls else None,
        ssl_key=Path(portal.key_file) if tls else None,
        ssl_protocol_min=SSLProtocols.tls12,
        log_enabled=True,
        log_level=LogLevels.warning,
        respawn_failed_workers=True,
        websockets=False,
    )
    log.info("serving the self-service page on %s://%s:%d/", "https" if tls else "http",
             host, port)
    server.serve()
    return 0
