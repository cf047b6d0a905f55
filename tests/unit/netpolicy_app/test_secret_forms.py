"""A value echoed in any listed encoding reaches the guest as the placeholder.

An honest upstream re-encodes what it echoes: JSON (``\\/``, ``\\uXXXX``,
Go's ``\\u003c``), HTML and XML entities, percent-encoding, UTF-16,
base64, hex, or the "mojibake" of a server that read UTF-8 as ISO-8859-1.
Redaction used to match the value's exact bytes only, so each of these
leaked it. The pipeline tests drive the real mediation against
:mod:`secret_echo`'s echo server, one encoding per path; each has its
negative control: the upstream's raw answer, decoded, holds the value --
and does not hold its plain bytes, so exact matching alone misses it.
The property tests do the same sans-IO for random values, the speed test
bounds the cost on a 1 MiB body with 20 secrets.
"""

from __future__ import annotations

import base64
import json
import random
import string
import time
import urllib.parse
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.http.mediation import Mediated, MediationContext, plan_request
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.secret_forms import MIN_CODED_BYTES, SecretForms
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore
from tests.unit.netpolicy_app.secret_echo import (
    ENCODINGS,
    LATIN_VALUE,
    WIDE_VALUE,
    EchoServer,
    basic,
    context,
    echo_server,
    mediate,
    request,
    unmediated,
)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    with echo_server() as server:
        yield server


def store_for(*values: str) -> SecretStore:
    return SecretStore({f"S{i}": Secret(v, ["a.test"]) for i, v in enumerate(values)})


def exact_bytes(value: str) -> list[bytes]:
    """What redaction matched before: the value's UTF-8 and ISO-8859-1 bytes."""
    out = [value.encode()]
    try:
        out.append(value.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return out


# --------------------------------------------------------------------------- the pipeline

CASES = [
    (name, how)
    for name, encoding in ENCODINGS.items()
    for how in ("x-tok", "basic")
    if not (encoding.latin1_only and how == "basic")
]


@pytest.mark.parametrize(("name", "how"), CASES, ids=[f"{n}-{h}" for n, h in CASES])
def test_an_honest_echo_in_any_listed_encoding_reaches_the_guest_as_the_placeholder(
    echo: EchoServer, name: str, how: str
) -> None:
    """``X-Tok`` carries an ISO-8859-1 value; Basic a UTF-8 one beyond ISO-8859-1."""
    encoding = ENCODINGS[name]
    value = LATIN_VALUE if how == "x-tok" else WIDE_VALUE
    ctx = context(echo, TOK=value)
    assert ctx.secrets is not None
    placeholder = ctx.secrets.placeholder("TOK")
    field = (
        ("X-Tok", placeholder) if how == "x-tok" else ("Authorization", basic("me", placeholder))
    )
    job, outcome = mediate(ctx, request(f"/enc/{name}", [field]))
    # negative control: the upstream's own answer holds the value, in that encoding
    raw = unmediated(echo, job).body
    assert encoding.decode(raw) == value
    if name not in {"utf-8", "latin-1"}:
        assert not any(b in raw for b in exact_bytes(value))  # exact matching misses it
    # the guest, and the record, get the placeholder in the same encoding
    assert outcome.response.status == 200, outcome.response.body
    guest = encoding.decode(outcome.response.body)
    assert value not in guest
    if encoding.whole:
        assert guest == placeholder
    (record,) = ctx.recorder.requests
    assert value not in encoding.decode(record.response_body)
    assert not any(b in outcome.response.body for b in exact_bytes(value))


@pytest.mark.parametrize("value", [LATIN_VALUE, WIDE_VALUE], ids=["latin", "wide"])
def test_a_value_echoed_as_utf8_in_a_response_header_is_redacted_on_its_bytes(
    echo: EchoServer, value: str
) -> None:
    """The host reads header bytes as ISO-8859-1: a UTF-8 echo is mojibake in that ``str``."""
    ctx = context(echo, TOK=value)
    assert ctx.secrets is not None
    placeholder = ctx.secrets.placeholder("TOK")
    field = ("Authorization", basic("me", placeholder))
    job, outcome = mediate(ctx, request("/header-utf8", [field]))
    shown = unmediated(echo, job).header("X-Echo")
    assert shown is not None and value not in shown  # the str holds no value ...
    assert shown.encode("latin-1").decode("utf-8") == value  # ... its bytes do (control)
    echoed = outcome.response.header("X-Echo")
    assert echoed == placeholder
    (record,) = ctx.recorder.requests
    assert record.response_header("X-Echo") == placeholder


def test_a_value_in_a_response_field_name_is_redacted(echo: EchoServer) -> None:
    value = "tok_Abc123SECRETvalue789"
    ctx = context(echo, TOK=value)
    assert ctx.secrets is not None
    placeholder = ctx.secrets.placeholder("TOK")
    job, outcome = mediate(ctx, request("/header-name", [("X-Tok", placeholder)]))
    assert any(value in n for n, _ in unmediated(echo, job).headers)  # control
    names = [n for n, _ in outcome.response.headers]
    assert f"X-Echo-{placeholder}" in names
    assert not any(value in n for n in names)


def test_a_stub_holding_a_coded_value_reaches_the_guest_redacted() -> None:
    """Every response goes through the same redaction, stubs and error pages included."""
    store = store_for(LATIN_VALUE)
    recorder = Recorder(redactor=store)
    body = json.dumps({"token": LATIN_VALUE}).replace("/", "\\/").encode()
    recorder.stub("GET", "http://api.test/stub", status=200, body=body)
    ctx = MediationContext(NetworkPolicy(), store, recorder)
    outcome = plan_request(request("/stub", []), 0.0, ctx)
    assert isinstance(outcome, Mediated)
    assert json.loads(outcome.response.body) == {"token": store.placeholder("S0")}


# --------------------------------------------------------------------------- sans-IO

_SPECIAL = list("/&<>\"'\\ +%=;#:?éöü€😀ßЖ")
_PRINTABLE = st.characters(
    codec="utf-8", blacklist_categories=("Cs", "Cc", "Cf", "Co", "Cn", "Zl", "Zp", "Zs")
)
_ASCII = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
VALUES = st.text(
    alphabet=st.one_of(st.sampled_from(_SPECIAL), _ASCII, _PRINTABLE), min_size=6, max_size=24
).filter(str.isprintable)
LATIN_VALUES = st.text(
    alphabet=st.one_of(
        st.sampled_from([c for c in _SPECIAL if ord(c) < 256]),
        _ASCII,
        st.characters(min_codepoint=0xA1, max_codepoint=0xFF),
    ),
    min_size=6,
    max_size=24,
).filter(str.isprintable)


@pytest.mark.parametrize("name", list(ENCODINGS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_values_never_survive_any_listed_encoding(name: str, data: st.DataObject) -> None:
    encoding = ENCODINGS[name]
    value = data.draw(LATIN_VALUES if encoding.latin1_only else VALUES, label="value")
    store = store_for(value)
    assume(value not in store.placeholder("S0"))
    coded = encoding.encode(value)
    assert encoding.decode(coded) == value  # the encoding round-trips: the value is in there
    redacted = store.redact(coded)
    assert value not in encoding.decode(redacted)
    assert value.encode() not in redacted


@given(value=VALUES, prefix=st.binary(max_size=5), suffix=st.binary(max_size=5))
@settings(max_examples=200, deadline=None)
def test_a_value_inside_a_base64_blob_never_survives_at_any_alignment(
    value: str, prefix: bytes, suffix: bytes
) -> None:
    store = store_for(value)
    blob = base64.b64encode(prefix + value.encode() + suffix)
    redacted = store.redact(b'{"blob": "' + blob + b'"}')
    out = base64.b64decode(json.loads(redacted)["blob"])
    assert value.encode() not in out
    assert len(out) >= len(prefix) + len(suffix)
    if not suffix:  # the value ended the blob: it decodes to the placeholder
        assert out == prefix + store.placeholder("S0").encode()


@given(
    values=st.lists(VALUES, min_size=1, max_size=3),
    data=st.binary(max_size=3000),
    text=st.text(max_size=300),
)
@settings(max_examples=100, deadline=None)
def test_redaction_never_fails_on_any_bytes_or_text(
    values: list[str], data: bytes, text: str
) -> None:
    store = store_for(*values)
    assert isinstance(store.redact(data), bytes)
    assert isinstance(store.redact(text), str)
    assert store.redact(b"") == b"" and store.redact("") == ""


@pytest.mark.parametrize("size", [100, 5000])
@pytest.mark.parametrize(
    "value",
    ["ghp_0123456789abcdefghijABCDEFGHIJ0123", "s3cr/t", "ab/cd&ef", "ü/é&ß€", "Tök12345/x"],
)
def test_a_value_is_found_at_every_offset(value: str, size: int) -> None:
    """The anchor sampling (8- and 4-byte words) cannot step over an occurrence."""
    store = store_for(value)
    filler = bytes(random.Random(size).choices(b"abcdefghij klmnop\n", k=size))
    for at in range(17):
        for coded in (value.encode(), json.dumps(value).encode(), value.encode("utf-16-le")):
            data = filler[:at] + coded + filler[at:]
            out = store.redact(data)
            assert coded not in out, (at, coded)
            assert out.startswith(filler[:at]) and out.endswith(filler[at:])


def test_longer_values_win_and_placeholders_are_not_redacted_again() -> None:
    store = store_for("abcdef", "abcdefgh")
    short, long = store.placeholder("S0"), store.placeholder("S1")
    assert store.redact("abcdefgh abcdef") == f"{long} {short}"
    assert store.redact(b"x=abcdefgh%2F") == f"x={long}%2F".encode()


def test_str_redaction_reads_header_strings_as_their_bytes() -> None:
    value = "pässwörd-€"
    store = store_for(value)
    placeholder = store.placeholder("S0")
    mojibake = value.encode().decode("latin-1")  # a UTF-8 header, as the host reads it
    assert store.redact(f"x {mojibake} y") == f"x {placeholder} y"
    assert store.redact(f"x {value} y") == f"x {placeholder} y"  # a genuine text
    assert store.redact(json.dumps({"v": value})) == json.dumps({"v": placeholder})
    # negative control: neither string holds the other's characters
    assert value not in mojibake


def test_base64_and_hex_skip_values_too_short_to_recognise() -> None:
    forms = SecretForms([("abc", "P")])
    assert forms.redact(base64.b64encode(b"abc")) == base64.b64encode(b"abc")
    assert forms.redact(b"abc".hex().encode()) == b"abc".hex().encode()
    assert forms.redact(b"[abc]") == b"[P]"  # the text form still applies
    assert len(b"abcd") == MIN_CODED_BYTES
    assert SecretForms([("abcd", "P")]).redact(b"abcd".hex().encode()) == b"P".hex().encode()


def test_percent_and_entity_case_and_leading_zeros() -> None:
    value = "a/b&c"
    store = store_for(value)
    placeholder = store.placeholder("S0").encode()
    for coded in (b"a%2fb%26c", b"a%2Fb%26c", b"a&#x002F;b&AMP;c", b"a&#0047;b&#38;c"):
        assert store.redact(coded) == placeholder, coded
    # negative control: a different value is left alone
    assert store.redact(b"a%2fb%26d") == b"a%2fb%26d"


# --------------------------------------------------------------------------- speed

SPEED_BUDGET_S = 0.050  # per 1 MiB with 20 secrets (docs/security.md)


def _tokens(rng: random.Random) -> list[str]:
    alnum = string.ascii_letters + string.digits
    styles = [
        lambda: "ghp_" + "".join(rng.choices(alnum, k=36)),
        lambda: "sk-" + "".join(rng.choices(alnum, k=20)) + "/" + "".join(rng.choices(alnum, k=12)),
        lambda: "p@ss/w0rd&<" + "".join(rng.choices(alnum, k=10)) + '>"é',
        lambda: "".join(rng.choices(alnum + "-_.~+/=", k=28)),
    ]
    return [styles[i % len(styles)]() for i in range(20)]


def _cpu_best(store: SecretStore, data: bytes, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.thread_time()
        store.redact(data)
        best = min(best, time.thread_time() - start)
    return best


def test_redacting_a_mebibyte_with_twenty_secrets_is_quick() -> None:
    """CPU time (this thread, best of 5), so other processes on the machine do not count."""
    rng = random.Random(20)
    values = _tokens(rng)
    store = store_for(*values)
    words = [
        "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(2, 12)))
        for _ in range(5000)
    ]
    rows = [{"k": rng.choice(words), "v": " ".join(rng.choices(words, k=8))} for _ in range(12000)]
    clean = json.dumps(rows).encode()[: 1 << 20]
    laden = bytearray(clean)
    forms = (
        lambda v: json.dumps(v).replace("/", "\\/").encode(),
        lambda v: base64.b64encode(v.encode()),
        lambda v: urllib.parse.quote(v, safe="").encode(),
        lambda v: v.encode().hex().encode(),
    )
    for i, value in enumerate(values):
        at = rng.randrange(len(laden))
        laden[at:at] = forms[i % len(forms)](value)
    laden_bytes = bytes(laden)
    out = store.redact(laden_bytes)
    for i, value in enumerate(values):  # negative control: every value was in there, coded
        assert forms[i % len(forms)](value) in laden_bytes
        assert forms[i % len(forms)](value) not in out
    assert store.redact(clean) == clean
    clean_s, laden_s = _cpu_best(store, clean), _cpu_best(store, laden_bytes)
    assert clean_s < SPEED_BUDGET_S, f"clean 1 MiB: {clean_s * 1000:.1f} ms"
    assert laden_s < SPEED_BUDGET_S, f"1 MiB with 20 coded values: {laden_s * 1000:.1f} ms"


def test_negative_control_the_speed_budget_can_fail() -> None:
    """The timer sees slow redaction: values without letters or digits are searched everywhere."""
    rng = random.Random(21)
    store = store_for(*("".join(rng.choices("/&<>%+=;", k=10)) for _ in range(20)))
    data = bytes(rng.choices(b"abcdefghij klmnop/&%;\n", k=1 << 20))
    slow = _cpu_best(store, data, runs=1)
    assert slow > SPEED_BUDGET_S, f"{slow * 1000:.1f} ms"
