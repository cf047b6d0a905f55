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

import re
import sys
import threading
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from pytest_gondolin.netpolicy.http.secret_patterns import MIN_CODED_BYTES, Form, forms_of

__all__ = ["MIN_CODED_BYTES", "SecretForms"]

# Sampled word sizes, widest first: an anchor of 2 * w - 1 bytes or more is found
# by sampling w-byte words (see _WordIndex); shorter ones one by one.
_WORDS: Final = (8, 4)
# Below this size the data is small enough to look for every anchor with ``in``.
_SAMPLE_MIN: Final = 2048
# Compiled expressions kept per store, keyed by the set of forms found (usually one).
_MAX_CACHED: Final = 64
# Compiled expressions kept per store, keyed by the set of forms found (usually one).

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
        forms: list[Form] = []
        for value, placeholder in pairs:
            forms += forms_of(value, placeholder)
        # Longest value first (a value containing another is replaced whole);
        # stable, so a value's forms keep the order above.
        self._forms: tuple[Form, ...] = tuple(sorted(forms, key=lambda f: -f.rank))
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
