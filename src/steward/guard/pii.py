"""PII detectors for English and Chinese text: one small class per entity, checksums where they exist.

Precision comes from validation, not from longer regexes: a card number must pass Luhn, an IBAN
mod-97, a China resident ID the GB 11643 check digit, an IP address the `ipaddress` parser. Entities
with no checksum (passport and licence numbers, dates of birth) need a context word nearby, because
the bare pattern is any number. Person names use a cheap, measured method instead of an NER model:
titles and context phrases ("my name is", "Dear", 联系人) plus a gazetteer of common given names
(English) and of common surnames (Chinese). Quasi-identifiers (location, ZIP, age, date,
organisation, nationality/religion/politics) are reported with `subtype="quasi_identifier"`, which
the policy engine flags by default instead of redacting.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import date

from .base import QUASI_SUBTYPE, Match, PatternDetector, ascii_fold, may_contain, scan_with_detectors
from .normalize import Document
from .types import Category, Finding, ScanContext

__all__ = ["PII_ENTITIES", "QUASI_ENTITIES", "PIIScanner", "cn_resident_id_valid", "iban_valid", "luhn_valid"]

QUASI = QUASI_SUBTYPE


def _ctx(text: str, start: int, end: int, words: re.Pattern[str], before: int = 40, after: int = 0) -> bool:
    return bool(words.search(text[max(0, start - before) : start] + " " + text[end : end + after]))


def luhn_valid(digits: str) -> bool:
    """The Luhn mod-10 check used by payment and most bank card numbers."""
    if not digits.isdigit() or len(digits) < 12:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IBAN length by country: the SWIFT IBAN registry (ISO 13616), plus the countries whose banks issue
# IBANs outside it (francophone Africa, Algeria, Iran...). mod-97 alone lets one random identifier in
# 97 through ("PO24-0031-7781-2210"); the country and its fixed length make that ~1 in 97 of those
# that already have a real country code and exactly its length.
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
    # outside the registry, in use
    "AO": 25, "BF": 28, "BJ": 28, "CF": 27, "CG": 27, "CI": 28, "CM": 27, "CV": 25, "DZ": 26, "GA": 27,
    "GQ": 27, "GW": 25, "IR": 26, "KM": 27, "MA": 28, "MG": 27, "ML": 28, "MZ": 25, "NE": 28, "SN": 28,
    "TD": 27, "TG": 28,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """ISO 13616: a known country, its IBAN length, and mod-97 (move the first four characters to
    the end, letters to numbers, the remainder is 1)."""
    s = re.sub(r"[\s\u2010-\u2013-]", "", iban).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s) or _IBAN_LENGTHS.get(s[:2]) != len(s):
        return False
    n = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(n) % 97 == 1


_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_resident_id_valid(number: str) -> bool:
    """GB 11643-1999: weighted sum mod 11 -> check character, plus a real birth date."""
    if not re.fullmatch(r"\d{17}[\dXx]", number):
        return False
    check = "10X98765432"[sum(int(c) * w for c, w in zip(number[:17], _ID_WEIGHTS, strict=True)) % 11]
    if number[17].upper() != check:
        return False
    try:
        born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    return 1900 <= born.year <= date.today().year


class _Regex:
    """Base for detectors that are one regex plus an optional validator.

    `literals` / `requires` are a gate: a *necessary* condition for any match of `pattern`, far
    cheaper to test than the pattern itself (a substring test, or a regex that starts with a
    character class, which the regex engine skips through in C). When a text fails the gate the
    pattern cannot match, so it is not run: the same matches, less time on the usual text that holds
    no such entity. `literals` are searched in `ascii_fold(text)` when `folded` is set (patterns
    that ignore case). No `literals` and no `requires`: always run.
    """

    entity = ""
    pattern: re.Pattern[str]
    score = 0.9
    reason = ""
    subtype: str | None = None
    literals: tuple[str, ...] = ()
    folded = False
    requires: re.Pattern[str] | None = None

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        return self.score

    def may_match(self, text: str) -> bool:
        if not self.literals and self.requires is None:
            return True
        if self.literals and may_contain(text, self.literals, ascii_fold(text) if self.folded else None):
            return True
        return self.requires is not None and self.requires.search(text) is not None

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            score = self.validate(text, m)
            if score is not None:
                start, end = m.span("v") if m.groupdict().get("v") is not None else m.span()
                yield Match(start, end, score, self.reason, self.entity, self.subtype)


_EMAIL_TLD_FILES = frozenset(
    ["png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "tif", "tiff", "ico", "avif"]
)


_CJK_HEAD = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff]+")


class EmailDetector(_Regex):
    """Local parts may hold non-ASCII letters and apostrophes (müller@, Jane_O'Brien@), domains IDN
    letters (münchen.de). A quote before the address is not part of it, and a "domain" whose last
    label is an image extension is an asset name (image@2x.png), not a mailbox."""

    entity = "EMAIL_ADDRESS"
    pattern = re.compile(
        r"(?<![\w.%+'’-])[\w.%+'’-]+@[^\W_](?:[\w-]*[^\W_])?(?:\.[^\W_](?:[\w-]*[^\W_])?)*\.[^\W\d_]{2,}"
    )
    score = 0.95
    reason = "email address pattern"
    literals = ("@",)

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            local = m.group().split("@", 1)[0]
            if _CJK_HEAD.match(local) and not _CJK_HEAD.fullmatch(local):
                local = local[_CJK_HEAD.match(local).end() :]  # type: ignore[union-attr]  # 邮箱zhang@
            skip = len(m.group().split("@", 1)[0]) - len(local.lstrip("'’."))
            if skip == len(local) or m.group().rsplit(".", 1)[1].lower() in _EMAIL_TLD_FILES:
                continue
            yield Match(m.start() + skip, m.end(), self.score, self.reason, self.entity)


class UrlCredentialsDetector(_Regex):
    entity = "URL_CREDENTIALS"
    pattern = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]+:[^\s/@]+@[^\s<>\"']+")
    score = 0.95
    reason = "URL with embedded user:password"
    literals = ("://",)


_PHONE_CTX = re.compile(
    r"(?i)phone|tel|call|ring|mobile|cell|fax|contact|whatsapp|reach|appel|portable|anruf|handy|"
    r"电话|手机|致电|联系|热线|座机|客服|传真"
)
# A label that says the number is something else: "Order #123-456-7890", "Product code 555-123-4567".
_NUMBER_LABEL = re.compile(
    r"(?i)\b(?:order|product|part|serial|model|item|sku|invoice|tracking|ticket|case|ref(?:erence)?|"
    r"account|acct|batch|lot|catalog(?:ue)?|version|build|code)\b"
    r"(?:\s*(?:#|no\.?|num(?:ber)?|code|id))?\s*(?:is|=)?\s*[:#]?\s*$"
)
_SEP = "[-.\\s\u2010-\u2013]"  # hyphen, dot, space, and the Unicode hyphens/dashes (en dash) people paste


class PhoneDetector(_Regex):
    """E.164, North American, China mobiles and landlines, and national formats with a trunk 0
    (UK 020 7946 0958, FR 06 12 34 56 78, AU 0412 345 678, CN 0755 8888 6666)."""

    entity = "PHONE_NUMBER"
    pattern = re.compile(
        r"(?<![A-Za-z0-9+\u2010-\u2013-])(?<!\d[ .])(?:"  # not the tail of a longer number
        rf"(?:\+|00)\d{{1,3}}{_SEP}?\(?\d{{1,4}}\)?(?:{_SEP}?\d{{2,4}}){{2,4}}"  # international
        rf"|\(\+\d{{1,3}}\)\s?\d{{1,4}}(?:{_SEP}?\d{{2,4}}){{1,4}}"  # (+86) 138 1234 5678
        rf"|(?:(?:001|1){_SEP}?)?(?:\(\d{{3}}\)\s?|\d{{3}}{_SEP})\d{{3}}{_SEP}\d{{4}}"  # NANP formatted
        r"|(?:\+?86[-\s]?)?1[3-9]\d[-\s]?\d{4}[-\s]?\d{4}"  # China mobile
        r"|\(0\d{2,4}\)\s?\d{3,4}[-\s]?\d{3,4}"  # (021)62345678
        rf"|0\d{{1,4}}(?:{_SEP}\d{{2,8}}){{1,4}}"  # national, trunk 0
        r"|0\d{2,3}-\d{7,8}"  # China landline
        r"|\d{10}"  # bare NANP, needs context
        r")(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![A-Za-z0-9]|[\u2010-\u2013-]\d)"
    )
    reason = "phone number"

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        s = m.group()
        digits = re.sub(r"\D", "", re.split(r"\s?(?:x|ext)", s)[0])
        ctx = _ctx(text, m.start(), m.end(), _PHONE_CTX)
        if not ctx and _NUMBER_LABEL.search(text[max(0, m.start() - 30) : m.start()]):
            return None  # an order / product / part number
        national = (s[0] == "0" and not s.startswith("00")) or s.startswith("(0")
        if national:
            return self._national(s, digits, ctx)
        if not 10 <= len(digits) <= 16:
            return None
        if re.fullmatch(r"\d{10}", s):
            return 0.8 if ctx else 0.3
        if re.fullmatch(r"(?:(?:\+|00)?86)?1[3-9]\d{9}", re.sub(r"[\s()-]", "", s)):
            return 0.85
        if not ctx and re.fullmatch(r"\d{3} \d{3} \d{4}", s) and (s[0] in "01" or s[4] in "01"):
            return None  # space-separated and not a valid NANP area/exchange: "100 200 3000"
        return 0.85 if ctx else 0.75

    @staticmethod
    def _national(s: str, digits: str, ctx: bool) -> float | None:
        if not 9 <= len(digits) <= 12:
            return None
        groups = [g for g in re.split(r"[^\d]+", s) if g]
        if len(digits) >= 10 and (len(groups) == 1 or all(len(g) >= 2 for g in groups)):
            if ctx:
                return 0.85
            if len(groups) == 1 and not re.fullmatch(r"0\d{2,3}-\d{7,8}", s):
                return None  # a bare number with a leading zero: an id as often as a phone
            return 0.7
        return 0.8 if ctx else None  # 9 digits (DE 030 901820): only with a phone word


_CARD_CTX = re.compile(r"(?i)card|visa|mastercard|amex|credit|debit|卡|银行|账户|账号")
_CN_BANK_CTX = re.compile(r"银行|卡号|储蓄卡|借记卡|账户|账号|开户|银联|(?i:unionpay|bank)")


def _card_prefix(digits: str) -> bool:
    """Issuer ranges: Visa 4, Mastercard 51-55 and 2221-2720, Amex 34/37, Diners 30/36/38,
    Discover 6011/65, Maestro 50/56-69, JCB 35 and the older 15-digit 1800/2131."""
    return digits[0] in "3456" or digits[:4] in ("1800", "2131") or 2221 <= int(digits[:4]) <= 2720


class CardDetector(_Regex):
    """Payment cards (Luhn). UnionPay-range numbers (62...) are reported as China bank cards."""

    entity = "CREDIT_CARD"
    # Separators: a space (two, from PDFs), a hyphen, an en dash, or a dot (dots need 4-digit groups).
    pattern = re.compile(
        r"(?<![\d\u2010-\u2013-])(?<!\d\.)\d(?:(?:  ?|[-.\u2010-\u2013])?\d){11,18}"
        r"(?![\d\u2010-\u2013-]|\.\d)"
    )
    reason = "card number passing the Luhn check"
    requires = re.compile(r"\d(?:(?:  ?|[-.\u2010-\u2013])?\d){11}")

    _group_end = re.compile(r"\d(?=  ?|[-.\u2010-\u2013]|$)")

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            found = self._card(text, m.start(), m.end(), luhn_only=False)
            # The run may have taken a short number after the card into its digits ("4111 1111 1111
            # 1111 123": a CVV, an expiry as MMYY), so Luhn fails on the whole run. Then each shorter
            # run that ends where a group ends is a candidate, longest first, on Luhn alone (an
            # unseparated run is one number: it has no shorter candidate).
            ends = [g.end() for g in self._group_end.finditer(m.group())][-2::-1]
            for end in ends if found is None else ():
                found = self._card(text, m.start(), m.start() + end, luhn_only=True)
                if found is not None:
                    break
            if found is not None:
                yield found

    def _card(self, text: str, start: int, end: int, *, luhn_only: bool) -> Match | None:
        """The card that `text[start:end]` is, or None."""
        run = text[start:end]
        digits = re.sub(r"\D", "", run)
        if not 12 <= len(digits) <= 19:
            return None
        groups = re.split(r"  ?|[-.\u2010-\u2013]", run)
        if "." in run and {len(g) for g in groups[:-1]} != {4}:
            return None  # dotted: only 4-digit groups, else a version or an IP-like number
        if len(groups) > 1 and len({len(g) for g in groups[:-1]}) > 1 and len(groups) != 3:
            return None  # irregular grouping: a phone number or an id, not a card
        ok = luhn_valid(digits)
        if luhn_only and not ok:
            return None
        cn_ctx = _ctx(text, start, end, _CN_BANK_CTX)
        if digits.startswith("62") and 16 <= len(digits) <= 19 and (ok or cn_ctx):
            score = 0.95 if ok else 0.8
            why = "China bank card (UnionPay 62 prefix" + (", Luhn valid)" if ok else ", bank context)")
            return Match(start, end, score, why, "CN_BANK_CARD")
        if (
            cn_ctx
            and 16 <= len(digits) <= 19
            and re.search(r"银行|卡号|储蓄卡|借记卡", text[max(0, start - 30) : start])
        ):
            return Match(start, end, 0.85, "bank card number with context", "CN_BANK_CARD")
        if ok and _card_prefix(digits):
            ctx = _ctx(text, start, end, _CARD_CTX)
            if len(digits) == 12 and not ctx:
                return None  # 12-digit Maestro numbers are too common as plain numbers
            return Match(start, end, 0.95 if ctx or len(groups) > 1 else 0.9, self.reason, self.entity)
        return None


_IBAN_CTX = re.compile(r"(?i)iban|bank|account|konto|compte|账户|账号")


class IbanDetector(_Regex):
    entity = "IBAN_CODE"
    pattern = re.compile(
        r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]{4}){2,7}(?:[ -]?[A-Za-z0-9]{1,4})?"
        r"(?![A-Za-z0-9])"
    )
    score = 0.95
    reason = "IBAN passing the mod-97 check"
    requires = re.compile(r"[A-Za-z]{2}\d{2}")

    def detect(self, text: str) -> Iterable[Match]:
        # The pattern is greedy and does not know the country's length, so a short word after the
        # IBAN ("... 1332 is mine") reads as one more group. The IBAN is the prefix of the country's
        # length, when that prefix ends where a group ends; the search resumes after it, so a second
        # IBAN right after the first (or inside a run that was no IBAN) is still found.
        if not self.may_match(text):
            return
        pos = 0
        while (m := self.pattern.search(text, pos)) is not None:
            end = self._end(text, m)
            if end is None:
                pos = m.start() + 1
                continue
            pos = end
            if m.group()[:2].isupper() or _ctx(text, m.start(), end, _IBAN_CTX):
                # lowercase: one random identifier in 97 passes mod-97, so ask for the word
                yield Match(m.start(), end, self.score, self.reason, self.entity)

    @staticmethod
    def _end(text: str, m: re.Match[str]) -> int | None:
        """End of the valid IBAN the match starts with, or None."""
        length = _IBAN_LENGTHS.get(m.group()[:2].upper())
        if length is None:
            return None
        seen = 0
        for i in range(m.start(), m.end()):
            seen += text[i].isalnum()
            if seen == length:
                end = i + 1
                if end < m.end() and text[end].isalnum():
                    return None  # the country's length ends inside a group
                return end if iban_valid(text[m.start() : end]) else None
        return None


_SSN_CTX = re.compile(r"(?i)ssn|social security|社会安全")


class SsnDetector(_Regex):
    entity = "US_SSN"
    pattern = re.compile(
        r"(?<![\d-])(?<!\d\.)(?!000|666|9\d\d)\d{3}([- .]?)(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])(?!\.\d)"
    )
    reason = "US social security number"
    requires = re.compile(r"\d{3}[- .]?\d{2}[- .]?\d{4}")

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        ctx = _ctx(text, m.start(), m.end(), _SSN_CTX)
        if not ctx and _NUMBER_LABEL.search(text[max(0, m.start() - 30) : m.start()]):
            return None  # "part number is 123-45-6789": a labelled non-PII number
        if m.group(1) == "-":
            return 0.9 if ctx else 0.7
        if m.group(1) == ".":
            return 0.85 if ctx else None  # 123.45.6789 is a version or a number unless "SSN" is there
        return 0.85 if ctx else None


class CnResidentIdDetector(_Regex):
    entity = "CN_RESIDENT_ID"
    # 18 characters, or grouped 6-8-4 (region, birth date, sequence + check) by spaces or hyphens
    pattern = re.compile(r"(?<![0-9A-Za-z-])\d{6}([ -]?)\d{8}\1\d{3}[\dXx](?![0-9A-Za-z]|-\d)")
    score = 0.98
    reason = "China resident ID passing the GB 11643 check digit"
    requires = re.compile(r"\d{6}[ -]?\d{8}")

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        return self.score if cn_resident_id_valid(re.sub(r"[ -]", "", m.group())) else None


# "label:" right before an address (ip:8.8.8.8, host:10.0.0.1, IP地址：… once NFKC made "：" a ":"),
# told apart from the inside of an IPv6 / MAC run by what precedes the colon: a CJK character, a
# non-hex letter, or the words ip / ipv6 / mac.
_LABEL_COLON = r"(?<=[\u4e00-\u9fffG-Zg-z]:)|(?<=[Ii][Pp][Vv]6:)|(?<=[Mm][Aa][Cc]:)"
_VERSION_CTX = re.compile(r"(?i)version|\bver\b|\bv$|release|python|build|assembly|firmware|sdk|版本")
_IP_CTX = re.compile(r"(?i)\bip\b|ipv[46]|host|server|address|addr|gateway|dns|地址|服务器|网关")


class IpDetector(_Regex):
    """IPv4 (a port after it is fine: 10.0.0.1:8080) and IPv6. A dotted quad next to a version word
    (AssemblyVersion("1.0.0.0"), Python 3.11.4.1) is a version number unless an IP word is there too."""

    entity = "IP_ADDRESS"
    pattern = re.compile(
        rf"(?:(?<![A-Za-z0-9.:])|(?<=//)|{_LABEL_COLON})(?:"
        r"(?P<v4>(?:\d{1,3}\.){3}\d{1,3})(?![A-Za-z0-9]|\.\d)"
        r"|(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{2,39}(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?"
        r"(?:%\w+)?(?![A-Za-z0-9:]|\.\d))"
    )
    score = 0.9
    reason = "IP address"
    literals = (":",)
    requires = re.compile(r"\d\.\d")

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        try:
            addr = ipaddress.ip_address(m.group().split("%")[0])
        except ValueError:
            return None
        if addr.version == 6 and m.group().count(":") < 2:
            return None
        if (
            addr.version == 6
            and "::" in m.group()
            and not re.search(r"\d", m.group())
            and not _IP_CTX.search(text[max(0, m.start() - 30) : m.start()])
        ):
            # Letters-only with "::" is how Rust and C++ paths look (abc::def, cafe::beef): an
            # address only with an IP word before it. Real short forms have a digit (::1, fe80::1).
            return None
        if re.fullmatch(r"(?:[0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", m.group()):
            return None  # a MAC address, not IPv6
        if m.group("v4"):
            before = text[max(0, m.start() - 30) : m.start()]
            if _VERSION_CTX.search(before) and not _IP_CTX.search(before):
                return None
        return self.score


_MAC_CTX = re.compile(r"(?i)\bmac\b|hardware address|hwaddr|ether|物理地址")


class MacDetector(_Regex):
    entity = "MAC_ADDRESS"
    pattern = re.compile(
        rf"(?:(?<![A-Za-z0-9:-])|{_LABEL_COLON})"
        r"(?:[0-9A-Fa-f]{2}([:-]))(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}(?![A-Za-z0-9:-])"
        # Cisco style, three dotted groups of four: 001a.2b3c.4d5e
        r"|(?<![A-Za-z0-9.:-])(?P<cisco>[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4})(?![A-Za-z0-9:-]|\.[A-Za-z0-9])"
    )
    score = 0.85
    reason = "MAC address"
    requires = re.compile(r"[0-9A-Fa-f]{2}[:-][0-9A-Fa-f]{2}|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.")

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        cisco = m.group("cisco")
        if cisco and not re.search(r"[A-Fa-f]", cisco) and not _ctx(text, m.start(), m.end(), _MAC_CTX):
            return None  # 2023.0101.1234: all digits, a number unless "MAC" is there
        return self.score


class PassportDetector(_Regex):
    entity = "PASSPORT"
    pattern = re.compile(
        r"(?i:passport|护照)[^\n\d]{0,25}?(?P<v>(?<![A-Z0-9])[A-Z]{0,2}\d{6,9}(?![A-Za-z0-9])"
        r"|(?<![A-Za-z0-9])[A-Z](?=(?:[A-Z]*\d){4})[A-Z0-9]{6,9}(?![A-Za-z0-9]))"
    )
    score = 0.85
    reason = "passport number after a passport context word"
    literals = ("passport", "护照")
    folded = True


class DriverLicenseDetector(_Regex):
    entity = "DRIVER_LICENSE"
    pattern = re.compile(
        r"(?i:driver'?s? ?licen[cs]e|driving licen[cs]e|licen[cs]e (?:no|number|#)|\bDL\b|驾驶证|驾照)"
        r"[^\n]{0,20}?(?P<v>(?<![A-Za-z0-9])(?:[A-Z]{0,2}\d{5,18}[A-Z0-9]?|[A-Z]\d{3,4}(?:-\d{1,4}){2,4}"
        r"|[A-Z9]{5}\d{6}[A-Z9]{2}\d[A-Z]{2})(?![A-Za-z0-9]|-\d))"
    )
    score = 0.85
    reason = "driver licence number after a licence context word"
    literals = ("licen", "dl", "驾驶证", "驾照")
    folded = True


_MONTHS = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DATE = (
    r"(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}"
    rf"|{_MONTHS}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?(?: of)? {_MONTHS}\.?,? \d{{4}}"
    r"|\d{4}年\d{1,2}月\d{1,2}日)"
)
# Dates that are only a birth date with a birth word next to them: 19900304, 1990年3月.
_DOB_ONLY = r"(?P<dob>(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])|\d{4}年\d{1,2}月)"
_DOB_CTX = re.compile(
    r"(?i)\bborn\b|(?<![a-z])dob(?![a-z])|d\.o\.b|date of birth|birth ?date|birthday|出生|生日|生于"
)


class DateDetector(_Regex):
    """Dates; with a birth context word they are DATE_OF_BIRTH (redacted), else a quasi-identifier."""

    entity = "DATE"
    pattern = re.compile(rf"(?<![A-Za-z0-9]){_DATE}(?![\d])|(?<![A-Za-z0-9]){_DOB_ONLY}(?![\d日])")
    literals = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec", "年")
    requires = re.compile(r"\d[-/.]\d|\d{8}")

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            if not m.group("dob") and not self._plausible(text, m):
                continue
            dob = _ctx(text, m.start(), m.end(), _DOB_CTX, before=40)
            if m.group("dob") and not dob:
                continue
            if dob:
                yield Match(m.start(), m.end(), 0.9, "date next to a birth context word", "DATE_OF_BIRTH")
            else:
                yield Match(m.start(), m.end(), 0.6, "calendar date (quasi-identifier)", "DATE", QUASI)

    @staticmethod
    def _plausible(text: str, m: re.Match[str]) -> bool:
        """A month 1-12 and a day 1-31 where the pattern put numbers; a year of 2 or 4 digits; a
        dotted date is not a piece of a longer dotted run. "18.17.10" (node), "2.10.100.5" and
        "99/99/9999" fit the pattern and are versions or junk."""
        s = m.group()
        nums = re.findall(r"\d+", s)
        if re.search(r"[A-Za-z]", s):  # March 3rd, 2024 / 3 March 2024: the short number is the day
            return all(1 <= int(n) <= 31 for n in nums if len(n) <= 2)
        if "." in s and (
            re.match(r"\.\d", text[m.end() : m.end() + 2])
            or re.fullmatch(r"\d\.", text[max(0, m.start() - 2) : m.start()])
        ):
            return False
        if len(nums[0]) == 4:  # 2024-03-05, 2024年3月5日
            month, day = int(nums[1]), int(nums[2])
            return 1 <= month <= 12 and 1 <= day <= 31
        a, b, year = int(nums[0]), int(nums[1]), nums[2]
        if len(year) not in (2, 4):
            return False
        return (1 <= a <= 12 and 1 <= b <= 31) or (1 <= b <= 12 and 1 <= a <= 31)


# USPS street suffixes (Publication 28, common subset) with optional plural.
_SUFFIXES = (
    "Alley|Avenue|Ave|Bayou|Beach|Bend|Bluff|Bluffs|Boulevard|Blvd|Branch|Bridge|Brook|Brooks|Burg|Burgs|"
    "Bypass|Camp|Canyon|Cape|Causeway|Center|Centers|Circle|Circles|Cir|Cliff|Cliffs|Club|Common|Commons|Corner|"
    "Corners|Course|Court|Courts|Ct|Cove|Coves|Creek|Crescent|Crest|Crossing|Crossroad|Curve|Dale|Dam|Divide|"
    "Drive|Drives|Dr|Estate|Estates|Expressway|Extension|Extensions|Fall|Falls|Ferry|Field|Fields|Flat|Flats|"
    "Ford|Fords|Forest|Forge|Forges|Fork|Forks|Fort|Freeway|Garden|Gardens|Gateway|Glen|Glens|Green|Greens|"
    "Grove|Groves|Harbor|Harbors|Haven|Heights|Highway|Hwy|Hill|Hills|Hollow|Inlet|Island|Islands|Isle|"
    "Junction|Junctions|Key|Keys|Knoll|Knolls|Lake|Lakes|Land|Landing|Lane|Ln|Light|Lights|Loaf|Lock|Locks|"
    "Lodge|Loop|Mall|Manor|Manors|Meadow|Meadows|Mews|Mill|Mills|Mission|Motorway|Mount|Mountain|Mountains|"
    "Neck|Orchard|Oval|Overpass|Park|Parks|Parkway|Parkways|Pass|Passage|Path|Pike|Pine|Pines|Place|Pl|Plain|"
    "Plains|Plaza|Point|Points|Port|Ports|Prairie|Radial|Ramp|Ranch|Rapid|Rapids|Rest|Ridge|Ridges|River|"
    "Road|Roads|Rd|Route|Row|Rue|Run|Shoal|Shoals|Shore|Shores|Skyway|Spring|Springs|Spur|Spurs|Square|"
    "Squares|Sq|Station|Stravenue|Stream|Street|Streets|St|Summit|Terrace|Throughway|Trace|Track|Trafficway|"
    "Trail|Trl|Tunnel|Turnpike|Underpass|Union|Unions|Valley|Valleys|Via|Viaduct|View|Views|Village|"
    "Villages|Ville|Vista|Walk|Walks|Wall|Way|Ways|Well|Wells"
)


# A Chinese address: [province] city district, a road, then a number (12号) or a block (A座) -- the
# anchor every such address has -- then building, unit, floor and room (院3号楼2单元501,
# 中石化大厦B塔2801, SOHO现代城A座1001), all optional.
_CN_ADDRESS_HEAD = (
    r"(?:[\u4e00-\u9fff]{2,8}(?:省|自治区|特别行政区))?[\u4e00-\u9fff]{2,6}(?:市|县|区|盟|州)"
    r"[\u4e00-\u9fff]{0,12}?(?:路|街|大道|巷|道|胡同|大街)[A-Za-z\u4e00-\u9fff]{0,4}?"
    r"(?:\d{1,5}号|[A-Za-z\d]{1,5}座)"
)
_CN_ADDRESS_TAIL = (
    r"(?:院|[A-Za-z\u4e00-\u9fff]{1,10}?(?:大厦|中心|广场|城|花园|小区|公寓|大楼|园)(?=[A-Za-z\d]))?"
    r"(?:[A-Za-z\d]{1,5}(?:号楼|栋|幢|座|塔|楼|层|单元|室))*(?:\d{1,5}室?(?![\d年月日号]))?"
)
_CN_ANCHOR = re.compile(r"\d号|[A-Za-z\d]座")
# The most characters from the start of an address to its anchor's "\d号" / "x座": province 8 + 5,
# city 6 + 1, 12, road 2, 4, and 4 more digits of the number: 42, and a margin.
_CN_REACH = 45


class StreetAddressDetector(_Regex):
    entity = "STREET_ADDRESS"
    pattern = re.compile(
        rf"\b\d{{1,6}}[A-Z]? (?:[NSEW]\.? )?(?:[A-Z][a-z]+ ){{1,3}}(?:{_SUFFIXES})\b\.?"
        r"(?:,? (?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|#) ?\d+[A-Z]?\b)?"
        rf"|(?i:address|addr\.?|地址)[:\s]\s*"  # a lowercase street after an address label
        rf"(?P<v>\d{{1,6}}[A-Za-z]? (?:[nsew]\.? )?(?:[a-z]+ ){{1,3}}(?i:{_SUFFIXES})\b)"
        r"|\b(?:P\.? ?O\.? ?Box|Post Office Box) \d{1,6}\b"
    )
    chinese = re.compile(_CN_ADDRESS_HEAD + _CN_ADDRESS_TAIL)
    _chinese_head = re.compile(_CN_ADDRESS_HEAD)
    score = 0.85
    reason = "street address"
    literals = ("路", "街", "巷", "道", "胡同", "Box", "BOX", "box")
    requires = re.compile(r"\d[A-Z]? [A-Za-z]")  # "12 N. Main St" too: N is a capital
    # What precedes a Chinese address inside the match: 我住在, 我家在, 寄到, 地址是…
    _lead = re.compile(
        r"^.*?(?:寄到|送到|发到|寄往|住在|位于|地址是|地址为|地址|住址|在|到)(?=[\u4e00-\u9fff]{2,})"
    )

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            if m.group("v"):
                yield Match(m.start("v"), m.end("v"), self.score, self.reason, self.entity)
            else:
                yield Match(m.start(), m.end(), self.score, self.reason, self.entity)
        for m in self._chinese_matches(text) if not text.isascii() else ():
            start = m.start()
            head = re.match(r"[^省市县区盟州]*", m.group())
            lead = self._lead.match(head.group()) if head and m.group()[0] >= "\u4e00" else None
            if lead:
                start += lead.end()
            yield Match(start, m.end(), self.score, self.reason, self.entity)

    def _chinese_matches(self, text: str) -> Iterator[re.Match[str]]:
        """What `self.chinese.finditer(text)` finds, searched for only within reach of an anchor.

        Run over every character of Chinese text, the nested bounded quantifiers cost ~8 s/MB. Every
        match starts at most `_CN_REACH` characters before its anchor, so only the stretches before
        anchors are searched: anchors closer than that form one cluster, whose addresses end (the
        part up to the anchor) by its last anchor. The leftmost match start in a stretch is the
        leftmost start of the part up to the anchor, found with the search ended at the cluster's
        last anchor; the whole match is then matched from there, as finditer would have.
        """
        clusters: list[list[int]] = []
        for a in _CN_ANCHOR.finditer(text):
            if clusters and a.start() - clusters[-1][1] <= _CN_REACH:
                clusters[-1][1] = a.end()
            else:
                clusters.append([a.start(), a.end()])
        done = 0
        for first, last in clusters:
            pos = max(done, first - _CN_REACH)
            while pos < last and (h := self._chinese_head.search(text, pos, last)) is not None:
                m = self.chinese.match(text, h.start())
                if m is None:  # cannot happen: the tail is optional
                    break
                yield m
                done = pos = max(m.end(), h.start() + 1)


# ---- person names ------------------------------------------------------------------------------

# Frequent US given names (both sexes), a gazetteer that is deliberately small: names outside it are
# still caught through titles and context phrases.
_EN_GIVEN = frozenset(
    [
        "james",
        "john",
        "robert",
        "michael",
        "william",
        "david",
        "richard",
        "joseph",
        "thomas",
        "charles",
        "christopher",
        "daniel",
        "matthew",
        "anthony",
        "mark",
        "donald",
        "steven",
        "paul",
        "andrew",
        "joshua",
        "kenneth",
        "kevin",
        "brian",
        "george",
        "timothy",
        "ronald",
        "edward",
        "jason",
        "jeffrey",
        "ryan",
        "jacob",
        "gary",
        "nicholas",
        "eric",
        "jonathan",
        "stephen",
        "larry",
        "justin",
        "scott",
        "brandon",
        "benjamin",
        "samuel",
        "gregory",
        "alexander",
        "frank",
        "patrick",
        "raymond",
        "jack",
        "dennis",
        "jerry",
        "tyler",
        "aaron",
        "jose",
        "adam",
        "nathan",
        "henry",
        "douglas",
        "zachary",
        "peter",
        "kyle",
        "ethan",
        "walter",
        "noah",
        "jeremy",
        "christian",
        "keith",
        "roger",
        "terry",
        "gerald",
        "harold",
        "sean",
        "austin",
        "carl",
        "arthur",
        "lawrence",
        "dylan",
        "jesse",
        "jordan",
        "bryan",
        "billy",
        "joe",
        "bruce",
        "gabriel",
        "logan",
        "albert",
        "willie",
        "alan",
        "juan",
        "wayne",
        "elijah",
        "randy",
        "roy",
        "vincent",
        "ralph",
        "eugene",
        "russell",
        "bobby",
        "mason",
        "philip",
        "louis",
        "mary",
        "patricia",
        "jennifer",
        "linda",
        "elizabeth",
        "barbara",
        "susan",
        "jessica",
        "sarah",
        "karen",
        "lisa",
        "nancy",
        "betty",
        "margaret",
        "sandra",
        "ashley",
        "kimberly",
        "emily",
        "donna",
        "michelle",
        "carol",
        "amanda",
        "dorothy",
        "melissa",
        "deborah",
        "stephanie",
        "rebecca",
        "sharon",
        "laura",
        "cynthia",
        "kathleen",
        "amy",
        "angela",
        "shirley",
        "anna",
        "brenda",
        "pamela",
        "emma",
        "nicole",
        "helen",
        "samantha",
        "katherine",
        "christine",
        "debra",
        "rachel",
        "carolyn",
        "janet",
        "catherine",
        "maria",
        "heather",
        "diane",
        "ruth",
        "julie",
        "olivia",
        "joyce",
        "virginia",
        "victoria",
        "kelly",
        "lauren",
        "christina",
        "joan",
        "evelyn",
        "judith",
        "megan",
        "andrea",
        "cheryl",
        "hannah",
        "jacqueline",
        "martha",
        "gloria",
        "teresa",
        "ann",
        "sara",
        "madison",
        "frances",
        "kathryn",
        "janice",
        "jean",
        "abigail",
        "alice",
        "judy",
        "sophia",
        "grace",
        "denise",
        "amber",
        "doris",
        "marilyn",
        "danielle",
        "beverly",
        "isabella",
        "theresa",
        "diana",
        "natalie",
        "brittany",
        "charlotte",
        "marie",
        "kayla",
        "alexis",
        "lori",
        "tiffany",
        "tammy",
        "crystal",
        "erin",
        "april",
        "jamie",
        "monica",
        "erica",
        "stacy",
        "wendy",
        "kristen",
        "holly",
    ]
)


def _words(block: str) -> list[str]:
    return block.split()


# Letters of names written in Latin script, accented ones too (García, Müller, Zoë, Łukasz).
_UP = "A-Z" + "".join(c for c in map(chr, range(0xC0, 0x250)) if c.isupper())
_LO = "a-z" + "".join(c for c in map(chr, range(0xC0, 0x250)) if c.islower())
# One name word: Mary, McDonald, DeAngelo, O'Brien, D'Angelo, Johnson-Smith, Al-Farsi, García.
_NW = rf"[{_UP}](?:[{_LO}]+(?:[{_UP}][{_LO}]+)?|['’][{_UP}][{_LO}]+)(?:-[{_UP}][{_LO}]+)?(?![{_UP}{_LO}])"
_EN_TITLE = re.compile(
    r"\b(?P<t>Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Rev)\.? "
    rf"(?P<v>{_NW}(?: [A-Z]\.)?(?: {_NW}){{0,2}})"
)
_EN_CONTEXT = re.compile(
    r"(?i:my name is|name is|name:|i am|i'm|this is|dear|signed|sincerely,|regards,|contact|call|ask for|"
    r"patient|patient:|customer|customer:|employee|client|client:|user|applicant|from|by|with|to|cc:|"
    r"attn:?|hi|hello|thanks,|thank you,|best,|cheers,|ask|tell|email|met|meet)"
    rf"\s+(?P<v>{_NW}(?: [A-Z]\.)?(?: {_NW}){{1,2}})"
)
# Every phrase of _EN_CONTEXT is 2 to 10 characters long and ends in a non-space character
# (tests/guard/test_detectors.py checks both), so a match starts 2-10 characters before the start of
# the whitespace run that precedes its capitalised name.
_EN_CONTEXT_SPAN = (2, 10)
_SPACE_NAME = re.compile(rf"\s(?=[{_UP}]\S* [{_UP}])")  # what the name needs at least
# Strong cues that also take a single capitalised name ("my name is Olumide", "This is Siobhan from
# support") or, after "my name is" / "name:", a lowercase one ("my name is priya raghunathan").
_EN_STRONG = re.compile(
    rf"(?i:\bmy name is|\bname:|\bcall me|\bi am called)\s+(?P<v>{_NW}(?: {_NW}){{0,2}})"
    rf"|(?i:\bthis is)\s+(?P<v2>{_NW})(?=\s+(?:from|at|with|here|speaking|calling)\b)"
    r"|(?i:\bmy name is|\bname:)\s+(?P<lo>[a-z]{2,}(?: [a-z]{2,}){1,2})\b"
)
_EN_STRONG_WORDS = ("name", "call me", "this is", "i am called")
_LOWER_STOP = frozenset(
    _words(
        """the a an and or but not no yes on in at to of for with from by is was are be been being
    very too also just still already now here there missing wrong correct right important irrelevant
    unknown hidden private
    secret listed written spelled spelt pronounced long short same different fine ok okay my your his
    her their our its this that it i you he she we they me him them us if so as than then when
    where what who why how
    which please thanks thank hi hello has have had does do did can could will would should may might must
    shall changed misspelled incorrect required invalid empty blank used taken registered showing shown
    displayed appears every one two on off up down out over under again all any some none nothing something
    different actually really"""
    )
)
_EN_TITLES = ("Mr", "Ms", "Miss", "Mx", "Dr", "Prof", "Sir", "Madam", "Rev")
_EN_VERBS = (
    " wrote",
    " said",
    " says",
    " asked",
    " told",
    " called",
    " emailed",
    " replied",
    " mentioned",
    " signed",
    " confirmed",
    " added",
)
_EN_VERB_AFTER = re.compile(
    rf"(?:^|(?<=[.!?\n]) ?|(?<=[.!?\n]  ))(?P<v>{_NW}(?: [A-Z]\.)? {_NW})"
    r"(?= (?:wrote|said|says|asked|told|called|emailed|replied|mentioned|signed|confirmed|added)\b)"
)
_EN_CAPPAIR = re.compile(rf"\b(?P<v>{_NW}(?: [A-Z]\.)? {_NW})")
# Capitalised words that make a phrase a product, team, place or title rather than a person:
# "Customer Support", "Google Cloud", "Machine Learning", "Outlook Mobile", "All Our Customers".
_NON_NAME_WORDS = frozenset(
    _words(
        """support service services team teams cloud learning machine native mobile started customers customer
    all outlook google microsoft apple amazon facebook meta windows office slack zoom react python java
    javascript data science center centre department university college school hospital bank group desk help
    helpdesk sales marketing account accounts billing tech technical engineering product products management
    admin administrator security network web app apps api studio code visual server online store shop care
    resources human relations public global international national general federal united states kingdom
    america american europe european asia africa airport station river lake mountain hotel restaurant cafe
    institute museum library police army navy air force intelligence artificial deep neural language model
    models guide introduction getting chapter section edition version update release pro plus ultra premium
    free basic standard enterprise iphone android chrome firefox safari linux ubuntu docker kubernetes azure
    github gitlab jira excel powerpoint drive docs sheets gmail maps search analytics console platform
    workspace suite dashboard portal system systems solutions technologies labs media news times journal
    daily weekly everyone everybody world our your their thanks welcome happy merry christmas easter
    birthday holiday holidays street avenue road boulevard"""
    )
)
_PLACE_WORDS = ("San", "Los", "Las", "Santa", "Saint", "St", "Fort", "Mount", "Lake", "Port", "El", "La")
_PREPOSITION_CUES = frozenset(["to", "from", "with", "by"])
_NOT_PERSON = frozenset(["dr pepper", "dr. pepper", "mr bean", "mr. bean", "mr clean", "mr. clean"])
_NOT_NAME = frozenset(
    [
        "the",
        "a",
        "an",
        "this",
        "that",
        "these",
        "those",
        "my",
        "your",
        "our",
        "their",
        "his",
        "her",
        "its",
        "street",
        "avenue",
        "road",
        "city",
        "county",
        "state",
        "new",
        "north",
        "south",
        "east",
        "west",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
        "inc",
        "llc",
        "ltd",
        "corp",
        "company",
    ]
)


def _context_matches(text: str) -> Iterator[re.Match[str]]:
    """`_EN_CONTEXT.finditer(text)`, trying the pattern only where a match can start.

    The case-insensitive phrase alternation is slow to try at every character, and a match needs
    two capitalised words after whitespace, which few positions have. Every start position a match can have
    (see _EN_CONTEXT_SPAN) is tried in order, resuming after each match like `finditer`, so the
    matches are the same ones.
    """
    lo, hi = _EN_CONTEXT_SPAN
    starts: set[int] = set()
    for m in _SPACE_NAME.finditer(text):
        w = m.start()
        while w > 0 and text[w - 1].isspace():
            w -= 1
        starts.update(range(max(0, w - hi), max(0, w - lo + 1)))
    pos = 0
    for p in sorted(starts):
        if p < pos:
            continue
        found = _EN_CONTEXT.match(text, p)
        if found is not None:
            yield found
            pos = found.end()


def _looks_like_name(words: Sequence[str]) -> bool:
    """No word is a non-name word and the phrase is not a known place (San Francisco, New York)."""
    if not words or words[0].lower() in _NOT_NAME or words[-1].lower() in _NOT_NAME:
        return False
    if any(w.lower() in _NON_NAME_WORDS for w in words) or words[0] in _PLACE_WORDS:
        return False
    return _PLACE_RE.fullmatch(" ".join(words)) is None


def _title_case_cue(text: str, m: re.Match[str]) -> bool:
    """A preposition cue written in a title-case heading: "Getting Started With React Native"."""
    cue = text[m.start() : m.start("v")].strip()
    if cue.lower() not in _PREPOSITION_CUES:
        return False
    line_start = max(text.rfind("\n", 0, m.start()) + 1, 0)
    before = text[line_start : m.start()].split()
    return cue[0].isupper() and bool(before) and before[-1][:1].isupper()


class EnglishNameDetector:
    """English person names: title > context phrase > known given name + capitalised surname.

    A capitalised phrase after a weak cue ("to", "with", "contact") is a name only when it looks
    like one: no product/team/place word in it (Customer Support, Google Cloud, San Francisco) and
    not in a title-case heading (Getting Started With React Native).
    """

    entity = "PERSON"

    def detect(self, text: str) -> Iterable[Match]:
        for matches, score, why in (
            (
                _EN_TITLE.finditer(text) if may_contain(text, _EN_TITLES) else (),
                0.9,
                "name after a personal title",
            ),
            (_context_matches(text), 0.8, "capitalised name after a context phrase"),
            (
                _EN_VERB_AFTER.finditer(text) if may_contain(text, _EN_VERBS) else (),
                0.75,
                "capitalised name as the subject of a reporting verb",
            ),
        ):
            for m in matches:
                s, e = m.span("v")
                words = m.group("v").split()
                if "t" in m.groupdict():  # a title: any capitalised word, but not a brand (Dr Pepper)
                    if (
                        " ".join([m.group("t"), *words]).lower() in _NOT_PERSON
                        or words[0].lower() in _NOT_NAME
                    ):
                        continue
                elif not _looks_like_name(words) or _title_case_cue(text, m):
                    continue
                yield Match(s, e, score, why, self.entity)
        if may_contain(ascii_fold(text), _EN_STRONG_WORDS):
            for m in _EN_STRONG.finditer(text):
                g = next(k for k in ("v", "v2", "lo") if m.group(k))
                words = m.group(g).split()
                if g == "lo":
                    if any(w in _LOWER_STOP or w in _NON_NAME_WORDS for w in words):
                        continue
                elif not (
                    words[0].lower() not in _NOT_NAME and not any(w.lower() in _NON_NAME_WORDS for w in words)
                ):
                    continue
                yield Match(m.start(g), m.end(g), 0.8, "name after a strong cue", self.entity)
        for m in _EN_CAPPAIR.finditer(text):
            words = m.group("v").split()
            if words[0].lower() in _EN_GIVEN and _looks_like_name(words):
                yield Match(
                    m.start("v"), m.end("v"), 0.75, "common given name + capitalised surname", self.entity
                )


_CN_PLACES = (
    "北京|上海|天津|重庆|广州|深圳|杭州|南京|武汉|成都|西安|苏州|郑州|长沙|沈阳|青岛|宁波|东莞|无锡|厦门|"
    "福州|济南|大连|哈尔滨|长春|昆明|合肥|南昌|贵阳|太原|石家庄|南宁|兰州|乌鲁木齐|呼和浩特|银川|西宁|拉萨|海口|"
    "香港|澳门|台湾|广东|江苏|浙江|山东|河南|河北|四川|湖北|湖南|福建|安徽|江西|辽宁|吉林|黑龙江|山西|陕西|"
    "云南|贵州|广西|甘肃|青海|宁夏|新疆|西藏|内蒙古|海南"
)


# The most frequent Chinese surnames (about 85% of the population), single- and two-character.
_CN_SURNAMES_1 = set(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
    "姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
    "常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮柯纪梅童凌毕单季"
    "裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓古吉缪简车项连芦麦褚娄窦"
    "戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫寇桑郎甄丛仲虞敖巩明佘池查麻"
    "苑迟邝官封谈匡鞠惠荆乐冀郁胥南班储原栗燕楚鄢劳谌奚皮粟冼蔺楼盘满闻位厉伊仝区郜海阚花权强帅屠豆朴盖练"
    "廉禹井祖漆巴丰支卿国狄平计索宣晋相初门云容敬来扈晁芮都普阙浦戈伏鹿薄邸雍辜羊阿乌母裘亓修邰赫杭况那宿"
    "鲜印逯隆茹诸战慕危玉银亢嵇公哈湛宾戎勾茅利於呼居揭干但尉冶斯元束檀衣信展阴昝智幸奉植衡富尧闭由"
)
_CN_SURNAMES_2 = frozenset(
    (
        "欧阳",
        "司马",
        "上官",
        "诸葛",
        "东方",
        "皇甫",
        "尉迟",
        "公孙",
        "慕容",
        "长孙",
        "宇文",
        "司徒",
        "令狐",
        "夏侯",
    )
)
_CN_CUES = (
    "姓名|名字|我叫|我是|叫做|叫|联系人|联系|通知|转告|告诉|收件人|患者|客户|员工|申请人|经办人|负责人|签名|"
    "致|由|与|和|找|请|同事|朋友|老板|经理"
)
_CN_CTX_BEFORE = re.compile(rf"(?:{_CN_CUES})[：:\s]*$")
# Cues that are as often followed by an ordinary word (我是司机, 请向左转, 和平): the candidate must
# also look like a name, not a role, a place or a word built with a noun suffix (管理员, 江西人).
_CN_WEAK_CUE = re.compile(r"(?:我是|致|由|与|和|找|请|通知|告诉)[：:\s]*$")
_CN_NOT_NAME = re.compile(
    r"司机|司令|管理|商家|商人|商户|商店|商品|商场|党员|党委|项目|向左|向右|向前|向后|向上|向下|高兴|王国|"
    r"安排|安装|安全|安静|成功|成员|成本|方面|方案|方法|方便|程序|经理|马上|明天|明白|时间|文件|白天|金额|"
    r"全部|全体|华人|黄色|李子|杨树|周末|周围|应该|应用|任务|任何|任意|于是|关于|关注|关闭|毛巾|石头|"
    r"司法|钱包|严重|常见|常用|施工|易用|齐全|乔迁|平台|计划|计算|宁可|符合|路线|游戏|车辆|卫生|米饭|"
    r"谈谈|解决|解释|原因|燕麦|万一|单位|单独|包括|包装|简单|祝贺|祝你|贺喜|强调|海关|海外|戴上|"
    r"宫殿|康复|温度|连接|苏醒|曲线|余额|许多|许可|孙子|朱红|公司|公众|公开|国家|国际|信息|信用|来自|"
    r"都是|都有|和平|和好|和谐"
)
_CN_NOUN_SUFFIX = set("人员家师长者们族士工")
_CN_PLACE_START = re.compile(rf"(?:{_CN_PLACES})")
_CN_ACTION_AFTER = re.compile(
    r"^(?:签字|签名|签收|负责|批准|审核|审批|填写|办理|提交|确认|处理|发送|来电|打电话|核实)"
)
_CN_ABOUT_AFTER = re.compile(r"^的(?:电话|手机|号码|邮箱|地址|住址|身份证|微信|账号|银行卡|护照|生日|工号)")
_CN_CTX_AFTER = re.compile(r"^(?:先生|女士|小姐|老师|医生|教授|经理|同学|总|主任|律师|警官|博士)")
_CN_VERB_AFTER = re.compile(r"^(?:说|表示|认为|告诉|称|问|回复|提到|指出)")
_CN_STOP_AFTER = set("的了是在和与说也都就很会要将把被给从到对")
_CN_NAME = re.compile(r"[\u4e00-\u9fff]{2,4}")
# First characters of the titles in _CN_CTX_AFTER and last characters of the cues in _CN_CTX_BEFORE.
_CN_TITLE_FIRST = frozenset("先女小老医教经同总主律警博")
_CN_CUE_LAST = frozenset(w[-1] for w in _CN_CUES.split("|"))
_CN_NEAR = re.compile("[" + "".join(sorted(_CN_TITLE_FIRST | _CN_CUE_LAST)) + "]")
_CN_AFTER_CUE = frozenset("：:")
_CN_SENTENCE_START = '，。！？；：、\n “"('


def _cn_may_be_name(text: str, start: int, sur: int, first: bool) -> bool:
    """A necessary condition for `ChineseNameDetector` to report a name of surname length `sur` at
    `start` (`first`: the surname opens its run of Chinese characters), on a few characters around
    it: a cue before it, a title after a one- or two-character given name, the start of a sentence,
    or, first in its run, no Chinese character after a two-character given name. Most characters of
    Chinese text are a common surname; without this test each one ran a dozen regexes (10 s/MB)."""
    if start == 0 or text[start - 1] in _CN_SENTENCE_START:
        return True
    end = start + sur + 1
    if text[end : end + 1] in _CN_TITLE_FIRST or text[end + 1 : end + 2] in _CN_TITLE_FIRST:
        return True
    if first and (end + 1 >= len(text) or not "\u4e00" <= text[end + 1] <= "\u9fff"):
        return True
    i = start - 1  # the cue must end the 6 characters before the name, less a colon and spaces
    while i >= max(0, start - 6) and (text[i] in _CN_AFTER_CUE or text[i].isspace()):
        i -= 1
    return i >= max(0, start - 6) and text[i] in _CN_CUE_LAST


def _cn_inside_prose(text: str, base: int, length: int) -> bool:
    """Whether the run `text[base : base + length]` is four characters inside a longer stretch of
    Chinese: then its first character is no sentence start, and a Chinese character follows any
    two-character given name after it, so (with no cue near) `_cn_may_be_name` fails for it."""
    return (
        length == 4
        and base > 0
        and base + 4 < len(text)
        and "\u4e00" <= text[base - 1] <= "\u9fff"
        and "\u4e00" <= text[base + 4] <= "\u9fff"
    )


def _cn_cue_near(text: str, base: int, length: int) -> bool:
    """Whether a cue or a title character is near the run `text[base : base + length]`. Without one,
    only the run's first character can pass `_cn_may_be_name` (a sentence start or a run opening
    are at the run's start), so the others need not be tried."""
    return _CN_NEAR.search(text, max(0, base - 6), base + length + 4) is not None


class ChineseNameDetector:
    """Chinese person names: common surname + one or two given-name characters, scored by context.

    Without a context cue (姓名、联系人、先生…) a surname-initial word is ambiguous (王国, 高兴), so it
    scores under the default threshold; with a cue it scores 0.85.
    """

    entity = "PERSON"

    def detect(self, text: str) -> Iterable[Match]:
        for m in _CN_NAME.finditer(text):
            run, base = m.group(), m.start()
            near = _cn_cue_near(text, base, len(run))
            if not near and _cn_inside_prose(text, base, len(run)):
                continue
            for i in range(len(run) if near else 1):
                sur = 2 if run[i : i + 2] in _CN_SURNAMES_2 else 1 if run[i] in _CN_SURNAMES_1 else 0
                if not sur or not _cn_may_be_name(text, base + i, sur, i == 0):
                    continue
                start = base + i
                before = text[max(0, start - 6) : start]
                ctx_before = bool(_CN_CTX_BEFORE.search(before))
                if _CN_NOT_NAME.match(text, start) or _CN_PLACE_START.match(text, start):
                    continue
                best: Match | None = None
                for given in (2, 1):
                    end = start + sur + given
                    name = text[start:end]
                    if len(name) != sur + given or not re.fullmatch(r"[\u4e00-\u9fff]+", name):
                        continue
                    if any(c in _CN_STOP_AFTER for c in name[sur:]):
                        continue
                    after = text[end : end + 3]
                    ctx_after = bool(_CN_CTX_AFTER.match(after))
                    boundary = not after or not re.match(r"[\u4e00-\u9fff]", after) or ctx_after
                    if (
                        ctx_before
                        and _CN_WEAK_CUE.search(before)
                        and (name[-1] in _CN_NOUN_SUFFIX or text[end : end + 1] in _CN_NOUN_SUFFIX)
                    ):
                        continue  # 我是管理员, 我是江西人: a role or an origin, not a name
                    sentence_start = start == 0 or text[start - 1] in '，。！？；：、\n “"('
                    if ctx_before and (
                        boundary or after[:1] in _CN_STOP_AFTER or _CN_ACTION_AFTER.match(text[end : end + 3])
                    ):
                        best = Match(
                            start, end, 0.85, "Chinese surname + given name after a context word", self.entity
                        )
                    elif ctx_after:
                        best = Match(
                            start, end, 0.85, "Chinese surname + given name before a title", self.entity
                        )
                    elif given == 2 and sentence_start and _CN_ABOUT_AFTER.match(text[end : end + 4]):
                        best = Match(
                            start, end, 0.8, "Chinese name before 的 + a contact detail", self.entity
                        )
                    elif _CN_VERB_AFTER.match(after) and sentence_start:
                        best = Match(
                            start, end, 0.7, "Chinese name as the subject of a reporting verb", self.entity
                        )
                    elif boundary and given == 2 and i == 0:
                        best = Match(
                            start, end, 0.45, "Chinese surname + given name, no context", self.entity
                        )
                    if best:
                        break
                if best:
                    yield best
                    break


# ---- quasi-identifiers -------------------------------------------------------------------------

_US_STATES = (
    "Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|Hawaii|Idaho|"
    "Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|Minnesota|"
    "Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire|New Jersey|New Mexico|New York|"
    "North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|Rhode Island|South Carolina|"
    "South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|West Virginia|Wisconsin|Wyoming"
)
_CITIES = (
    "Los Angeles|Chicago|Houston|Phoenix|Philadelphia|San Antonio|San Diego|Dallas|San Jose|Austin|Boston|"
    "Seattle|Denver|Miami|Atlanta|Detroit|Portland|Las Vegas|San Francisco|London|Paris|Berlin|Tokyo|"
    "Toronto|Sydney|Beijing|Shanghai|Shenzhen|Guangzhou|Hong Kong"
)
_PLACE_RE = re.compile(rf"(?:{_US_STATES}|{_CITIES})")
_STATE_ABBR = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|"
    "OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|DC|AA|AE|AP"
)


class LocationDetector(_Regex):
    entity = "LOCATION"
    pattern = re.compile(rf"\b(?:{_US_STATES}|{_CITIES})\b|(?:{_CN_PLACES})(?:省|市|自治区)?")
    score = 0.6
    reason = "place name (quasi-identifier)"
    subtype = QUASI
    literals = tuple(f"{_US_STATES}|{_CITIES}|{_CN_PLACES}".split("|"))


class ZipDetector(_Regex):
    entity = "ZIP_CODE"
    pattern = re.compile(
        rf"(?:\b(?:{_STATE_ABBR}) |(?i:zip(?: code)?|postal code|postcode)[:\s]*)"
        r"(?P<v>\d{5}(?:-\d{4})?)\b"
        r"|(?:邮编|邮政编码)[：:\s]*(?P<cn>\d{6})(?!\d)"
        # UK (NW1 6XE, SW1A 2AA: the inward letters never use C I K M O V) and Canada (M5V 3L9)
        r"|\b(?P<uk>[A-Z]{1,2}\d[A-Z\d]? \d[ABD-HJLNP-UW-Z]{2})\b"
        r"|\b(?P<ca>[ABCEGHJ-NPRSTVXY]\d[ABCEGHJ-NPRSTV-Z] \d[ABCEGHJ-NPRSTV-Z]\d)\b"
    )
    score = 0.7
    reason = "postal code (quasi-identifier)"
    subtype = QUASI
    requires = re.compile(r"\d{5}|\d[A-Z]{2}\b|[A-Z] \d[A-Z]\d")
    _units = re.compile(r"\d(?:TB|GB|MB|KB|PB|HZ|FPS|PX|DP)")

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            g = next(k for k in ("v", "cn", "uk", "ca") if m.group(k))
            if g == "uk" and self._units.fullmatch(m.group(g).split()[1]):
                continue  # "PS5 2TB": a size, not a postcode
            yield Match(m.start(g), m.end(g), self.score, self.reason, self.entity, QUASI)


class AgeDetector(_Regex):
    entity = "AGE"
    pattern = re.compile(
        r"(?i)\b(?P<v>\d{1,3}[- ]years?[- ]old|\d{1,3} ?yrs?\.? old|\d{1,3} ?y/o"
        r"|aged? \d{1,3}|age:? \d{1,3})\b"
        r"|(?P<cn>\d{1,3}(?:岁|周岁))|(?:年龄|年纪)[:：\s]*(?P<cn2>\d{1,3})(?!\d)"
    )
    score = 0.7
    reason = "age (quasi-identifier)"
    subtype = QUASI
    literals = ("year", "yr", "y/o", "age", "岁", "年龄", "年纪")
    folded = True

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            g = next(k for k in ("v", "cn", "cn2") if m.group(k))
            yield Match(m.start(g), m.end(g), self.score, self.reason, self.entity, QUASI)


class OrganizationDetector(_Regex):
    entity = "ORGANIZATION"
    pattern = re.compile(
        r"\b(?:[A-Z][A-Za-z&'-]+,? ){1,4}"
        r"(?:Inc|LLC|Ltd|Corp|Corporation|Co|Group|PLC|GmbH|Company|University|Bank)\b\.?"
        r"|[\u4e00-\u9fff]{2,12}(?:有限责任公司|股份有限公司|有限公司|集团|银行|大学)"
    )
    score = 0.6
    reason = "organisation name (quasi-identifier)"
    subtype = QUASI
    literals = (
        "Inc",
        "LLC",
        "Ltd",
        "Co",
        "Group",
        "PLC",
        "GmbH",
        "University",
        "Bank",
        "有限",
        "集团",
        "银行",
        "大学",
    )
    _lead = re.compile(r"(?:[我你他她]们?)?(?:现在|目前)?(?:就职于|任职于|加入了?|入职|在|于|是|去|到)")

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            start = m.start()
            lead = self._lead.match(m.group()) if m.group()[0] >= "\u4e00" else None
            if lead and m.end() - (start + lead.end()) >= 4:
                start += lead.end()
            yield Match(start, m.end(), self.score, self.reason, self.entity, QUASI)


_NRP_EN = (
    "American|Chinese|Mexican|Indian|British|French|German|Japanese|Korean|Russian|Canadian|"
    "Muslim|Christian|Catholic|Protestant|Jewish|Hindu|Buddhist|Sikh|Mormon|Atheist|"
    "Democrat|Republican|Communist|Socialist|Libertarian"
)
_NRP_CN = "穆斯林|基督徒|天主教徒|佛教徒|共产党员|民主党|共和党|汉族|回族|藏族|维吾尔族|满族|蒙古族"


class NrpDetector(_Regex):
    """Nationality, religion or political affiliation: special-category data under GDPR art. 9."""

    entity = "NRP"
    pattern = re.compile(rf"\b(?:{_NRP_EN})s?\b|(?:{_NRP_CN})")
    score = 0.55
    reason = "nationality, religion or political affiliation (quasi-identifier)"
    subtype = QUASI
    literals = tuple(f"{_NRP_EN}|{_NRP_CN}".split("|"))


def default_detectors() -> list[PatternDetector]:
    """All PII detectors, direct identifiers first."""
    return [
        EmailDetector(),
        UrlCredentialsDetector(),
        PhoneDetector(),
        CardDetector(),
        IbanDetector(),
        SsnDetector(),
        CnResidentIdDetector(),
        IpDetector(),
        MacDetector(),
        PassportDetector(),
        DriverLicenseDetector(),
        DateDetector(),
        StreetAddressDetector(),
        EnglishNameDetector(),
        ChineseNameDetector(),
        LocationDetector(),
        ZipDetector(),
        AgeDetector(),
        OrganizationDetector(),
        NrpDetector(),
    ]


PII_ENTITIES = (
    "EMAIL_ADDRESS", "URL_CREDENTIALS", "PHONE_NUMBER", "CREDIT_CARD", "CN_BANK_CARD", "IBAN_CODE",
    "US_SSN", "CN_RESIDENT_ID", "IP_ADDRESS", "MAC_ADDRESS", "PASSPORT", "DRIVER_LICENSE",
    "DATE_OF_BIRTH", "STREET_ADDRESS", "PERSON",
)  # fmt: skip
QUASI_ENTITIES = ("LOCATION", "ZIP_CODE", "AGE", "DATE", "ORGANIZATION", "NRP")


class PIIScanner:
    """PII in English and Chinese text. `entities` restricts which entity types are reported; it is
    also the set a policy's `entity_actions` may name for this scanner."""

    name = "pii"
    category: Category = "pii"

    def __init__(self, entities: Sequence[str] | None = None, include_quasi: bool = True) -> None:
        known = set(PII_ENTITIES) | set(QUASI_ENTITIES)
        if entities is not None:
            unknown = sorted(set(entities) - known)
            if unknown:
                raise ValueError(f"pii: unknown entities {unknown}; known: {sorted(known)}")
        self.entities = frozenset(entities) if entities is not None else frozenset(known)
        if not include_quasi:
            self.entities = self.entities - set(QUASI_ENTITIES)
        self.detectors = default_detectors()

    def scan(self, doc: Document, ctx: ScanContext) -> list[Finding]:
        found = scan_with_detectors(doc, self.detectors, category="pii", scanner=self.name)
        return [f for f in found if f.entity in self.entities]
