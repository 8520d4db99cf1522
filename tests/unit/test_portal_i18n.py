"""The self-service page in German: chosen by Accept-Language, every string translated, and
the compiled catalogue made from the one in the repository."""

from __future__ import annotations

import io
from pathlib import Path

from babel.messages.extract import extract_from_dir
from babel.messages.mofile import read_mo, write_mo
from babel.messages.pofile import read_po
from flask.testing import FlaskClient

from tests.unit.test_portal import BASE, app, auth, client, clock, store  # noqa: F401 (fixtures)

PORTAL = Path(__file__).resolve().parents[2] / "milter_wkd" / "portal"
CATALOGUE = PORTAL / "translations" / "de" / "LC_MESSAGES"
METHODS = [("**.py", "python"), ("templates/**.html", "jinja2")]


def test_the_browsers_language_chooses_the_catalogue(client: FlaskClient) -> None:  # noqa: F811
    german = client.get("/", base_url=BASE, headers={"Accept-Language": "de-DE,de;q=0.9"},
                        follow_redirects=True).get_data(as_text=True)
    assert '<html lang="de">' in german
    assert "Mailpasswort" in german
    english = client.get("/", base_url=BASE, headers={"Accept-Language": "fr, en;q=0.5"},
                         follow_redirects=True).get_data(as_text=True)
    assert '<html lang="en">' in english
    assert "Mail password" in english


def test_every_string_of_the_page_is_translated() -> None:
    catalogue = read_po(io.BytesIO((CATALOGUE / "messages.po").read_bytes()))
    found = {message[2] for message in extract_from_dir(
        str(PORTAL), METHODS, keywords={"_": None, "gettext": None})}
    untranslated = sorted(str(m) for m in found
                          if not catalogue.get(m) or not catalogue.get(m).string)
    assert untranslated == []


def test_the_compiled_catalogue_is_the_repositorys() -> None:
    source = read_po(io.BytesIO((CATALOGUE / "messages.po").read_bytes()))
    compiled = read_mo(io.BytesIO((CATALOGUE / "messages.mo").read_bytes()))
    assert {m.id: m.string for m in source if m.id} == {m.id: m.string for m in compiled
                                                        if m.id}
    fresh = io.BytesIO()
    write_mo(fresh, source)  # how it was made (make translations would do the same)
    assert read_mo(io.BytesIO(fresh.getvalue())).get("Sign in").string == "Anmelden"
