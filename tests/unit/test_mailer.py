"""How generated mail leaves: the [mailer] methods, and what a failure to hand it over is."""

from email import message_from_bytes
from pathlib import Path

import pytest

from milter_wkd import mailer
from milter_wkd.cli import EX_TEMPFAIL
from milter_wkd.config import ConfigError, MailerConfig
from milter_wkd.errors import Unavailable
from milter_wkd.mailer import FolderMailer, MailerUnavailable


@pytest.mark.parametrize("method", ["folder", "directory"])  # "directory": the old name
def test_the_folder_method_writes_one_file_per_message(method: str, tmp_path: Path) -> None:
    chosen = mailer.from_config(MailerConfig(method=method, directory=str(tmp_path / "out")))
    assert isinstance(chosen, FolderMailer)
    chosen.send("key-submission@example.org", "alice@example.org",
                b"Subject: hello\r\n\r\nbody\r\n")
    (written,) = (tmp_path / "out").iterdir()
    assert written.suffix == ".eml"
    parsed = message_from_bytes(written.read_bytes())
    assert (parsed["X-Envelope-From"], parsed["X-Envelope-To"], parsed["Subject"]) == (
        "key-submission@example.org", "alice@example.org", "hello")


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "folder"}, "method folder needs directory"),
    ({"method": "pigeon"}, "smtp, sendmail or folder, not 'pigeon'"),
])
def test_a_mailer_section_without_a_usable_method_is_a_config_error(
        settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        mailer.from_config(MailerConfig(**settings))


def test_a_mailer_that_cannot_hand_over_is_temporarily_unavailable(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(MailerUnavailable, match="cannot write") as caught:
        FolderMailer(blocked).send("a@example.org", "b@example.org", b"\r\n")
    # An Unavailable: the milter answers 451, a command exits 75 (not 1).
    assert isinstance(caught.value, Unavailable)
    assert caught.value.exit_code == EX_TEMPFAIL
