"""Data preparation: PII scrubbing, exact and near-duplicate removal, the split, the data card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steward.model.data import (
    DataError,
    Document,
    RegexPIIScrubber,
    deduplicate,
    load_corpus,
    prepare,
    split_documents,
    write_data_card,
)


def test_regex_scrubber_finds_and_replaces() -> None:
    text = (
        "Mail jane.doe@example.com or call (415) 555-0132; card 4111 1111 1111 1111, "
        "SSN 123-45-6789, host 192.168.1.20, db postgres://admin:hunter2@db.internal/prod"
    )
    clean, found = RegexPIIScrubber().scrub(text)
    entities = sorted(r.entity for r in found)
    assert entities == sorted(
        ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IP_ADDRESS", "URL_CREDENTIALS"]
    )
    for secret in ("jane.doe", "555-0132", "4111", "123-45-6789", "192.168", "hunter2"):
        assert secret not in clean
    assert "<EMAIL_ADDRESS>" in clean


def test_scrubber_leaves_ordinary_numbers() -> None:
    text = "In 2004 the firm sold 1234567890123 units (order 4111 1111 1111 1112) at 3.5%."
    clean, found = RegexPIIScrubber().scrub(text)
    assert found == [] and clean == text  # the 16-digit number fails the Luhn check


def test_exact_and_near_duplicates_are_removed() -> None:
    base = " ".join(f"word{i}" for i in range(200))
    near = base.replace("word100", "changed")  # one word of 200 differs: Jaccard well above 0.8
    other = " ".join(f"other{i}" for i in range(200))
    docs = [
        Document("a", "", base),
        Document("b", "", base.upper()),  # exact after case folding
        Document("c", "", near),
        Document("d", "", other),
    ]
    kept, report = deduplicate(docs)
    assert [d.source for d in kept] == ["a", "d"]
    assert report.exact_removed == 1 and report.near_removed == 1


def test_dissimilar_documents_survive() -> None:
    docs = [Document("s", "", " ".join(f"w{i}_{j}" for j in range(60))) for i in range(50)]
    kept, report = deduplicate(docs)
    assert len(kept) == 50 and report.near_removed == 0


def test_split_is_deterministic_and_order_free() -> None:
    docs = [Document("s", f"q{i}", f"a{i}") for i in range(400)]
    tr1, ho1 = split_documents(docs, 0.2, seed=1)
    _, ho2 = split_documents(list(reversed(docs)), 0.2, seed=1)
    assert {d.prompt for d in ho1} == {d.prompt for d in ho2}
    assert 40 < len(ho1) < 120
    assert not {d.prompt for d in tr1} & {d.prompt for d in ho1}
    _, ho3 = split_documents(docs, 0.2, seed=2)
    assert {d.prompt for d in ho3} != {d.prompt for d in ho1}


def test_load_real_corpus(shared_data: Path) -> None:
    docs = load_corpus(shared_data / "corpus")
    sources = {d.source.split("/")[0] for d in docs}
    assert sources == {"t0", "self_instruct", "text"}
    assert sum(d.source.startswith("t0/") for d in docs) == 12932
    assert not any(d.completion.endswith("<|endoftext|>") for d in docs)


def test_prepare_and_data_card(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "t0_tasks").mkdir(parents=True)
    rows = [
        {
            "prompt": f"Review {i}: the product {'works' if i % 2 else 'broke'} after {i} days. "
            "Is this review positive?",
            "completion": ("Yes" if i % 2 else "No") + "<|endoftext|>",
        }
        for i in range(60)
    ]
    rows.append(dict(rows[0]))  # an exact duplicate
    rows.append({"prompt": "Contact me at bob@example.org please", "completion": "Sure"})
    (corpus / "t0_tasks" / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (corpus / "plain.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    prepared = prepare(corpus, heldout_fraction=0.25, seed=3)
    card = prepared.card
    assert card["dedup"]["exact_removed"] == 1
    assert card["pii_redactions"] == {"EMAIL_ADDRESS": 1}
    assert card["train_documents"] + card["heldout_documents"] == card["documents_after_dedup"]
    assert all("bob@example.org" not in d.prompt for d in prepared.train + prepared.heldout)
    write_data_card(card, tmp_path / "run", {"train_tokens": 1})
    text = (tmp_path / "run" / "DATA_CARD.md").read_text()
    for section in (
        "Motivation",
        "Composition",
        "Collection process",
        "Preprocessing",
        "Uses",
        "Distribution",
        "Maintenance",
    ):
        assert f"## {section}" in text
    assert json.loads((tmp_path / "run" / "data_card.json").read_text())["train_tokens"] == 1


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (b'{"instruction": "Say hi", "instances": ["hi"]}', r"x\.jsonl:2: each of 'instances'"),
        (b'{"instruction": "Count", "instances": [{"input": "", "output": 3}]}', r"x\.jsonl:2: .*'output'"),
        (
            b'{"instruction": "Count", "instances": {"output": "3"}}',
            r"x\.jsonl:2: 'instances' must be a list",
        ),
        (b'{"instruction": "x", "instances": [{"output": "\xff"}]}', r"x\.jsonl:2: not UTF-8"),
        (b'{"instruction": "x", "instances": [{"output": "a\tb"}]}', r"x\.jsonl:2: invalid JSON"),
    ],
    ids=["instance-str", "output-int", "instances-object", "not-utf8", "bad-json"],
)
def test_bad_corpus_rows_name_file_and_line(tmp_path: Path, row: bytes, match: str) -> None:
    """Rows of the wrong type or encoding are one DataError naming the file and line, no traceback."""
    good = b'{"instruction": "Greet", "instances": [{"input": "", "output": "Hello"}]}'
    (tmp_path / "self_instruct_x.jsonl").write_bytes(good + b"\n" + row + b"\n")
    with pytest.raises(DataError, match=match):
        load_corpus(tmp_path)
