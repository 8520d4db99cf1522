"""`milter-wkd pending expire|list`: pending WKS confirmation requests in the directory.

expire is meant for cron or the systemd timer (systemd/milter-wkd-expire.timer): it deletes
every request past its expiry and prints how many. Both read --config FILE (default
/etc/milter-wkd/milter-wkd.toml); a missing file exits 2, the directory down 75.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from milter_wkd import config as config_mod
from milter_wkd.cli.io import add_config_option
from milter_wkd.store.ldapstore import LdapStore


def register(sub: Any) -> None:
    group = sub.add_parser("pending", help="pending WKS confirmation requests")
    commands = group.add_subparsers(dest="pending_command", required=True, metavar="ACTION")
    expire = commands.add_parser("expire", help="delete expired requests")
    add_config_option(expire)
    expire.set_defaults(func=_expire)
    listing = commands.add_parser("list", help="list pending requests")
    add_config_option(listing)
    listing.set_defaults(func=_list)


def _expire(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    with LdapStore(cfg.directory) as directory:
        removed = directory.expire_pending()
    print(f"expired {removed} pending request(s)")
    return 0


def _list(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    now = int(time.time())
    with LdapStore(cfg.directory) as directory:
        for request in directory.list_pending():
            state = "expired" if request.expires <= now else "pending"
            print(f"{request.address}\t{request.fingerprint}\t"
                  f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(request.expires))}\t{state}")
    return 0
