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

from .base import Match, PatternDetector, ascii_fold, may_contain, scan_with_detectors
from .normalize import Document
from .types import Category, Finding, ScanContext

__all__ = ["PII_ENTITIES", "QUASI_ENTITIES", "PIIScanner", "cn_resident_id_valid", "iban_valid", "luhn_valid"]

QUASI = "quasi_identifier"


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


def iban_valid(iban: str) -> bool:
    """ISO 13616 mod-97: move the first four characters to the end, letters to numbers, rest is 1."""
    s = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s):
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


class EmailDetector(_Regex):
    entity = "EMAIL_ADDRESS"
    pattern = re.compile(
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
    )
    score = 0.95
    reason = "email address pattern"
    literals = ("@",)


class UrlCredentialsDetector(_Regex):
    entity = "URL_CREDENTIALS"
    pattern = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]+:[^\s/@]+@[^\s<>\"']+")
    score = 0.95
    reason = "URL with embedded user:password"
    literals = ("://",)


_PHONE_CTX = re.compile(r"(?i)phone|tel|call|mobile|cell|fax|contact|whatsapp|电话|手机|致电|联系|热线")


class PhoneDetector(_Regex):
    """E.164, North American national formats, China mobiles and landlines."""

    entity = "PHONE_NUMBER"
    pattern = re.compile(
        r"(?<![A-Za-z0-9+])(?:"
        r"\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,4}"  # E.164 / international
        r"|(?:001[-.\s]?)?(?:\(\d{3}\)\s?|\d{3}[-.\s])\d{3}[-.\s]\d{4}"  # NANP formatted
        r"|(?:\+?86[-\s]?)?1[3-9]\d[-\s]?\d{4}[-\s]?\d{4}"  # China mobile
        r"|0\d{2,3}-\d{7,8}"  # China landline
        r"|\d{10}"  # bare NANP, needs context
        r")(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![A-Za-z0-9])"
    )
    reason = "phone number"

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        digits = re.sub(r"\D", "", re.split(r"\s?(?:x|ext)", m.group())[0])
        if not 10 <= len(digits) <= 16:
            return None
        s = m.group()
        if re.fullmatch(r"\d{10}", s):
            return 0.8 if _ctx(text, m.start(), m.end(), _PHONE_CTX) else 0.3
        if re.fullmatch(r"(?:\+?86[-\s]?)?1[3-9]\d{9}", s.replace(" ", "").replace("-", "")):
            return 0.85
        return 0.85 if _ctx(text, m.start(), m.end(), _PHONE_CTX) else 0.75


_CARD_CTX = re.compile(r"(?i)card|visa|mastercard|amex|credit|debit|卡|银行|账户|账号")
_CN_BANK_CTX = re.compile(r"银行|卡号|储蓄卡|借记卡|账户|账号|开户|银联|(?i:unionpay|bank)")


def _card_prefix(digits: str) -> bool:
    """Issuer ranges: Visa 4, Mastercard 51-55 and 2221-2720, Amex 34/37, Diners 30/36/38,
    Discover 6011/65, Maestro 50/56-69, JCB 35 and the older 15-digit 1800/2131."""
    return digits[0] in "3456" or digits[:4] in ("1800", "2131") or 2221 <= int(digits[:4]) <= 2720


class CardDetector(_Regex):
    """Payment cards (Luhn). UnionPay-range numbers (62...) are reported as China bank cards."""

    entity = "CREDIT_CARD"
    pattern = re.compile(r"(?<![\d-])\d(?:[ -]?\d){11,18}(?![\d-])")
    reason = "card number passing the Luhn check"
    requires = re.compile(r"\d(?:[ -]?\d){11}")

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if not 12 <= len(digits) <= 19:
                continue
            groups = re.split(r"[ -]", m.group())
            if len(groups) > 1 and len({len(g) for g in groups[:-1]}) > 1 and len(groups) != 3:
                continue  # irregular grouping: a phone number or an id, not a card
            ok = luhn_valid(digits)
            cn_ctx = _ctx(text, m.start(), m.end(), _CN_BANK_CTX)
            if digits.startswith("62") and 16 <= len(digits) <= 19 and (ok or cn_ctx):
                score = 0.95 if ok else 0.8
                why = "China bank card (UnionPay 62 prefix" + (", Luhn valid)" if ok else ", bank context)")
                yield Match(m.start(), m.end(), score, why, "CN_BANK_CARD")
            elif (
                cn_ctx
                and 16 <= len(digits) <= 19
                and re.search(r"银行|卡号|储蓄卡|借记卡", text[max(0, m.start() - 30) : m.start()])
            ):
                yield Match(m.start(), m.end(), 0.85, "bank card number with context", "CN_BANK_CARD")
            elif ok and _card_prefix(digits):
                ctx = _ctx(text, m.start(), m.end(), _CARD_CTX)
                if len(digits) == 12 and not ctx:
                    continue  # 12-digit Maestro numbers are too common as plain numbers
                score = 0.95 if ctx or len(groups) > 1 else 0.9
                yield Match(m.start(), m.end(), score, self.reason, self.entity)


class IbanDetector(_Regex):
    entity = "IBAN_CODE"
    pattern = re.compile(
        r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])"
    )
    score = 0.95
    reason = "IBAN passing the mod-97 check"
    requires = re.compile(r"[A-Z]{2}\d{2}")

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        return self.score if iban_valid(m.group()) else None


_SSN_CTX = re.compile(r"(?i)ssn|social security|社会安全")


class SsnDetector(_Regex):
    entity = "US_SSN"
    pattern = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ]?)(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
    reason = "US social security number"
    requires = re.compile(r"\d{3}[- ]?\d{2}[- ]?\d{4}")

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        ctx = _ctx(text, m.start(), m.end(), _SSN_CTX)
        if m.group(1) == "-":
            return 0.9 if ctx else 0.7
        return 0.85 if ctx else None


class CnResidentIdDetector(_Regex):
    entity = "CN_RESIDENT_ID"
    pattern = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
    score = 0.98
    reason = "China resident ID passing the GB 11643 check digit"
    requires = re.compile(r"\d{17}")

    def validate(self, text: str, m: re.Match[str]) -> float | None:
        return self.score if cn_resident_id_valid(m.group()) else None


class IpDetector(_Regex):
    entity = "IP_ADDRESS"
    pattern = re.compile(
        r"(?<![A-Za-z0-9.:])(?:(?:\d{1,3}\.){3}\d{1,3}|(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{2,39}(?:%\w+)?)(?![A-Za-z0-9:]|\.\d)"
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
        if re.fullmatch(r"(?:[0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", m.group()):
            return None  # a MAC address, not IPv6
        return self.score


class MacDetector(_Regex):
    entity = "MAC_ADDRESS"
    pattern = re.compile(
        r"(?<![A-Za-z0-9:-])(?:[0-9A-Fa-f]{2}([:-]))(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}(?![A-Za-z0-9:-])"
    )
    score = 0.85
    reason = "MAC address"
    requires = re.compile(r"[0-9A-Fa-f]{2}[:-][0-9A-Fa-f]{2}")


class PassportDetector(_Regex):
    entity = "PASSPORT"
    pattern = re.compile(
        r"(?i:passport|护照)[^\n\d]{0,25}?(?P<v>(?<![A-Z0-9])[A-Z]{0,2}\d{6,9}(?![A-Za-z0-9]))"
    )
    score = 0.85
    reason = "passport number after a passport context word"
    literals = ("passport", "护照")
    folded = True


class DriverLicenseDetector(_Regex):
    entity = "DRIVER_LICENSE"
    pattern = re.compile(
        r"(?i:driver'?s? ?licen[cs]e|driving licen[cs]e|licen[cs]e (?:no|number|#)|\bDL\b|驾驶证|驾照)"
        r"[^\n]{0,20}?(?P<v>(?<![A-Za-z0-9])[A-Z]{0,2}\d{5,18}[A-Z0-9]?(?![A-Za-z0-9]))"
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
    rf"|{_MONTHS}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}|\d{{1,2}} {_MONTHS}\.?,? \d{{4}}"
    r"|\d{4}年\d{1,2}月\d{1,2}日)"
)
_DOB_CTX = re.compile(r"(?i)\bborn\b|\bdob\b|d\.o\.b|date of birth|birth ?date|birthday|出生|生日|生于")


class DateDetector(_Regex):
    """Dates; with a birth context word they are DATE_OF_BIRTH (redacted), else a quasi-identifier."""

    entity = "DATE"
    pattern = re.compile(rf"(?<![A-Za-z0-9]){_DATE}(?![\d])")
    literals = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec", "年")
    requires = re.compile(r"\d[-/.]\d")

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            if _ctx(text, m.start(), m.end(), _DOB_CTX, before=40):
                yield Match(m.start(), m.end(), 0.9, "date next to a birth context word", "DATE_OF_BIRTH")
            else:
                yield Match(m.start(), m.end(), 0.6, "calendar date (quasi-identifier)", "DATE", QUASI)


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


class StreetAddressDetector(_Regex):
    entity = "STREET_ADDRESS"
    pattern = re.compile(
        rf"\b\d{{1,6}} (?:[NSEW]\.? )?(?:[A-Z][a-z]+ ){{1,3}}(?:{_SUFFIXES})\b\.?"
        r"(?:,? (?:Apt\.|Suite|Unit|#) ?\d+[A-Z]?)?"
        r"|(?:[\u4e00-\u9fff]{2,8}(?:省|自治区|特别行政区))?[\u4e00-\u9fff]{2,6}(?:市|县|区|盟|州)"
        r"[\u4e00-\u9fff]{0,12}?(?:路|街|大道|巷|道|胡同|大街)[A-Za-z\u4e00-\u9fff]{0,4}?"
        r"(?:\d{1,5}号|[A-Za-z\d]{1,5}座)(?:\d{1,4}(?:室|楼|单元))?"
    )
    score = 0.85
    reason = "street address"
    literals = ("路", "街", "巷", "道", "胡同")
    requires = re.compile(r"\d [A-Z]")  # "12 N. Main St" too: N is a capital
    _lead = re.compile(r"^(?:寄到|送到|发到|寄往|住在|位于|地址是|地址为|地址|在|到|住址)")

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            lead = self._lead.match(m.group())
            start = m.start() + (lead.end() if lead else 0)
            yield Match(start, m.end(), self.score, self.reason, self.entity)


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
_EN_TITLE = re.compile(
    r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Rev)\.? "
    r"(?P<v>[A-Z][a-z'’-]+(?: [A-Z]\.)?(?: [A-Z][a-z'’-]+){0,2})"
)
_EN_CONTEXT = re.compile(
    r"(?i:my name is|name is|name:|i am|i'm|this is|dear|signed|sincerely,|regards,|contact|call|ask for|"
    r"patient|customer|employee|client|user|applicant|from|by|with|to|cc:|attn:?|hi|hello|thanks,|thank you,|"
    r"best,|cheers,|ask|tell|email|met|meet)"
    r"\s+(?P<v>[A-Z][a-z'’-]+(?: [A-Z]\.)?(?: [A-Z][a-z'’-]+){1,2})"
)
# Every phrase of _EN_CONTEXT is 2 to 10 characters long and ends in a non-space character
# (tests/guard/test_detectors.py checks both), so a match starts 2-10 characters before the start of
# the whitespace run that precedes its capitalised name.
_EN_CONTEXT_SPAN = (2, 10)
_SPACE_NAME = re.compile(r"\s(?=[A-Z][a-z'’-]+(?: [A-Z]\.)? [A-Z])")  # what the name needs at least
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
    r"(?:^|(?<=[.!?\n]) ?|(?<=[.!?\n]  ))(?P<v>[A-Z][a-z'’-]+(?: [A-Z]\.)? [A-Z][a-z'’-]+)"
    r"(?= (?:wrote|said|says|asked|told|called|emailed|replied|mentioned|signed|confirmed|added)\b)"
)
_EN_CAPPAIR = re.compile(r"\b(?P<v>[A-Z][a-z'’-]+(?: [A-Z]\.)? [A-Z][a-z'’-]+(?:-[A-Z][a-z]+)?)\b")
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


class EnglishNameDetector:
    """English person names: title > context phrase > known given name + capitalised surname."""

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
                if words and words[0].lower() not in _NOT_NAME and words[-1].lower() not in _NOT_NAME:
                    yield Match(s, e, score, why, self.entity)
        for m in _EN_CAPPAIR.finditer(text):
            first, last = m.group("v").split()[0], m.group("v").split()[-1]
            if first.lower() in _EN_GIVEN and last.lower() not in _NOT_NAME:
                yield Match(
                    m.start("v"), m.end("v"), 0.75, "common given name + capitalised surname", self.entity
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
_CN_SURNAMES_2 = (
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
_CN_CTX_BEFORE = re.compile(
    r"(?:姓名|名字|我叫|我是|叫做|叫|联系人|联系|通知|转告|告诉|收件人|患者|客户|员工|申请人|经办人|负责人|签名|致|由|与|和|找|请|同事|朋友|老板|经理)[：:\s]*$"
)
_CN_CTX_AFTER = re.compile(r"^(?:先生|女士|小姐|老师|医生|教授|经理|同学|总|主任|律师|警官|博士)")
_CN_VERB_AFTER = re.compile(r"^(?:说|表示|认为|告诉|称|问|回复|提到|指出)")
_CN_STOP_AFTER = set("的了是在和与说也都就很会要将把被给从到对")
_CN_NAME = re.compile(r"[\u4e00-\u9fff]{2,4}")


class ChineseNameDetector:
    """Chinese person names: common surname + one or two given-name characters, scored by context.

    Without a context cue (姓名、联系人、先生…) a surname-initial word is ambiguous (王国, 高兴), so it
    scores under the default threshold; with a cue it scores 0.85.
    """

    entity = "PERSON"

    def detect(self, text: str) -> Iterable[Match]:
        for m in _CN_NAME.finditer(text):
            run, base = m.group(), m.start()
            for i in range(len(run)):
                sur = 2 if run[i : i + 2] in _CN_SURNAMES_2 else 1 if run[i] in _CN_SURNAMES_1 else 0
                if not sur:
                    continue
                start = base + i
                before = text[max(0, start - 6) : start]
                ctx_before = bool(_CN_CTX_BEFORE.search(before))
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
                    if ctx_before and (boundary or after[:1] in _CN_STOP_AFTER):
                        best = Match(
                            start, end, 0.85, "Chinese surname + given name after a context word", self.entity
                        )
                    elif ctx_after:
                        best = Match(
                            start, end, 0.85, "Chinese surname + given name before a title", self.entity
                        )
                    elif _CN_VERB_AFTER.match(after) and (
                        start == 0 or text[start - 1] in '，。！？；：、\n “"('
                    ):
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
_STATE_ABBR = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|"
    "OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|DC|AA|AE|AP"
)
_CN_PLACES = (
    "北京|上海|天津|重庆|广州|深圳|杭州|南京|武汉|成都|西安|苏州|郑州|长沙|沈阳|青岛|宁波|东莞|无锡|厦门|"
    "福州|济南|大连|哈尔滨|长春|昆明|合肥|南昌|贵阳|太原|石家庄|南宁|兰州|乌鲁木齐|呼和浩特|银川|西宁|拉萨|海口|"
    "香港|澳门|台湾|广东|江苏|浙江|山东|河南|河北|四川|湖北|湖南|福建|安徽|江西|辽宁|吉林|黑龙江|山西|陕西|"
    "云南|贵州|广西|甘肃|青海|宁夏|新疆|西藏|内蒙古|海南"
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
    )
    score = 0.7
    reason = "postal code (quasi-identifier)"
    subtype = QUASI
    requires = re.compile(r"\d{5}")

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            g = "v" if m.group("v") else "cn"
            yield Match(m.start(g), m.end(g), self.score, self.reason, self.entity, QUASI)


class AgeDetector(_Regex):
    entity = "AGE"
    pattern = re.compile(
        r"(?i)\b(?P<v>\d{1,3}[- ]years?[- ]old|aged? \d{1,3}|age:? \d{1,3})\b|(?P<cn>\d{1,3}(?:岁|周岁))"
    )
    score = 0.7
    reason = "age (quasi-identifier)"
    subtype = QUASI
    literals = ("year", "age", "岁")
    folded = True

    def detect(self, text: str) -> Iterable[Match]:
        if not self.may_match(text):
            return
        for m in self.pattern.finditer(text):
            g = "v" if m.group("v") else "cn"
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
