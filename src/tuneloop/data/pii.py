"""Finding personal data and secrets in text, and replacing each with a `[KIND]` placeholder.

Only kinds and counts ever leave this module; a found value is never returned, logged or printed.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

# Order matters: secrets and card numbers are replaced before the broader phone and IP patterns see them.
PATTERNS: dict[str, re.Pattern[str]] = {
    "secret": re.compile(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
        r"|\bAKIA[0-9A-Z]{16}\b"
        r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"
        r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"
        r"|\b(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}\b"
        r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
        r"|\bAIza[0-9A-Za-z_-]{35}\b"
        r"|\beyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{8,}"
        r"|(?i:\b(?:api[_-]?key|secret|token|passw(?:or)?d)\b[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"',;]{8,})"
    ),
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
    "card": re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"),
    "ip": re.compile(
        r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])"
        r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
        r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?(?![\w:])"
    ),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])"),
}
# Cheap tests that rule a text out before its regex runs; most rows hold no personal data.
_SECRET_MARKERS = ("-----BEGIN", "AKIA", "gh", "sk-", "_live_", "_test_", "xox", "AIza", "eyJ")
_SECRET_WORDS = ("key", "secret", "token", "passw")
_DIGITS_3 = re.compile(r"\d{3}").search
_DIGITS_4 = re.compile(r"\d{4}").search
_DIGIT_DOT = re.compile(r"\d\.\d").search
_COUNTRY = re.compile(r"[A-Z]{2}\d\d").search
# Every text with an email, IBAN, card, IP or phone number has one of these characters; a single
# character class scans several times faster than any alternation.
_ANY_CANDIDATE = re.compile(r"[@:\d]").search
PREFILTERS: dict[str, Callable[[str], bool]] = {
    "secret": lambda t: any(m in t for m in _SECRET_MARKERS) or any(w in t.lower() for w in _SECRET_WORDS),
    "email": lambda t: "@" in t,
    "iban": lambda t: _COUNTRY(t) is not None,
    "card": lambda t: _DIGITS_4(t) is not None,
    "ip": lambda t: _DIGIT_DOT(t) is not None or "::" in t or t.count(":") >= 7,
    "phone": lambda t: _DIGITS_3(t) is not None,  # nine or more digits in groups of two to four
}


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _iban_ok(value: str) -> bool:
    compact = value.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _ip_ok(value: str) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    # Version-like strings ("1.2.0.0") and the unspecified address are not someone's address.
    return not (address.version == 4 and value.startswith("0.")) and not address.is_unspecified


def _phone_ok(value: str) -> bool:
    digits = sum(ch.isdigit() for ch in value)
    return 9 <= digits <= 15 and (value.startswith(("+", "(")) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value))


CHECKS: dict[str, Callable[[str], bool]] = {
    # Issuer prefixes 2-6 (Mastercard, Amex, Visa, Discover...) keep timestamps and ISBNs out.
    "card": lambda v: 13 <= len(d := re.sub(r"\D", "", v)) <= 19 and d[0] in "23456" and _luhn(d),
    "iban": _iban_ok,
    "ip": _ip_ok,
    "phone": _phone_ok,
}


class PiiScanner:
    """Finds the built-in kinds plus `extra` named regexes; `redact` returns the text and what it found."""

    def __init__(self, extra: dict[str, str] | None = None):
        self.patterns = dict(PATTERNS)
        for name, pattern in (extra or {}).items():
            self.patterns[name] = re.compile(pattern)

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        found: Counter[str] = Counter()
        maybe = _ANY_CANDIDATE(text) is not None
        for kind, pattern in self.patterns.items():
            prefilter = PREFILTERS.get(kind)
            if prefilter is not None and not ((maybe or kind == "secret") and prefilter(text)):
                continue
            text = pattern.sub(lambda m, kind=kind: self._replace(m, kind, found), text)
        return text, found

    @staticmethod
    def _replace(match: re.Match[str], kind: str, found: Counter[str]) -> str:
        value = match.group(0)
        check = CHECKS.get(kind)
        if check is not None and not check(value):
            return value
        found[kind] += 1
        placeholder = f"[{kind.upper()}]"
        if kind == "secret" and match.groupdict().get("value"):
            # Keep the key name ("api_key=") so the text still reads; replace only its value.
            return value[: match.start("value") - match.start()] + placeholder
        return placeholder
