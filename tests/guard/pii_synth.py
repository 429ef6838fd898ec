"""Synthetic, labelled PII text (Faker en_US and zh_CN) for tests and benchmarks/bench_guards.py.

Texts are assembled piece by piece, so every gold span is exact. Templates mix easy cases (context
words present) with harder ones (no context, names at sentence start) and PII-free sentences that
contain numbers, so recall and false positives are both measured.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from faker import Faker

Gold = tuple[int, int, str]


@dataclass
class Sample:
    text: str
    spans: list[Gold]
    lang: str


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body + "0")):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


_EN = [
    "Hi, my name is {PERSON} and my email is {EMAIL_ADDRESS}.",
    "Please call {PERSON} at {PHONE_NUMBER} about the invoice.",
    "Ship the replacement to {STREET_ADDRESS} before Monday.",
    "Card number {CREDIT_CARD}, exp 04/27, was declined.",
    "My SSN is {US_SSN}, can you check my tax file?",
    "Wire the deposit to IBAN {IBAN_CODE} by Friday.",
    "The server at {IP_ADDRESS} keeps rejecting connections.",
    "Device {MAC_ADDRESS} is not on the allow list.",
    "Passport number {PASSPORT}, issued in 2019.",
    "Date of birth: {DATE_OF_BIRTH}",
    "{PERSON} wrote that the meeting is moved to Thursday.",
    "Thanks, {PERSON}",
    "Connect with {URL_CREDENTIALS} and run the migration.",
    "I paid with {CREDIT_CARD} and the receipt went to {EMAIL_ADDRESS}.",
    "Patient {PERSON}, born {DATE_OF_BIRTH}, lives at {STREET_ADDRESS}.",
    "Dear {PERSON}, your appointment is confirmed. Questions? Call {PHONE_NUMBER}.",
    "Contact {PERSON} ({EMAIL_ADDRESS}) for the keys.",
    "Our fallback DNS is {IP_ADDRESS}; the old one was {IP_ADDRESS}.",
    "The meeting is at 10:30 in room 4, bring the Q3 report.",
    "Version 3.2.1 was released with build 20240101 and 12 fixes.",
    "Order #123456789 shipped on time; tracking shows 3 stops.",
    "Add 250 grams of flour and bake at 180 degrees for 25 minutes.",
]
_ZH = [
    "我叫{PERSON}，手机号是{PHONE_NUMBER}。",
    "联系人：{PERSON}，电话{PHONE_NUMBER}",
    "身份证号码{CN_RESIDENT_ID}，请核对。",
    "请把快递寄到{STREET_ADDRESS}，谢谢。",
    "我的银行卡号是{CN_BANK_CARD}，开户行是招商银行。",
    "邮箱：{EMAIL_ADDRESS}",
    "{PERSON}先生明天下午到公司。",
    "护照号码{PASSPORT}，有效期十年。",
    "出生日期：{DATE_OF_BIRTH}",
    "服务器IP是{IP_ADDRESS}，请不要对外公开。",
    "{PERSON}说这个方案可以。",
    "患者{PERSON}，身份证{CN_RESIDENT_ID}，住址{STREET_ADDRESS}。",
    "请联系{PERSON}，邮箱{EMAIL_ADDRESS}。",
    "会议定在下午三点，在三楼会议室，请准时参加。",
    "本次更新修复了12个问题，版本号为3.2.1。",
    "订单号20240101已经发货，预计3天送达。",
]


class PiiGenerator:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.en = Faker("en_US")
        self.zh = Faker("zh_CN")
        self.en.seed_instance(seed)
        self.zh.seed_instance(seed + 1)

    def _value(self, entity: str, lang: str) -> str:
        f = self.en if lang == "en" else self.zh
        r = self.rng
        if entity == "PERSON":
            return f.name()
        if entity == "EMAIL_ADDRESS":
            return f.email()
        if entity == "PHONE_NUMBER":
            return f.phone_number()
        if entity == "STREET_ADDRESS":
            if lang == "en":
                return f.street_address()
            return f.address().split(" ")[0]
        if entity == "CREDIT_CARD":
            return f.credit_card_number()
        if entity == "CN_BANK_CARD":
            return _luhn_complete(
                "62" + r.choice(["2202", "2848", "2700", "1700", "2588"]), r.choice([16, 19]), r
            )
        if entity == "US_SSN":
            return f.ssn()
        if entity == "CN_RESIDENT_ID":
            return f.ssn()
        if entity == "IBAN_CODE":
            return f.iban()
        if entity == "IP_ADDRESS":
            return f.ipv4() if r.random() < 0.6 else f.ipv6()
        if entity == "MAC_ADDRESS":
            return f.mac_address()
        if entity == "PASSPORT":
            return f.passport_number()
        if entity == "DATE_OF_BIRTH":
            d = f.date_of_birth()
            if lang == "zh":
                return r.choice([f"{d.year}年{d.month}月{d.day}日", d.isoformat()])
            return r.choice([d.isoformat(), d.strftime("%m/%d/%Y"), d.strftime("%B %d, %Y")])
        if entity == "URL_CREDENTIALS":
            secret = f.password(length=12, special_chars=False)
            return f"postgres://{f.user_name()}:{secret}@db.{f.domain_name()}:5432/app"
        raise KeyError(entity)

    def sample(self, lang: str) -> Sample:
        template = self.rng.choice(_EN if lang == "en" else _ZH)
        out, spans, pos = [], [], 0
        for piece in template.replace("}", "{").split("{"):
            if re.fullmatch(r"[A-Z_]+", piece):
                value = self._value(piece, lang)
                spans.append((pos, pos + len(value), piece))
                out.append(value)
                pos += len(value)
            else:
                out.append(piece)
                pos += len(piece)
        return Sample("".join(out), spans, lang)

    def samples(self, n: int, lang: str) -> list[Sample]:
        return [self.sample(lang) for _ in range(n)]


_SAME = {"CN_BANK_CARD": "CARD", "CREDIT_CARD": "CARD"}


def score(samples: list[Sample], predict: object) -> dict[str, float]:
    """Entity-level precision/recall/F2: a gold span counts as found when a prediction of the same
    type covers at least half of it; a direct-identifier prediction overlapping no gold span is a
    false positive. `predict(text) -> [(start, end, entity)]` (quasi-identifiers excluded)."""
    tp = fp = fn = 0
    for s in samples:
        pred = predict(s.text)  # type: ignore[operator]
        used = set()
        for gs, ge, gent in s.spans:
            hit = False
            for k, (ps, pe, pent) in enumerate(pred):
                overlap = min(ge, pe) - max(gs, ps)
                if overlap >= 0.5 * (ge - gs) and _SAME.get(pent, pent) == _SAME.get(gent, gent):
                    hit = True
                    used.add(k)
            tp += hit
            fn += not hit
        for k, (ps, pe, _) in enumerate(pred):
            if k not in used and not any(min(ge, pe) > max(gs, ps) for gs, ge, _ in s.spans):
                fp += 1
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f2 = 5 * p * r / (4 * p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f2": f2, "tp": tp, "fp": fp, "fn": fn}
