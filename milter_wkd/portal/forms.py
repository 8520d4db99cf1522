"""The page's forms (WTForms through Flask-WTF: parsing, and a CSRF token in each)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from wtforms import HiddenField, PasswordField, StringField, TextAreaField


class SignInForm(FlaskForm):  # type: ignore[misc]  # Flask-WTF has no type information
    address = StringField("Mail address")
    # No DataRequired: an empty password gets the same answer as a wrong one.
    password = PasswordField("Mail password")


class UploadForm(FlaskForm):  # type: ignore[misc]
    key_file = FileField("Key file")
    key_text = TextAreaField("Or paste the key")


class UnpublishForm(FlaskForm):  # type: ignore[misc]
    password = PasswordField("Mail password")
    # One address to stop publishing the key for; empty: the whole key.
    address = HiddenField()


class RevocationForm(FlaskForm):  # type: ignore[misc]
    revocation_file = FileField("Revocation certificate file")
    revocation_text = TextAreaField("Or paste the revocation certificate")


class SignOutForm(FlaskForm):  # type: ignore[misc]
    pass
