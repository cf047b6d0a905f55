"""Secrets: placeholders, host-scoped substitution in headers, leaks, redaction."""

from __future__ import annotations

import base64
import gzip
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretLeak, SecretStore

TOKEN = "ghp_REALtoken123"
PASSWORD = "s3cr3t-pässword"


@pytest.fixture
def store() -> SecretStore:
    return SecretStore(
        {
            "GITHUB_TOKEN": Secret(TOKEN, ["api.github.com"]),
            "DB_PASS": Secret(PASSWORD, ["*.db.example:8443"]),
        }
    )


def basic(user: str, password: str, charset: str = "utf-8") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode(charset)).decode()


def test_placeholder_format_and_env(store: SecretStore) -> None:
    env = store.env()
    assert set(env) == {"GITHUB_TOKEN", "DB_PASS"}
    assert re.fullmatch(r"GONDOLIN_SECRET_GITHUB_TOKEN_[0-9a-f]{32}", env["GITHUB_TOKEN"])
    assert TOKEN not in repr(env)
    assert store.placeholder("DB_PASS") == env["DB_PASS"]
    other = SecretStore({"GITHUB_TOKEN": Secret(TOKEN, ["api.github.com"])})
    assert other.placeholder("GITHUB_TOKEN") != env["GITHUB_TOKEN"]  # fresh randomness per store


def test_secret_repr_hides_value() -> None:
    secret = Secret(TOKEN, ["api.github.com"])
    assert TOKEN not in repr(secret)
    assert TOKEN not in str(secret)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"value": "", "hosts": ["a.com"]}, "non-empty string"),
        ({"value": "a\r\nX-Injected: 1", "hosts": ["a.com"]}, "control characters"),
        ({"value": "v", "hosts": []}, "could never be sent"),
        ({"value": "v", "hosts": "a.com"}, "expected a list of host names"),
        ({"value": "v", "hosts": ["a.com", ""]}, r"Secret.hosts\[1\]: expected a host name"),
        ({"value": "v", "hosts": [3]}, r"Secret.hosts\[0\]: expected a host name"),
    ],
)
def test_secret_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Secret(**kwargs)  # type: ignore[arg-type]


def test_substitutes_in_headers_for_matching_host(store: SecretStore) -> None:
    ph = store.placeholder("GITHUB_TOKEN")
    headers = [("Host", "api.github.com"), ("Authorization", f"Bearer {ph}"), ("X-Other", "keep")]
    new, url = store.apply("API.GitHub.com", headers, "https://api.github.com/user", b"", port=443)
    assert new == [
        ("Host", "api.github.com"),
        ("Authorization", f"Bearer {TOKEN}"),
        ("X-Other", "keep"),
    ]
    assert url == "https://api.github.com/user"


def test_wildcard_and_port_scoped_secret(store: SecretStore) -> None:
    ph = store.placeholder("DB_PASS")
    new, _ = store.apply(
        "eu.db.example", [("X-Pass", ph)], "https://eu.db.example:8443/", b"", port=8443
    )
    assert new == [("X-Pass", PASSWORD)]
    # negative controls: wrong port, apex, unknown port
    for host, port in (("eu.db.example", 443), ("db.example", 8443), ("eu.db.example", None)):
        with pytest.raises(SecretLeak):
            store.apply(host, [("X-Pass", ph)], "https://x/", b"", port=port)


@pytest.mark.parametrize("charset", ["utf-8", "latin-1"])
def test_basic_auth_is_decoded_substituted_and_reencoded(store: SecretStore, charset: str) -> None:
    """The guest's charset is kept when it shows (a non-ASCII user name); UTF-8 otherwise."""
    ph = store.placeholder("DB_PASS")
    headers = [("Authorization", basic("jörg", ph, charset))]
    new, _ = store.apply("eu.db.example", headers, "https://eu.db.example:8443/", b"", port=8443)
    ((name, value),) = new
    assert name == "Authorization"
    scheme, token = value.split(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode(charset) == f"jörg:{PASSWORD}"


def test_basic_auth_for_other_host_is_a_leak(store: SecretStore) -> None:
    headers = [("Proxy-Authorization", basic("admin", store.placeholder("DB_PASS")))]
    with pytest.raises(SecretLeak, match="DB_PASS") as info:
        store.apply("evil.example", headers, "https://evil.example/", b"", port=8443)
    assert "Basic credentials" in info.value.where


def test_basic_auth_without_placeholder_untouched(store: SecretStore) -> None:
    headers = [("Authorization", basic("u", "p")), ("Authorization", "Basic !!notbase64")]
    assert store.apply("evil.example", headers, "http://evil.example/", b"")[0] == headers


@pytest.mark.parametrize(
    ("where", "url", "body", "headers"),
    [
        ("url", "https://api.github.com/?token={ph}", b"", []),
        ("body", "https://api.github.com/", b'{"token": "{ph}"}', []),
        ("header name", "https://api.github.com/", b"", [("X-{ph}", "1")]),
    ],
)
def test_placeholder_outside_header_values_is_denied_even_for_matching_host(
    store: SecretStore, where: str, url: str, body: bytes, headers: list[tuple[str, str]]
) -> None:
    ph = store.placeholder("GITHUB_TOKEN")
    url = url.replace("{ph}", ph)
    body = body.replace(b"{ph}", ph.encode())
    headers = [(n.replace("{ph}", ph), v) for n, v in headers]
    with pytest.raises(SecretLeak) as info:
        store.apply("api.github.com", headers, url, body, port=443)
    assert info.value.name == "GITHUB_TOKEN"
    assert info.value.where == where
    assert TOKEN not in str(info.value)
    assert isinstance(info.value, NetworkPolicyError)


def test_header_for_non_matching_host_is_denied(store: SecretStore) -> None:
    ph = store.placeholder("GITHUB_TOKEN")
    with pytest.raises(SecretLeak, match=r"secret GITHUB_TOKEN .* to evil.example:443") as info:
        store.apply(
            "evil.example",
            [("Authorization", f"token {ph}")],
            "https://evil.example/",
            b"",
            port=443,
        )
    assert TOKEN not in str(info.value)
    # and an invalid destination never gets anything either
    with pytest.raises(SecretLeak):
        store.apply("not a host", [("Authorization", ph)], "https://x/", b"", port=443)


def test_one_leaking_header_means_nothing_is_substituted(store: SecretStore) -> None:
    gh, db = store.placeholder("GITHUB_TOKEN"), store.placeholder("DB_PASS")
    with pytest.raises(SecretLeak, match="DB_PASS"):
        store.apply(
            "api.github.com", [("A", gh), ("B", db)], "https://api.github.com/", b"", port=443
        )


def test_non_latin1_value_in_plain_header_is_refused() -> None:
    store = SecretStore({"S": Secret("пароль", ["a.example"])})
    with pytest.raises(NetworkPolicyError, match="not ISO-8859-1") as info:
        store.apply("a.example", [("X", store.placeholder("S"))], "https://a.example/", b"")
    assert "пароль" not in str(info.value)
    # ... but it is fine inside Basic credentials (UTF-8, RFC 7617)
    new, _ = store.apply(
        "a.example",
        [("Authorization", basic("u", store.placeholder("S")))],
        "https://a.example/",
        b"",
    )
    assert base64.b64decode(new[0][1].split()[1]).decode() == "u:пароль"


def test_redact_text_and_bytes(store: SecretStore) -> None:
    gh, db = store.placeholder("GITHUB_TOKEN"), store.placeholder("DB_PASS")
    assert store.redact(f"token={TOKEN}; pw={PASSWORD}") == f"token={gh}; pw={db}"
    assert store.redact(f"pw={PASSWORD}".encode()) == f"pw={db}".encode()
    assert store.redact(f"pw={PASSWORD}".encode("latin-1")) == f"pw={db}".encode()
    assert store.redact("nothing secret") == "nothing secret"


def test_redact_covers_basic_tokens_built_by_apply(store: SecretStore) -> None:
    guest_header = basic("admin", store.placeholder("DB_PASS"))
    new, _ = store.apply(
        "eu.db.example",
        [("Authorization", guest_header)],
        "https://eu.db.example:8443/",
        b"",
        port=8443,
    )
    sent = new[0][1]
    echoed = f'{{"headers": {{"Authorization": "{sent}"}}}}'
    assert store.redact(echoed) == f'{{"headers": {{"Authorization": "{guest_header}"}}}}'
    assert store.redact(echoed.encode()) == echoed.replace(sent, guest_header).encode()


def test_redact_prefers_longer_values() -> None:
    store = SecretStore(
        {"SHORT": Secret("abc", ["a.example"]), "LONG": Secret("abcdef", ["a.example"])}
    )
    assert store.redact("abcdef abc") == f"{store.placeholder('LONG')} {store.placeholder('SHORT')}"


@given(
    st.text(max_size=200),
    st.binary(max_size=200),
    st.lists(st.tuples(st.text(max_size=40), st.text(max_size=80)), max_size=5),
)
def test_apply_never_fails_unexpectedly(
    url: str, body: bytes, headers: list[tuple[str, str]]
) -> None:
    """Hostile input: apply returns or raises our NetworkPolicyError, never anything else."""
    store = SecretStore(
        {"T": Secret("real-value", ["a.example"])}, token_hex=lambda n: "0" * (2 * n)
    )
    try:
        new, _ = store.apply("a.example", headers, url, body)
    except NetworkPolicyError:
        return
    assert len(new) == len(headers)


def test_redact_works_on_bytes_as_given_so_coded_bodies_are_decoded_first(
    store: SecretStore,
) -> None:
    """Why the pipeline decodes (test_secret_encodings.py): redact cannot see inside gzip."""
    coded = gzip.compress(f'{{"token": "{TOKEN}"}}'.encode())
    assert TOKEN.encode() in gzip.decompress(store.redact(coded))
    assert TOKEN.encode() not in store.redact(gzip.decompress(coded))
