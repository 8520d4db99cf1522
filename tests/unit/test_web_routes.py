"""Routing of WKD requests and the policy file: pure logic, known answers."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milter_wkd.web.routes import (
    HttpError,
    Route,
    Router,
    policy_text,
    submission_address_text,
)

HASH = "iy9q119eutrkn8s1mk4r39qejnbu3n5q"  # Joe.Doe
ROUTER = Router(["example.org", "Example.NET"])


def route(path: str, host: str | None = "openpgpkey.example.org", method: str = "GET") -> Route:
    return ROUTER.route(method, host, path)


def refused(path: str, host: str | None = "openpgpkey.example.org", method: str = "GET") -> int:
    with pytest.raises(HttpError) as info:
        ROUTER.route(method, host, path)
    return info.value.status


def test_advanced_and_direct_methods() -> None:
    assert route(f"/.well-known/openpgpkey/example.org/hu/{HASH}") == Route(
        "key", "example.org", HASH)
    assert route(f"/.well-known/openpgpkey/hu/{HASH}", host="example.org") == Route(
        "key", "example.org", HASH)
    assert route(f"/.well-known/openpgpkey/example.net/hu/{HASH}",
                 host="OpenPGPKey.Example.Net:443") == Route("key", "example.net", HASH)
    assert route(f"/.well-known/openpgpkey/hu/{HASH}", host="example.org.") == Route(
        "key", "example.org", HASH)


def test_policy_and_submission_address_in_both_forms() -> None:
    assert route("/.well-known/openpgpkey/example.org/policy") == Route("policy", "example.org")
    assert route("/.well-known/openpgpkey/policy", host="example.org") == Route(
        "policy", "example.org")
    assert route("/.well-known/openpgpkey/example.org/submission-address") == Route(
        "submission-address", "example.org")
    assert route("/.well-known/openpgpkey/submission-address", host="example.net") == Route(
        "submission-address", "example.net")


def test_without_host_only_the_advanced_path_names_a_domain() -> None:
    assert route(f"/.well-known/openpgpkey/example.org/hu/{HASH}", host=None).domain == (
        "example.org")
    assert refused(f"/.well-known/openpgpkey/hu/{HASH}", host=None) == 400
    assert refused(f"/.well-known/openpgpkey/hu/{HASH}", host="") == 400


@pytest.mark.parametrize("bad_hash", [
    HASH.upper(), HASH[:-1], HASH + "y", "0" * 32, "iy9q119eutrkn8s1mk4r39qejnbu3n5l", "",
])
def test_malformed_hashes_are_400(bad_hash: str) -> None:
    assert refused(f"/.well-known/openpgpkey/example.org/hu/{bad_hash}") == 400


@pytest.mark.parametrize("path", [
    "/.well-known/openpgpkey/hu/../../../etc/passwd",
    "/.well-known/openpgpkey/../openpgpkey/hu/" + HASH,
    "/.well-known/openpgpkey/example.org/hu/./" + HASH,
    "/.well-known/openpgpkey/example.org/hu//" + HASH,
    "/.well-known/openpgpkey/example.org/%2e%2e/policy",
    "/.well-known/openpgpkey/example.org/hu/" + HASH + "/",
    "/.well-known/openpgpkey/example.org/",
])
def test_traversal_and_odd_shapes_are_refused(path: str) -> None:
    assert refused(path, host="example.org") == 400


def test_unknown_things_are_404() -> None:
    assert refused(f"/.well-known/openpgpkey/evil.org/hu/{HASH}", host="example.org") == 404
    assert refused(f"/.well-known/openpgpkey/hu/{HASH}", host="evil.org") == 404
    assert refused(f"/.well-known/openpgpkey/hu/{HASH}", host="openpgpkey.evil.org") == 404
    assert refused("/.well-known/openpgpkey/example.org/secret", host="example.org") == 404
    assert refused("/index.html", host="example.org") == 404
    # The advanced host serves only the advanced form.
    assert refused(f"/.well-known/openpgpkey/hu/{HASH}") == 404


def test_the_domain_in_the_path_is_case_insensitive_like_the_host() -> None:
    """@openpgp/wkd-client (OpenPGP.js) sends `…/openpgpkey/Example.ORG/hu/…` for
    ALICE@Example.ORG."""
    for host in ("openpgpkey.example.org", "OpenPGPKey.Example.ORG", "example.org", None):
        assert route(f"/.well-known/openpgpkey/Example.ORG/hu/{HASH}", host=host) == Route(
            "key", "example.org", HASH)
    assert route("/.well-known/openpgpkey/EXAMPLE.org/policy") == Route("policy", "example.org")
    assert refused(f"/.well-known/openpgpkey/Example.NET/hu/{HASH}") == 400  # not the Host's
    assert refused(f"/.well-known/openpgpkey/Evil.ORG/hu/{HASH}", host=None) == 404


@pytest.mark.parametrize("domain", [
    "Ex%41mple.org", "Example..ORG", ".Example.ORG", "Example.ORG.", "-Example.ORG",
    "Example.ORG%2f..", "E\\xample.ORG", "Example\u212a.org", "\u0130xample.org",
    "Example.ORG" + "A" * 250,
])
def test_a_mixed_case_domain_keeps_every_other_refusal(domain: str) -> None:
    # U+212A KELVIN SIGN and U+0130 fold to ASCII in str.lower(): never accepted.
    assert refused(f"/.well-known/openpgpkey/{domain}/hu/{HASH}", host=None) in (400, 404, 414)
    assert ROUTER.fast_slot(None, f"/.well-known/openpgpkey/{domain}/hu/{HASH}") is None


def test_domain_in_path_must_match_the_host() -> None:
    assert refused(f"/.well-known/openpgpkey/example.net/hu/{HASH}") == 400


@pytest.mark.parametrize("host", [
    "example.org/../x", "exa mple.org", "example..org", "-example.org", "example.org:99999x",
    "a" * 300, "example.org\r\nX-Injected: 1", "[::1]",
])
def test_odd_hosts_are_400(host: str) -> None:
    assert refused(f"/.well-known/openpgpkey/hu/{HASH}", host=host) == 400


def test_overlong_path_is_414_and_methods_are_limited() -> None:
    assert refused("/.well-known/openpgpkey/example.org/hu/" + "y" * 300) == 414
    assert refused(f"/.well-known/openpgpkey/example.org/hu/{HASH}", method="POST") == 405
    assert refused(f"/.well-known/openpgpkey/example.org/hu/{HASH}", method="OPTIONS") == 405
    assert route(f"/.well-known/openpgpkey/example.org/hu/{HASH}", method="HEAD").kind == "key"


def test_policy_file_byte_for_byte() -> None:
    text = policy_text("key-submission@example.org", protocol_version=3, auth_submit=True,
                       mailbox_only=True)
    assert text == (b"protocol-version: 3\nsubmission-address: key-submission@example.org\n"
                    b"mailbox-only\nauth-submit\n")
    plain = policy_text("ks@example.net", protocol_version=5, auth_submit=False,
                        mailbox_only=False)
    assert plain == b"protocol-version: 5\nsubmission-address: ks@example.net\n"
    assert submission_address_text("key-submission@example.org") == (
        b"key-submission@example.org\n")


@pytest.mark.parametrize(("host", "path"), [
    ("openpgpkey.example.org", f"/.well-known/openpgpkey/example.org/hu/{HASH}"),
    ("openpgpkey.example.org:443", f"/.well-known/openpgpkey/example.org/hu/{HASH}"),
    ("example.org", f"/.well-known/openpgpkey/hu/{HASH}"),
    ("example.org", f"/.well-known/openpgpkey/example.org/hu/{HASH}"),
    ("openpgpkey.example.net", f"/.well-known/openpgpkey/example.net/hu/{HASH}"),
    ("openpgpkey.example.org", f"/.well-known/openpgpkey/hu/{HASH}"),
    ("openpgpkey.example.org", f"/.well-known/openpgpkey/example.net/hu/{HASH}"),
    ("OPENPGPKEY.example.org", f"/.well-known/openpgpkey/example.org/hu/{HASH}"),
    ("evil.org", f"/.well-known/openpgpkey/hu/{HASH}"),
    ("example.org", f"/.well-known/openpgpkey/hu/{HASH.upper()}"),
    ("example.org", f"/.well-known/openpgpkey/hu/{HASH}/"),
    ("example.org", "/.well-known/openpgpkey/policy"),
    (None, f"/.well-known/openpgpkey/example.org/hu/{HASH}"),
    ("example.org", f"/.well-known/openpgpkey/hu/{HASH[:-1]}0"),  # 0, l, v: not z-base-32
    ("example.org", f"/.well-known/openpgpkey/hu/l{HASH[1:]}"),
    ("example.org", f"/.well-known/openpgpkey/hu/{HASH[:31]}"),
    ("example.org", f"/.well-known/openpgpkey/hu/y{HASH}"),
    ("example.org", f"/.well-known/openpgpkey/hu//{HASH[1:]}"),
    ("example.org", f"/.well-known/openpgpkey/hu/{HASH[:16]}/{HASH[17:]}"),
    ("", HASH),
    ("openpgpkey.example.org", f"/.well-known/openpgpkey/Example.ORG/hu/{HASH}"),
    ("OpenPGPKey.Example.ORG:443", f"/.well-known/openpgpkey/example.ORG/hu/{HASH}"),
    ("EXAMPLE.ORG", f"/.well-known/openpgpkey/hu/{HASH}"),
    ("example.org", f"/.WELL-KNOWN/openpgpkey/example.org/hu/{HASH}"),
    ("example.org", f"/.well-known/openpgpkey/example.org/HU/{HASH}"),
    ("example.org", f"/.well-known/OpenPGPKey/hu/{HASH}"),
    ("openpgp\u212aey.example.org", f"/.well-known/openpgpkey/example.org/hu/{HASH}"),
    ("openpgpkey.example.org", f"/.well-known/openpgpkey/example.or\u212a/hu/{HASH}"),
    ("openpgpkey.example.org", f"/.well-known/openpgpkey/\u0130example.org/hu/{HASH}"),
])
def test_the_fast_path_agrees_with_the_careful_one(host: str | None, path: str) -> None:
    fast = ROUTER.fast_slot(host, path)
    try:
        careful = ROUTER.route("GET", host, path)
    except HttpError:
        assert fast is None
        return
    if fast is not None:
        assert careful.kind == "key"
        assert fast == f"{careful.hash}@{careful.domain}"


@settings(max_examples=500)
@given(host=st.sampled_from([None, "", "example.org", "openpgpkey.example.org", "example.net",
                             "openpgpkey.example.net:443", "example.org:443", "evil.org"]),
       head=st.sampled_from(["/.well-known/openpgpkey/", "/.well-known/openpgpkey/example.org/",
                             "/.well-known/openpgpkey/example.net/", "/", ""]),
       middle=st.sampled_from(["hu/", "hu//", "HU/", "", "hu/x"]),
       hash_=st.text(alphabet="ybndrfg8ejkmcpqxot1uwisza345h769lv0/.%Y", min_size=28,
                     max_size=34))
def test_the_fast_path_never_disagrees(host: str | None, head: str, middle: str,
                                       hash_: str) -> None:
    test_the_fast_path_agrees_with_the_careful_one(host, head + middle + hash_)


def case_variants(text: str) -> st.SearchStrategy[str]:
    """`text` with each letter in either case, or swapped for a non-ASCII letter that
    str.lower() folds to ASCII (KELVIN SIGN -> k, LATIN CAPITAL I WITH DOT -> i + dot)."""
    def variants(c: str) -> st.SearchStrategy[str]:
        extra = {"k": ["\u212a"], "i": ["\u0130"]}.get(c, [])
        return st.sampled_from([c, c.upper(), *extra])
    return st.tuples(*(variants(c) for c in text)).map("".join)


@settings(max_examples=500)
@given(host=st.one_of(st.none(), case_variants("openpgpkey.example.org"),
                      case_variants("example.net:443"), case_variants("openpgpkey.evil.org")),
       prefix=st.sampled_from(["/.well-known/openpgpkey/", "/.well-known/OpenPGPKey/"]),
       domain=st.one_of(case_variants("example.org"), case_variants("example.net"),
                        st.sampled_from(["", "hu", "Example..ORG", "Ex%41mple.org"])),
       middle=st.sampled_from(["/hu/", "/HU/", "/hu//", "hu/"]),
       hash_=st.sampled_from([HASH, HASH.upper(), HASH[:-1] + "\u212a"]))
def test_the_fast_path_and_the_router_agree_on_mixed_case(
        host: str | None, prefix: str, domain: str, middle: str, hash_: str) -> None:
    path = prefix + domain + middle + hash_
    test_the_fast_path_agrees_with_the_careful_one(host, path)
    # And a well-formed request with a Host in any ASCII case takes the fast path.
    if (prefix.islower() and middle == "/hu/" and hash_ == HASH and host is not None
            and host.isascii() and domain.isascii() and domain.lower() in ROUTER.domains
            and host.lower() in (f"openpgpkey.{domain.lower()}", f"{domain.lower()}:443")):
        assert ROUTER.fast_slot(host, path) == f"{HASH}@{domain.lower()}"
