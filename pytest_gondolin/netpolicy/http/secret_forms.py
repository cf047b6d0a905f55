"""The common faithful encodings of a secret's value, found and replaced in one pass.

Sans-IO. An upstream that echoes a request does not always echo the value's
bytes as they were sent: a JSON encoder writes ``\\/`` or ``\\u00e9``, an
HTML page ``&amp;`` or ``&#x2F;``, a query string ``%2F`` or ``+``, a .NET
service UTF-16, a debugging endpoint base64 or hex, and an echo server
that read the header as ISO-8859-1 re-encodes a UTF-8 value as "mojibake".
:class:`SecretForms` holds every form below for each value, compiled once,
and :meth:`SecretForms.redact` replaces each one it finds with the
placeholder, in the same form where that keeps the data well-formed.
``v`` is the value, ``p`` its placeholder (ASCII letters, digits and ``_``,
so every text escaping leaves it unchanged):

==========  ======================================================  ==================
form        matched                                                 replaced by
==========  ======================================================  ==================
text        ``v`` with each ASCII punctuation character as is or    ``p``
            escaped, in any mix: JSON/JavaScript ``\\uXXXX``,
            ``\\/ \\" \\' \\\\``, ``\\xXX``; HTML/XML ``&#NN;``,
            ``&#xHH;``, ``&amp; &lt; &gt; &quot; &apos;``;
            percent ``%XX``, ``+`` for a space. Characters beyond
            ASCII all written one way (no encoder mixes them):
            their UTF-8 or ISO-8859-1 bytes, JSON ``\\uXXXX``
            (surrogate pairs), ``\\xXX``/``\\uXXXX``/``\\UXXXXXXXX``,
            ``&#NN;``, ``&#xHH;``, ``%XX`` of the UTF-8 or
            ISO-8859-1 bytes, ``%uXXXX``. Hex digits and entity
            names in either case, up to 8 leading zeros
mojibake    the text form of ``v``'s UTF-8 bytes read as            ``p``
            ISO-8859-1 (Python's ``http.server`` reads headers
            so; so does the host, see :class:`~.messages.HttpResponse`)
UTF-16      both rows above in UTF-16-LE and UTF-16-BE code units   ``p`` in that UTF-16
base64      standard or URL-safe base64 of ``v``'s UTF-8 (or        see below
            ISO-8859-1) bytes, padded or not, ``/`` also as
            ``\\/`` or ``%2F``, ``+`` as ``%2B``: alone, or inside
            a larger blob at each of the three byte alignments
hex         ``v``'s UTF-8 (or ISO-8859-1) bytes, lower or upper     ``p`` in hex, same
            case                                                    case
==========  ======================================================  ==================

ASCII letters and digits are never escaped by these encoders; that is
what makes the search fast (below), and an encoder that does escape them
defeats it.

base64 and hex are searched only for values of at least
:data:`MIN_CODED_BYTES` bytes: shorter ones would match unrelated data.
Where the value ends a base64 blob (``base64("Bearer " + v)``) the blob
is re-encoded and decodes to the same text with ``p``; elsewhere the
characters holding bits of ``v`` become ``A``, so the blob keeps its
length and alignment and decodes to zeros in the value's place (and in
the few bits it shares with its neighbours).

Speed: running every form of every value through one regular expression
would try each alternative at every byte. Instead each form has an
*anchor*, a literal every match of it contains (the longest run of ASCII
letters and digits: no listed escaping changes those), and a bound on how
far a match reaches around it. Data without any anchor costs one pass per
word size: anchors of at least 15 (7) bytes are found together by
sampling the data's 8-byte (4-byte) words at a stride of 8 (4) -- every
occurrence of such an anchor covers one such word, and every word of
every anchor is indexed -- shorter anchors with one ``in`` each. Only the
forms whose anchor turned up are compiled together (cached), and run
only around the anchor's occurrences. A form without an anchor (a value
of ASCII punctuation only) is searched on its own first: it starts with
one of a few literal bytes (the character, ``\\``, ``&``, ``%``), which
``re`` skips to. Measured on one core, 1 MiB of JSON, 20 values: typical
tokens 14 ms clean, 22 ms with each value in it once, coded; short
values or non-ASCII ones 25-40 ms; values of punctuation and accented
letters only 70-400 ms (tests/unit/netpolicy_app/test_secret_forms.py).

Not found, by design (see docs/security.md "Limits"): a value transformed
in any other way -- hashed, encrypted, compressed without saying so, case
changed, letters or digits escaped, base64 wrapped across lines, encoded
twice, hex at an odd nibble, other charsets (UTF-32, UTF-7, EBCDIC).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import string
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["MIN_CODED_BYTES", "SecretForms"]

#: Values shorter than this (in bytes) are not searched for as base64 or hex.
MIN_CODED_BYTES: Final = 4
# Sampled word sizes, widest first: an anchor of 2 * w - 1 bytes or more is found
# by sampling w-byte words (see _WordIndex); shorter ones one by one.
_WORDS: Final = (8, 4)
# Below this size the data is small enough to look for every anchor with ``in``.
_SAMPLE_MIN: Final = 2048
# Compiled expressions kept per store, keyed by the set of forms found (usually one).
_MAX_CACHED: Final = 64
# Leading zeros accepted in an HTML character reference (bounded: a match's
# length must be, see _Form.before).
_MAX_ZEROS: Final = 8

_ALNUM: Final = frozenset(string.ascii_letters + string.digits)
_NAMED: Final = {"&": "amp", "<": "lt", ">": "gt", '"': "quot", "'": "apos"}
_STD: Final = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
_URL: Final = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
# Where text forms are searched: bytes of an 8-bit charset (UTF-8, ISO-8859-1
# and ASCII escapes), and UTF-16 code units.
_LAYERS: Final = ("8bit", "utf-16-le", "utf-16-be")

# A tiny pattern language for the ASCII escapes, so that one description can
# be rendered for 8-bit text and for UTF-16: a token is (characters, fewest,
# most): that many of the characters.
_Token = tuple[str, int, int]
# A piece of a form's expression: (expression, the literal it always matches
# or None, the most bytes it matches). Runs of literals give the anchor.
_Piece = tuple[bytes, bytes | None, int]


def _lit(text: str) -> list[_Token]:
    return [(c, 1, 1) for c in text]


def _ci(text: str) -> list[_Token]:
    """``text`` with its ASCII letters in either case (hex digits, entity names)."""
    return [(c + c.upper() if c.isalpha() else c, 1, 1) for c in text]


def _hex(number: int, width: int = 0) -> list[_Token]:
    return _ci(format(number, "x").rjust(width, "0"))


def _utf16_units(char: str) -> list[int]:
    data = char.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _html_decimal(char: str) -> list[_Token]:  # HTML §13.1.4, XML §4.1
    return [*_lit("&#"), ("0", 0, _MAX_ZEROS), *_lit(str(ord(char))), *_lit(";")]


def _html_hex(char: str) -> list[_Token]:
    return [*_lit("&#"), ("xX", 1, 1), ("0", 0, _MAX_ZEROS), *_hex(ord(char)), *_lit(";")]


def _json(char: str) -> list[_Token]:  # RFC 8259 §7: \uXXXX, surrogate pairs above U+FFFF
    return [t for unit in _utf16_units(char) for t in _lit("\\u") + _hex(unit, 4)]


def _python(char: str) -> list[_Token]:  # Python and C-like repr: \xXX, \uXXXX, \UXXXXXXXX
    code = ord(char)
    if code <= 0xFF:
        return _lit("\\x") + _hex(code, 2)
    return _lit("\\u") + _hex(code, 4) if code <= 0xFFFF else _lit("\\U") + _hex(code, 8)


def _percent(char: str, encoding: str = "utf-8") -> list[_Token]:  # RFC 3986 §2.1
    return [t for byte in char.encode(encoding) for t in _lit("%") + _hex(byte, 2)]


def _percent_u(char: str) -> list[_Token]:  # JavaScript escape(): %XX, else %uXXXX
    if ord(char) <= 0xFF:
        return _lit("%") + _hex(ord(char), 2)
    return [t for unit in _utf16_units(char) for t in _lit("%u") + _hex(unit, 4)]


def _ascii_escapes(char: str) -> list[list[_Token]]:
    """Every escape of the ASCII ``char`` the module docstring lists (any of them, per char)."""
    out = [_json(char), _python(char), _html_decimal(char), _html_hex(char), _percent(char)]
    if char in "/\"'\\":
        out.append(_lit("\\" + char))
    if char in _NAMED:
        out.append([*_lit("&"), *_ci(_NAMED[char]), *_lit(";")])
    if char == " ":
        out.append(_lit("+"))
    return out


# How an encoder writes characters beyond ASCII: one way for the whole value
# (no encoder mixes them), so each is a form of its own, with its own anchor.
_POLICIES: Final[dict[str, Callable[[str], list[_Token]] | None]] = {
    "raw": None,  # the character's own bytes (UTF-8, or the layer's code units)
    "latin-1": None,  # its ISO-8859-1 byte (8-bit text, values up to U+00FF)
    "json": _json,
    "python": _python,
    "html-decimal": _html_decimal,
    "html-hex": _html_hex,
    "percent": _percent,
    "percent-latin-1": lambda c: _percent(c, "latin-1"),
    "percent-u": _percent_u,
}


def _unit(layer: str) -> int:
    return 1 if layer == "8bit" else 2


def _literal(text: str, layer: str) -> bytes:
    return text.encode("ascii" if layer == "8bit" else layer)


def _pieces(tokens: Iterable[_Token], layer: str) -> list[_Piece]:
    out: list[_Piece] = []
    for chars, fewest, most in tokens:
        klass = re.escape(chars) if len(chars) == 1 else f"[{re.escape(chars)}]"
        one = klass.encode("ascii")
        if layer == "utf-16-le":
            one = b"(?:" + one + b"\\x00)"
        elif layer == "utf-16-be":
            one = b"(?:\\x00" + one + b")"
        if (fewest, most) == (1, 1):
            literal = _literal(chars, layer) if len(chars) == 1 else None
            out.append((one, literal, _unit(layer)))
        else:
            out.append((one + b"{%d,%d}" % (fewest, most), None, most * _unit(layer)))
    return out


def _join(pieces: Sequence[_Piece]) -> tuple[bytes, int]:
    return b"".join(p for p, _, _ in pieces), sum(n for _, _, n in pieces)


@functools.lru_cache(maxsize=4096)  # values share characters: most are built once
def _char_pieces(char: str, layer: str, policy: str) -> tuple[_Piece, ...] | None:
    """``char`` as ``policy`` writes it in ``layer`` (None: it cannot)."""
    if char in _ALNUM:  # never escaped by the encodings listed: anchors rely on it
        literal = _literal(char, layer)
        return ((re.escape(literal), literal, len(literal)),)
    if ord(char) < 0x80:  # ASCII punctuation: any escape, whatever the policy
        # Escapes first: "\\" must match whole, not as the character "\" and a rest.
        options = [_join(_pieces(tokens, layer)) for tokens in _ascii_escapes(char)]
        options.append((re.escape(_literal(char, layer)), _unit(layer)))
        expression = b"(?:" + b"|".join(o for o, _ in options) + b")"
        return ((expression, None, max(n for _, n in options)),)
    if policy in ("raw", "latin-1"):
        if policy == "latin-1" and (layer != "8bit" or ord(char) > 0xFF):
            return None
        data = char.encode("utf-8" if layer == "8bit" else layer)
        data = char.encode("latin-1") if policy == "latin-1" else data
        return ((re.escape(data), data, len(data)),)
    escape = _POLICIES[policy]
    if escape is None or (policy == "percent-latin-1" and ord(char) > 0xFF):
        return None
    return tuple(_pieces(escape(char), layer))


def _sources(value: str) -> list[str]:
    """``value``, and its UTF-8 bytes read as ISO-8859-1 if that differs."""
    mojibake = value.encode("utf-8").decode("latin-1")
    return [value] if mojibake == value else [value, mojibake]


def _raw_values(value: str) -> list[bytes]:
    out = [value.encode("utf-8")]
    try:
        latin = value.encode("latin-1")
    except UnicodeEncodeError:
        return out
    return out if latin == out[0] else [*out, latin]


Replace = Callable[[re.Match[bytes]], bytes]


@dataclass(frozen=True)
class _Form:
    """One searchable form of one value.

    Every match contains ``anchor`` and extends at most ``before`` bytes
    before it and ``after`` bytes after it (no anchor: searched everywhere).
    """

    pattern: bytes  # a regular expression without capturing groups
    anchor: bytes
    before: int
    after: int
    replace: Replace
    rank: int  # the value's length: longer values are tried first


def _constant(data: bytes) -> Replace:
    return lambda _match: data


def _anchored(pieces: Sequence[_Piece]) -> tuple[bytes, int, int]:
    """The longest run of literal pieces, and the most bytes before and after it."""
    best, at, stop, start = b"", 0, 0, 0
    for i, (_, literal, _) in enumerate([*pieces, (b"", None, 0)]):
        if literal is None:
            run = b"".join(lit or b"" for _, lit, _ in pieces[start:i])
            if len(run) > len(best):
                best, at, stop = run, start, i
            start = i + 1
    return best, _join(pieces[:at])[1], _join(pieces[stop:])[1]


def _text_forms(value: str, placeholder: str) -> list[_Form]:
    forms, seen = [], set()
    for layer in _LAYERS:
        ours = _constant(_literal(placeholder, layer))
        for source in _sources(value):
            for policy in _POLICIES if not source.isascii() else ["raw"]:
                chars = [_char_pieces(c, layer, policy) for c in source]
                if any(c is None for c in chars):
                    continue
                pieces = [p for c in chars if c is not None for p in c]
                pattern = _join(pieces)[0]
                if pattern in seen:
                    continue
                seen.add(pattern)
                anchor, before, after = _anchored(pieces)
                forms.append(_Form(pattern, anchor, before, after, ours, len(value)))
    return forms


def _hex_forms(value: str, placeholder: str) -> list[_Form]:
    forms = []
    for raw in _raw_values(value):
        if len(raw) < MIN_CODED_BYTES:
            continue
        for case in (str.lower, str.upper):
            text = case(raw.hex()).encode("ascii")
            ours = case(placeholder.encode("ascii").hex()).encode("ascii")
            forms.append(_Form(re.escape(text), text, 0, 0, _constant(ours), len(value)))
    return forms


# --------------------------------------------------------------------------- base64


def _b64(data: bytes, alphabet: str) -> str:
    text = base64.b64encode(data).decode("ascii")
    return text if alphabet is _STD else text.replace("+", "-").replace("/", "_")


def _b64_position(chars: Iterable[str], alphabet: str) -> tuple[bytes, int]:
    """One base64 character out of ``chars`` (standard: also ``\\/ %2F %2B``), its most bytes."""
    chars = set(chars)
    options = []
    if alphabet is _STD and "/" in chars:
        options += [b"/", b"\\\\/", b"%2[fF]"]
    if alphabet is _STD and "+" in chars:
        options += [b"\\+", b"%2[bB]"]
    plain = sorted(chars - {"/", "+"} if alphabet is _STD else chars)
    if plain:
        options.append(("[" + re.escape("".join(plain)) + "]").encode("ascii"))
    most = 3 if len(options) > 1 else 1
    return (options[0] if len(options) == 1 else b"(?:" + b"|".join(options) + b")"), most


_B64_ESCAPED: Final = re.compile(rb"\\/|%2[fF]|%2[bB]|%3[dD]")
_B64_UNESCAPE: Final = {b"\\/": b"/", b"%2f": b"/", b"%2b": b"+", b"%3d": b"="}
_B64_PADDING: Final = (b"(?:=|%3[dD]){0,2}", 6)


def _b64_unescape(data: bytes) -> bytes:
    return _B64_ESCAPED.sub(lambda m: _B64_UNESCAPE[m.group().lower()], data)


def _b64_forms(value: str, placeholder: str) -> list[_Form]:
    forms = []
    for raw in _raw_values(value):
        if len(raw) < MIN_CODED_BYTES:
            continue
        for alphabet in (_STD, _URL):
            for shift in range(3):
                forms.append(_b64_form(raw, shift, alphabet, placeholder, len(value)))
    return forms


def _b64_form(raw: bytes, shift: int, alphabet: str, placeholder: str, rank: int) -> _Form:
    """The characters of base64(prefix + raw + suffix) that hold bits of ``raw``.

    ``shift`` is ``len(prefix) % 3``. Character i holds bits [6i, 6i+6) of
    the stream; ``raw`` is bits [8 shift, 8 (shift + len)). The first and
    last such characters may share bits with the prefix and suffix: they
    are matched by the bits of ``raw`` they hold. Where the value ends the
    blob it is re-encoded with the placeholder; elsewhere its characters
    become ``A`` (the blob keeps its length and alignment).
    """
    start, end = 8 * shift, 8 * (shift + len(raw))
    coded = _b64(bytes(shift) + raw + bytes(2), alphabet)
    first, last = -(-start // 6), end // 6 - 1  # the characters wholly of raw
    whole = coded[first : last + 1]
    parts = [_b64_position(c, alphabet) for c in whole]
    runs = [m.span() for m in re.finditer(r"[A-Za-z0-9]+", whole)]
    at, stop = max(runs, key=lambda span: span[1] - span[0], default=(0, 0))
    before, after = parts[:at], parts[stop:]
    if start % 6:  # the character before holds (start % 6) prefix bits, then raw's top bits
        own = 6 - start % 6
        top = raw[0] >> (8 - own)
        before.insert(
            0, _b64_position([c for i, c in enumerate(alphabet) if i % (1 << own) == top], alphabet)
        )
    if end % 6:  # the character after holds raw's last bits, then suffix (or zero) bits
        own = end % 6
        bottom = raw[-1] % (1 << own)
        after.append(
            _b64_position([c for i, c in enumerate(alphabet) if i >> (6 - own) == bottom], alphabet)
        )
    after.append(_B64_PADDING)
    pattern = b"".join(p for p, _ in [*before, *parts[at:stop], *after])
    ours = frozenset(alphabet.encode("ascii"))

    def replace(match: re.Match[bytes]) -> bytes:
        text = _b64_unescape(match.group())
        core = text.rstrip(b"=")
        data, begin, finish = match.string, match.start(), match.end()
        lead = data[max(0, begin - shift) : begin]
        prefix = _b64_decode(lead + core, alphabet) if len(lead) == shift else None
        ends_blob = finish == len(data) or data[finish] not in ours
        if ends_blob and prefix is not None and prefix[shift:] == raw:
            # The value ends the blob: re-encode its quantum with the placeholder
            # (the `shift` characters before it are unchanged by construction).
            new = _b64(prefix[:shift] + placeholder.encode("ascii"), alphabet)[shift:]
            # Padding as the blob had it; when it needed none, as its alphabet
            # usually has it (standard: padded; URL-safe, as in JWTs: not).
            needed = (shift + len(raw)) % 3 != 0
            padded = len(core) < len(text) or (not needed and alphabet is _STD)
            return (new if padded else new.rstrip("=")).encode("ascii")
        return b"A" * len(core) + text[len(core) :]

    return _Form(
        pattern=pattern,
        anchor=whole[at:stop].encode("ascii"),
        before=sum(n for _, n in before),
        after=sum(n for _, n in after),
        replace=replace,
        rank=rank,
    )


def _b64_decode(text: bytes, alphabet: str) -> bytes | None:
    padded = text + b"=" * (-len(text) % 4)
    try:
        if alphabet is _STD:
            return base64.b64decode(padded, validate=True)
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


# --------------------------------------------------------------------------- the store


# array typecodes of unsigned integers by size (C types: "L" is 4 or 8 bytes).
_TYPECODES: Final = {array(code).itemsize: code for code in "LQHIB"}


@dataclass(frozen=True)
class _WordIndex:
    """Anchors of at least ``2 * width - 1`` bytes, found together by sampling ``data``.

    An occurrence of such an anchor covers a whole ``width``-byte word at a
    multiple of ``width``, and every word of every anchor is indexed: one
    pass over the sampled words (C speed) finds them all, however many.
    """

    width: int
    anchors: Mapping[bytes, frozenset[int]]  # anchor -> forms
    words: Mapping[int, frozenset[int]]  # word -> forms whose anchor holds it
    keys: frozenset[int]

    @classmethod
    def build(cls, width: int, anchors: Mapping[bytes, frozenset[int]]) -> _WordIndex:
        words: dict[int, set[int]] = {}
        for anchor, ids in anchors.items():
            for at in range(len(anchor) - width + 1):
                word = int.from_bytes(anchor[at : at + width], sys.byteorder)
                words.setdefault(word, set()).update(ids)
        frozen = {word: frozenset(ids) for word, ids in words.items()}
        return cls(width, anchors, frozen, frozenset(frozen))

    def find(self, data: bytes) -> set[int]:
        """The forms whose anchor may be in ``data`` (never fewer than are)."""
        found: set[int] = set()
        if len(data) < _SAMPLE_MIN:  # small: asking for each anchor is cheaper
            for anchor, ids in self.anchors.items():
                if anchor in data:
                    found |= ids
            return found
        sample = array(_TYPECODES[self.width], data + bytes(-len(data) % self.width))
        for word in self.keys.intersection(sample):
            found |= self.words[word]
        return found


class SecretForms:
    """Every form of each ``(value, placeholder)`` pair, and :meth:`redact` to replace them.

    Built once per :class:`~.secrets.SecretStore`. Thread-safe.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        forms: list[_Form] = []
        for value, placeholder in pairs:
            forms += _text_forms(value, placeholder)
            forms += _b64_forms(value, placeholder)
            forms += _hex_forms(value, placeholder)
        # Longest value first (a value containing another is replaced whole);
        # stable, so a value's forms keep the order above.
        self._forms: tuple[_Form, ...] = tuple(sorted(forms, key=lambda f: -f.rank))
        self._always = frozenset(i for i, f in enumerate(self._forms) if not f.anchor)
        anchors: dict[bytes, set[int]] = {}
        for i, form in enumerate(self._forms):
            if form.anchor:
                anchors.setdefault(form.anchor, set()).add(i)
        indexes, upper = [], sys.maxsize
        for width in _WORDS:  # widest first: longer words collide less with unrelated data
            lower = 2 * width - 1
            fit = {a: frozenset(ids) for a, ids in anchors.items() if lower <= len(a) < upper}
            indexes.append(_WordIndex.build(width, fit))
            upper = lower
        self._indexes = tuple(indexes)
        self._short = {a: frozenset(ids) for a, ids in anchors.items() if len(a) < upper}
        self._lock = threading.Lock()
        self._compiled: dict[frozenset[int], re.Pattern[bytes]] = {}
        self._single: dict[int, re.Pattern[bytes]] = {}  # forms without an anchor

    def _candidates(self, data: bytes) -> frozenset[int]:
        """The forms whose anchor is in ``data`` (and those without one)."""
        found = set(self._always)
        for index in self._indexes:
            if index.anchors:
                found |= index.find(data)
        for anchor, ids in self._short.items():
            if anchor in data:
                found |= ids
        return frozenset(found)

    def _windows(self, data: bytes, ids: Iterable[int]) -> list[tuple[int, int]]:
        """Disjoint, sorted spans of ``data`` holding every match of the forms ``ids``."""
        reach: dict[bytes, tuple[int, int]] = {}
        spans = []
        for i in ids:
            form = self._forms[i]
            if not form.anchor:  # its own expression finds it (quickly: it starts with
                # a few literal bytes, which re skips to), then the spans are exact
                spans += [m.span() for m in self._alone(i).finditer(data)]
                continue
            before, after = reach.get(form.anchor, (0, 0))
            reach[form.anchor] = (max(before, form.before), max(after, form.after))
        for anchor, (before, after) in reach.items():
            at = data.find(anchor)
            while at >= 0:
                spans.append((max(0, at - before), min(len(data), at + len(anchor) + after)))
                at = data.find(anchor, at + 1)
        merged: list[tuple[int, int]] = []
        for begin, finish in sorted(spans):
            if merged and begin <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], finish))
            else:
                merged.append((begin, finish))
        return merged

    def _alone(self, index: int) -> re.Pattern[bytes]:
        with self._lock:
            pattern = self._single.get(index)
        if pattern is None:
            pattern = re.compile(self._forms[index].pattern)
            with self._lock:
                self._single[index] = pattern
        return pattern

    def _pattern(self, ids: frozenset[int]) -> re.Pattern[bytes]:
        with self._lock:
            pattern = self._compiled.get(ids)
        if pattern is None:
            # Group k+1 is the k-th form of sorted(ids) (match.lastindex maps back).
            source = b"|".join(b"(" + self._forms[i].pattern + b")" for i in sorted(ids))
            pattern = re.compile(source)
            with self._lock:
                if len(self._compiled) >= _MAX_CACHED:
                    self._compiled.clear()
                self._compiled[ids] = pattern
        return pattern

    def redact(self, data: bytes) -> bytes:
        """``data`` with every form of every value replaced (see the module docstring)."""
        ids = self._candidates(data)
        if not ids:
            return data
        order = sorted(ids)
        pattern = self._pattern(ids)
        out: list[bytes] = []
        done = 0
        for begin, finish in self._windows(data, order):
            for match in pattern.finditer(data, begin, finish):
                assert match.lastindex is not None  # one group per alternative
                out += (
                    data[done : match.start()],
                    self._forms[order[match.lastindex - 1]].replace(match),
                )
                done = match.end()
        if not out:
            return data
        out.append(data[done:])
        return b"".join(out)
