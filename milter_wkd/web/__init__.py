"""milter_wkd.web — the Web Key Directory responder (WSGI).

Serves, for every configured domain, the advanced (`Host: openpgpkey.<domain>`) and direct
(`Host: <domain>`) WKD forms: keys by hash, the policy and submission-address files.
Keys come from memory (`cache.KeyCache`), kept fresh by an RFC 4533 sync with the
directory (`web.sync`, `store.syncrepl`; polling its change token when it offers none);
the directory is read through `store.ldapview.LdapKeyView` (any `store.view.KeyView` will do).

Configuration: [directory], [web] and the [[domains]] tables of the config file; the
directory is read as [web] bind_dn (the read-only cn=wkd account) when that is set, else as
[directory] says (`Config.responder_directory`). Serving:
`milter-wkd web --config FILE` runs this app under granian over HTTPS (see
`milter_wkd.cli.web`); `wsgi_app` is the factory a WSGI server imports, reading the config
path from MILTER_WKD_CONFIG.
"""

from __future__ import annotations

import os

from milter_wkd import config as config_module
from milter_wkd import openpgp
from milter_wkd.config import Config
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.values import Address
from milter_wkd.web.app import WkdApp
from milter_wkd.web.cache import KeyCache

__all__ = ["CONFIG_ENV", "KeyCache", "WkdApp", "create_app", "wsgi_app"]

CONFIG_ENV = "MILTER_WKD_CONFIG"


def create_app(config: Config, *, start: bool = True) -> WkdApp:
    """The WSGI app for a config; `start` launches the cache's mirroring/refresh thread."""
    web = config.web
    limits = config.keys.limits()

    def cleaner(key: bytes, address: Address) -> bytes:
        # The [keys] policy of the submissions: what was published is what is served.
        return openpgp.clean_key(key, [address], limits=limits).key

    cache = KeyCache(LdapKeyView(config.responder_directory()), budget=web.cache_bytes,
                     refresh_interval=web.refresh_interval,
                     reconcile_interval=web.reconcile_interval, cleaner=cleaner)
    if start:
        cache.start()
    return WkdApp(cache, config.domains, max_age=web.max_age)


def wsgi_app() -> WkdApp:
    """Factory for WSGI servers (`granian --factory milter_wkd.web:wsgi_app`)."""
    return create_app(config_module.load(os.environ.get(CONFIG_ENV)))
