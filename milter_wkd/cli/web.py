"""`milter-wkd web --config FILE`: serve the WKD responder over HTTPS with granian.

granian (a Rust HTTP server, `--interface wsgi`) was chosen by measurement: on a 2-core
machine, HTTPS with keep-alive, it serves this app at roughly nginx's static-file rate,
where gunicorn's threaded worker manages about a seventh of it (benchmarks/wkd.py).
Reads [web] (address, port, certificate and key, workers, threads, keep-alive, and
bind_dn/bind_password_file: the read-only account it binds as), [directory] and
[[domains]]. With an empty cert_file it speaks plain HTTP, for a TLS-terminating reverse
proxy on the same host (docs/nginx-wkd.conf). Each worker process builds the app
from the same config file (MILTER_WKD_CONFIG) and keeps its own key cache. Runs in the
foreground until SIGTERM/SIGINT.
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
from milter_wkd.errors import MilterWkdError
from milter_wkd.web import CONFIG_ENV

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    web = sub.add_parser("web", help="serve the Web Key Directory over HTTPS")
    web.add_argument("--config", metavar="FILE", help="config file (default: "
                     f"{config_module.DEFAULT_PATH})")
    web.set_defaults(func=_serve)


def workers_for(configured: int) -> int:
    """0 means one worker per CPU core this process may use."""
    if configured > 0:
        return configured
    return max(1, len(os.sched_getaffinity(0)))


def _serve(args: argparse.Namespace) -> int:
    path = Path(args.config or config_module.DEFAULT_PATH).resolve()
    cfg = config_module.load(path)
    web = cfg.web
    tls = bool(web.cert_file)
    for name in (web.cert_file, web.key_file) if tls else ():
        if not Path(name).is_file():
            raise MilterWkdError(f"[web] certificate or key file {name} does not exist")
    os.environ[CONFIG_ENV] = str(path)
    server = Granian(
        "milter_wkd.web:wsgi_app",
        factory=True,
        interface=Interfaces.WSGI,
        address=web.listen_address,
        port=web.port,
        workers=workers_for(web.workers),
        blocking_threads=web.threads,
        backlog=2048,
        http1_settings=HTTP1Settings(header_read_timeout=web.keep_alive_seconds * 1000,
                                     keep_alive=True),
        ssl_cert=Path(web.cert_file) if tls else None,
        ssl_key=Path(web.key_file) if tls else None,
        ssl_protocol_min=SSLProtocols.tls12,
        log_enabled=True,
        log_level=LogLevels.warning,
        respawn_failed_workers=True,
        websockets=False,
    )
    log.info("serving WKD on %s://%s:%d/", "https" if tls else "http", web.listen_address,
             web.port)
    server.serve()
    return 0

