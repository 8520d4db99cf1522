"""The key store: the only package that speaks LDAP.

- `model`: plain values (User, StoredKey, Provenance, PendingRequest) and the claims rule;
- `schema`: keys <-> LDAP attributes, and the ONE rule for what an entry publishes;
- `connection`: pooled python-ldap connections, searches, errors in LDAP's words;
- `ldapstore`: `LdapStore`, the write store of the milter, the CLI and the follower;
- `view`: `KeyView`, what the WKD responder needs, and `LdapKeyView` over LDAP.
"""
