"""Each form of one secret value as a regular expression, with its anchor and reach.

Sans-IO, pure functions. This module owns how the rows of the table in
:mod:`.secret_forms` are written: the text form with its ASCII escapes and
the ways an encoder writes characters beyond ASCII, mojibake, UTF-16, hex
and base64 (alone or inside a larger blob), and what each match is
replaced by. :func:`forms_of` gives them all for one value; searching
data for them fast is :class:`~.secret_forms.SecretForms`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["MIN_CODED_BYTES", "Form", "forms_of"]

#: Values shorter than this (in bytes) are not searched for as base64 or hex.
MIN_CODED_BYTES: Final = 4
# Leading zeros accepted in an HTML character reference (bounded: a match's
# length must be, see Form.before).
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
class Form:
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


def _text_forms(value: str, placeholder: str) -> list[Form]:
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
                forms.append(Form(pattern, anchor, before, after, ours, len(value)))
    return forms


def _hex_forms(value: str, placeholder: str) -> list[Form]:
    forms = []
    for raw in _raw_values(value):
        if len(raw) < MIN_CODED_BYTES:
            continue
        for case in (str.lower, str.upper):
            text = case(raw.hex()).encode("ascii")
            ours = case(placeholder.encode("ascii").hex()).encode("ascii")
            forms.append(Form(re.escape(text), text, 0, 0, _constant(ours), len(value)))
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


def _b64_forms(value: str, placeholder: str) -> list[Form]:
    forms = []
    for raw in _raw_values(value):
        if len(raw) < MIN_CODED_BYTES:
            continue
        for alphabet in (_STD, _URL):
            for shift in range(3):
                forms.append(_b64_form(raw, shift, alphabet, placeholder, len(value)))
    return forms


def _b64_form(raw: bytes, shift: int, alphabet: str, placeholder: str, rank: int) -> Form:
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

    return Form(
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


def forms_of(value: str, placeholder: str) -> list[Form]:
    """Every form of ``value``: text (with mojibake and UTF-16), then base64, then hex."""
    return (
        _text_forms(value, placeholder)
        + _b64_forms(value, placeholder)
        + _hex_forms(value, placeholder)
    )
