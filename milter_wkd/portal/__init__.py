"""The self-service key page (`milter-wkd portal`): users sign in with their mail address
and mail password, see their published key, upload a new one, unpublish it (for one
address or all), or publish its revocation certificate.

A WSGI process of its own, beside the read-only WKD responder: it writes through the
store's write account ([directory] bind_dn, the milter's) after authenticating the user
by a bind as their own entry (`milter_wkd.store.auth`). See `milter_wkd.portal.app` for the
pages and the security measures, [portal] in the config for its settings.

`wsgi_app()` builds the app from the config file named by MILTER_WKD_PORTAL_CONFIG (how
`milter-wkd portal` starts each granian worker).
"""

from __future__ import annotations

import os
from typing import Any

from milter_wkd.portal.app import Authenticator, create_app

__all__ = ["CONFIG_ENV", "Authenticator", "create_app", "wsgi_app"]

CONFIG_ENV = "MILTER_WKD_PORTAL_CONFIG"


def wsgi_app() -> Any:
    """The app for one server worker, bound to the directory as [directory] says."""
    from milter_wkd import config as config_module  # noqa: PLC0415
    from milter_wkd.store.auth import LdapAuthenticator  # noqa: PLC0415
    from milter_wkd.store.ldapstore import LdapStore  # noqa: PLC0415

    cfg = config_module.load(os.environ.get(CONFIG_ENV))
    store = LdapStore(cfg.directory)
    return create_app(cfg, store, LdapAuthenticator(cfg.directory, store))
