"""milter-wkd: a mail provider's own OpenPGP keyserver, built into its mail system.

WKS submissions answered by a milter, keys stored on the users' LDAP entries, served by a
WKD responder, and announced in Autocrypt headers. See README.md for the parts and their state.
"""

__version__ = "0.1.0"
