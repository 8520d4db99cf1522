"""`milter-wkd milter --config FILE`: run the milter daemon in the foreground.

systemd runs it (see systemd/milter-wkd.service); SIGTERM stops it. The unix socket is
created with [milter] socket_mode (the process umask is set from it until libmilter has
made the socket: a chmod afterwards left a window in which Postfix was refused and
answered 451) and then given socket_group (under systemd the unit's group already is
Postfix's, so the socket is right from its first moment), so the MTA's user can connect
while others cannot. The key follower (milter_wkd.reconcile) runs beside
it in a thread: the milter's account is the one that may write keys.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import grp
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from milter_wkd import config as config_mod
from milter_wkd import mailer, milter
from milter_wkd.config import ConfigError
from milter_wkd.openpgp import Limits
from milter_wkd.reconcile import Reconciler
from milter_wkd.service import MailService
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import User

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser("milter", help="run the milter (WKS submissions, Autocrypt)")
    parser.add_argument("--config", default=str(config_mod.DEFAULT_PATH), metavar="FILE")
    parser.add_argument("--socket", help="override [milter] socket")
    parser.set_defaults(func=_run)


def _fix_socket(path: Path, mode: int, group: str, umask: int) -> None:
    """Wait for libmilter to create the socket, then restore the umask and set its group
    (and mode, should the umask not have been the one in force)."""
    for _ in range(100):
        if path.exists():
            os.umask(umask)
            try:
                if group:
                    os.chown(path, -1, grp.getgrnam(group).gr_gid)
                path.chmod(mode)
            except (OSError, KeyError) as exc:
                log.error("cannot set mode/group of %s: %s", path, exc)  # noqa: TRY400
            return
        time.sleep(0.05)
    os.umask(umask)
    log.error("milter socket %s did not appear", path)


def _run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    socket_spec = args.socket or cfg.milter.socket
    try:
        mode = int(cfg.milter.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"[milter] socket_mode {cfg.milter.socket_mode!r} is not octal") from None
    if socket_spec.startswith(("unix:", "local:")):
        path = Path(socket_spec.split(":", 1)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # bind() makes the socket 0777 & ~umask: born with socket_mode, never wider.
        umask = os.umask(0o777 & ~mode)
        threading.Thread(target=_fix_socket,
                         args=(path, mode, cfg.milter.socket_group, umask),
                         daemon=True).start()
    directory = LdapStore(cfg.directory)
    service = MailService(cfg, directory, mailer.from_config(cfg.mailer))
    # The key follower gets its own connection: its passes never wait for mail's slots.
    # At least two connections: its paged walk holds one while it writes with another.
    follower_directory = LdapStore(dataclasses.replace(
        cfg.directory, pool_size=max(2, cfg.directory.pool_size)))
    mailbox_only = {d.name.lower() for d in cfg.domains if d.mailbox_only}

    def limits_for(user: User) -> Limits:
        # As a submission for these addresses would be cleaned (a domain's mailbox-only).
        return cfg.keys.limits(mailbox_only=any(a.domain in mailbox_only
                                                for a in user.addresses))

    follower = Reconciler(follower_directory, limits=limits_for)
    follower.start()
    try:
        milter.run(service, socket_spec, cfg.milter.timeout)
    finally:
        follower.stop()
        follower_directory.close()
        directory.close()
    return 0
