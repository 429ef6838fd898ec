"""PII formats people write every day: whole-value spans (no partial redaction), false positives on
ordinary text, and national / label-colon / non-ASCII formats (review 3, sections A-C)."""

from __future__ import annotations

import pytest

from steward.guard import ScanContext, normalise
from steward.guard.pii import QUASI_ENTITIES, PIIScanner, iban_valid

PII = PIIScanner()


def findings(text: str, min_score: float = 0.5) -> set[tuple[str, str]]:
    return {
        (f.entity, text[f.start : f.end])
        for f in PII.scan(normalise(text), ScanContext())
        if f.score >= min_score
    }


def direct(text: str) -> set[tuple[str, str]]:
    return {(e, s) for e, s in findings(text) if e not in QUASI_ENTITIES}


# ---- C. the whole value is in the span -------------------------------------------------------------

SPANS = [
    ("Please ask Mr. McDonald to call", "PERSON", "McDonald"),
    ("Dr. DeAngelo will see you", "PERSON", "DeAngelo"),
    ("Contact Patrick O'Brien today", "PERSON", "Patrick O'Brien"),
    ("Dear Ms. O'Connor,", "PERSON", "O'Connor"),
    ("This is Sarah Johnson-Smith speaking", "PERSON", "Sarah Johnson-Smith"),
    ("Regards,\nAhmed Al-Farsi", "PERSON", "Ahmed Al-Farsi"),
    ("Hello Maria García", "PERSON", "Maria García"),
    ("mail me: Jane_O'Brien@example.com", "EMAIL_ADDRESS", "Jane_O'Brien@example.com"),
    ("müller@firma.de", "EMAIL_ADDRESS", "müller@firma.de"),
    ("write to josé@example.com", "EMAIL_ADDRESS", "josé@example.com"),
    ("info@münchen.de", "EMAIL_ADDRESS", "info@münchen.de"),
    ("send to 'jane@example.com' now", "EMAIL_ADDRESS", "jane@example.com"),
    (
        "我住在上海市浦东新区世纪大道100号15楼1501室",
        "STREET_ADDRESS",
        "上海市浦东新区世纪大道100号15楼1501室",
    ),
    ("我家在成都市武侯区人民南路四段11号", "STREET_ADDRESS", "成都市武侯区人民南路四段11号"),
    ("北京市朝阳区建国路88号院3号楼2单元501", "STREET_ADDRESS", "北京市朝阳区建国路88号院3号楼2单元501"),
    (
        "广州市天河区体育西路191号中石化大厦B塔2801",
        "STREET_ADDRESS",
        "广州市天河区体育西路191号中石化大厦B塔2801",
    ),
    ("北京市朝阳区建国路88号SOHO现代城A座1001", "STREET_ADDRESS", "北京市朝阳区建国路88号SOHO现代城A座1001"),
    ("Address: 123 Main St Apt 4B", "STREET_ADDRESS", "123 Main St Apt 4B"),
    ("phone (+86) 138 1234 5678", "PHONE_NUMBER", "(+86) 138 1234 5678"),
    ("call 1-800-555-0199", "PHONE_NUMBER", "1-800-555-0199"),
    ("phone 0086 138 1234 5678", "PHONE_NUMBER", "0086 138 1234 5678"),
    ("我在阿里巴巴集团工作", "ORGANIZATION", "阿里巴巴集团"),
]


@pytest.mark.parametrize(("text", "entity", "span"), SPANS)
def test_span_covers_the_whole_value(text: str, entity: str, span: str) -> None:
    assert (entity, span) in findings(text), findings(text)


def test_address_span_leaves_the_lead_words_out() -> None:
    for text in ("我住在上海市浦东新区世纪大道100号", "我家在成都市武侯区人民南路11号"):
        spans = [s for e, s in findings(text) if e == "STREET_ADDRESS"]
        assert spans and not any(s.startswith(("我", "住", "家", "在")) for s in spans), spans


# ---- A. ordinary text stays clean ----------------------------------------------------------------

NOT_PII = [
    "I flew to San Francisco last week",
    "Please contact Customer Support",
    "I work with Google Cloud",
    "Introduction to Machine Learning",
    "Getting Started With React Native",
    "Sent from Outlook Mobile",
    "Thanks To All Our Customers",
    "I ordered a Dr Pepper",
    "我是司机",
    "我是管理员",
    "我是商家",
    "我是党员",
    "我是江西人",
    "我是项目经理",
    "请向左转",
    "请问明天会下雨吗？",
    '[assembly: AssemblyVersion("1.0.0.0")]',
    "Python 3.11.4.1 released",
    "Order #123-456-7890 has shipped",
    "Product code 555-123-4567",
    "The range is 100 200 3000",
    "The part number is 123-45-6789",
    "see image@2x.png",
    "logo@3x.jpg and icon@1.5x.webp",
    # look-alikes of the new formats
    "We sold 020 units in 7946 stores",
    "The score was 06 12 in the first half",
    "Upgrade to version 10.0.19041.1 today",
    "the ratio is 1:2:3:4:5:6",
    "buy a PS5 2TB console",
    "I have 5 yrs of experience",
    "my name is not important",
    "My name is on the list",
    "Born in the USA",
    "build 20240101 passed",
    "The meeting is at 10:30 in room 4, bring the Q3 report.",
    "订单号20240101已经发货，预计3天送达。",
    "hash ab12cdef34567890abcdef1234 in the log",
]


@pytest.mark.parametrize("text", NOT_PII)
def test_ordinary_text_has_no_direct_identifier(text: str) -> None:
    assert not direct(text), direct(text)


def test_ssn_without_context_still_found_when_no_other_label() -> None:
    assert ("US_SSN", "078-05-1120") in findings("it is 078-05-1120")


# ---- B. formats people write every day -----------------------------------------------------------

FOUND = [
    ("server at 192.168.1.10:8080", "IP_ADDRESS", "192.168.1.10"),
    ("listening on 0.0.0.0:8000", "IP_ADDRESS", "0.0.0.0"),
    ("curl http://192.168.0.1:3000/api", "IP_ADDRESS", "192.168.0.1"),
    ("ip:8.8.8.8", "IP_ADDRESS", "8.8.8.8"),
    ("host:192.168.1.1", "IP_ADDRESS", "192.168.1.1"),
    ("IP地址：192.168.1.1", "IP_ADDRESS", "192.168.1.1"),
    ("IPv6：2001:db8::1", "IP_ADDRESS", "2001:db8::1"),
    ("MAC地址：00:1A:2B:3C:4D:5E", "MAC_ADDRESS", "00:1A:2B:3C:4D:5E"),
    ("mac:00:1a:2b:3c:4d:5e", "MAC_ADDRESS", "00:1a:2b:3c:4d:5e"),
    ("My name is priya raghunathan", "PERSON", "priya raghunathan"),
    ("Customer: Hans Müller", "PERSON", "Hans Müller"),
    ("Name: José Álvarez", "PERSON", "José Álvarez"),
    ("Thank you, Zoë Saldaña", "PERSON", "Zoë Saldaña"),
    ("my name is Olumide.", "PERSON", "Olumide"),
    ("This is Siobhan from support", "PERSON", "Siobhan"),
    ("由刘德华签字", "PERSON", "刘德华"),
    ("张三丰的电话是13912345678", "PERSON", "张三丰"),
    ("Ring me on 020 7946 0958", "PHONE_NUMBER", "020 7946 0958"),
    ("mobile 07700 900123", "PHONE_NUMBER", "07700 900123"),
    ("appelle-moi au 06 12 34 56 78", "PHONE_NUMBER", "06 12 34 56 78"),
    ("Telefon: 030 901820", "PHONE_NUMBER", "030 901820"),
    ("mobile 0412 345 678", "PHONE_NUMBER", "0412 345 678"),
    ("座机：021-6234 5678", "PHONE_NUMBER", "021-6234 5678"),
    ("电话：021 62345678", "PHONE_NUMBER", "021 62345678"),
    ("电话：(021)62345678", "PHONE_NUMBER", "(021)62345678"),
    ("客服 0755 8888 6666", "PHONE_NUMBER", "0755 8888 6666"),
    ("tel 555\u2013123\u20134567", "PHONE_NUMBER", "555\u2013123\u20134567"),
    ("iban gb82 west 1234 5698 7654 32", "IBAN_CODE", "gb82 west 1234 5698 7654 32"),
    ("IBAN: gb82west12345698765432", "IBAN_CODE", "gb82west12345698765432"),
    ("pay GB82-WEST-1234-5698-7654-32 today", "IBAN_CODE", "GB82-WEST-1234-5698-7654-32"),
    ("card 4111\u20131111\u20131111\u20131111", "CREDIT_CARD", "4111\u20131111\u20131111\u20131111"),
    ("card 4111  1111  1111  1111", "CREDIT_CARD", "4111  1111  1111  1111"),
    ("card 4111.1111.1111.1111.", "CREDIT_CARD", "4111.1111.1111.1111"),
    ("Date of birth: 3rd April 1990", "DATE_OF_BIRTH", "3rd April 1990"),
    ("Born: 4th of April, 1990", "DATE_OF_BIRTH", "4th of April, 1990"),
    ("dob=19900304", "DATE_OF_BIRTH", "19900304"),
    ("出生年月：1990年3月", "DATE_OF_BIRTH", "1990年3月"),
    ("I live at 221B Baker Street", "STREET_ADDRESS", "221B Baker Street"),
    ("Address: 123 main street", "STREET_ADDRESS", "123 main street"),
    ("send it to PO Box 1234", "STREET_ADDRESS", "PO Box 1234"),
]


@pytest.mark.parametrize(("text", "entity", "span"), FOUND)
def test_everyday_format_is_found(text: str, entity: str, span: str) -> None:
    assert (entity, span) in findings(text), findings(text)


QUASI_FOUND = [
    ("London NW1 6XE", "ZIP_CODE", "NW1 6XE"),
    ("London SW1A 2AA", "ZIP_CODE", "SW1A 2AA"),
    ("Toronto, ON M5V 3L9", "ZIP_CODE", "M5V 3L9"),
    ("年龄：34", "AGE", "34"),
    ("he is 34 yrs old", "AGE", "34 yrs old"),
]


@pytest.mark.parametrize(("text", "entity", "span"), QUASI_FOUND)
def test_everyday_quasi_identifier_is_found(text: str, entity: str, span: str) -> None:
    assert (entity, span) in findings(text), findings(text)


def test_iban_normalised_before_mod_97() -> None:
    assert iban_valid("gb82-west-1234-5698-7654-32")
    assert not iban_valid("gb82-west-1234-5698-7654-33")


@pytest.mark.parametrize(
    "text",
    [
        "card 4111\u20131111\u20131111\u20131112",  # Luhn fails
        "iban gb82 west 1234 5698 7654 33",  # mod-97 fails
        "version 4111.1111.1111",  # too short for a card
    ],
)
def test_new_separators_still_validate(text: str) -> None:
    assert not direct(text), direct(text)


def test_email_span_leaves_a_chinese_label_out() -> None:
    assert ("EMAIL_ADDRESS", "zhangsan@163.com") in findings("邮箱zhangsan@163.com")


# ---- B13. context-word IDs, grouped resident IDs, Cisco MACs, dotted SSNs, IPv4-mapped IPv6 ----

B13_FOUND = [
    ("Passport No: C01X00T47", "PASSPORT", "C01X00T47"),
    ("passport number 123456789", "PASSPORT", "123456789"),
    ("护照号码：E12345678", "PASSPORT", "E12345678"),
    ("护照号 G12345678", "PASSPORT", "G12345678"),
    ("DL# S123-456-78-901-0", "DRIVER_LICENSE", "S123-456-78-901-0"),
    ("driver's license D123-4567-8901", "DRIVER_LICENSE", "D123-4567-8901"),
    ("licence number MORGA657054SM9IJ", "DRIVER_LICENSE", "MORGA657054SM9IJ"),
    # a Chinese driving licence number is the holder's resident ID
    ("驾驶证号 110101199003077774", "CN_RESIDENT_ID", "110101199003077774"),
    ("110101 19900307 7774", "CN_RESIDENT_ID", "110101 19900307 7774"),
    ("id 110101-19900307-7774", "CN_RESIDENT_ID", "110101-19900307-7774"),
    ("001A.2B3C.4D5E", "MAC_ADDRESS", "001A.2B3C.4D5E"),
    ("MAC: 001a.2b3c.4d5e.", "MAC_ADDRESS", "001a.2b3c.4d5e"),
    ("mac 2023.0101.1234", "MAC_ADDRESS", "2023.0101.1234"),
    ("SSN 123.45.6789", "US_SSN", "123.45.6789"),
    ("::ffff:192.168.1.1", "IP_ADDRESS", "::ffff:192.168.1.1"),
    ("addr ::ffff:192.168.1.1 ok", "IP_ADDRESS", "::ffff:192.168.1.1"),
]


@pytest.mark.parametrize(("text", "entity", "span"), B13_FOUND)
def test_b13_format_is_found_whole(text: str, entity: str, span: str) -> None:
    assert (entity, span) in findings(text), findings(text)


@pytest.mark.parametrize(
    "text",
    [
        "C01X00T47",  # no passport word
        "Order C01X00T47",
        "S123-456-78-901-0",  # no licence word
        "MORGA657054SM9IJ",
        "DL# S123-456",  # too short for a licence
        "Passport No: ABCDEFGH1",  # one digit: a word, not a number
        "110101 19900307 7775",  # GB 11643 check digit fails
        "2023.0101.1234",  # all digits, no MAC word
        "file abcd.ef01.2345.txt",
        "123.45.6789",  # dotted, no SSN word
        "version 123.45.6789",
        "ip ::ffff:999.1.1.1",  # not an address
    ],
)
def test_b13_near_miss_is_not_reported(text: str) -> None:
    assert not direct(text), direct(text)


def test_b13_dotted_version_is_not_an_ssn() -> None:
    assert not {e for e, _ in findings("1.2.3.4567")} & {"US_SSN", "IP_ADDRESS", "MAC_ADDRESS"}


def test_b13_ipv4_mapped_ipv6_is_one_span() -> None:
    found = findings("host ::ffff:10.0.0.1 up")
    assert found == {("IP_ADDRESS", "::ffff:10.0.0.1")}, found
