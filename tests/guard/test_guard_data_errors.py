"""A bad row in a guard data file is one DataError naming that file and line (review L2).

Before, `build_examples` reported any KeyError/TypeError against the data file it had read *last*: a
non-string T0 prompt, used only after every T0 file was read, was blamed on another file, and a bug
in the code after the reads was reported as "unexpected content" in a data file. Rows are now checked
where they are parsed; errors in the code stay what they are.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import steward.guard.dataset as dataset
from steward.guard.dataset import DataError, build_examples


def _data_with(tmp_path: Path, shared: Path, rel: str, content: bytes) -> Path:
    """A copy of the shared data (symlinks) in which only `rel` is replaced by `content`."""
    data = tmp_path / "data"
    src, dst = shared, data
    parts = Path(rel).parts
    dst.mkdir()
    for part in parts[:-1]:
        for entry in src.iterdir():
            if entry.name != part:
                (dst / entry.name).symlink_to(entry)
        src, dst = src / part, dst / part
        dst.mkdir()
    for entry in src.iterdir():
        if entry.name != parts[-1]:
            (dst / entry.name).symlink_to(entry)
    target = data / rel
    target.write_bytes(content)
    return target


@pytest.mark.parametrize(
    ("rel", "content", "match"),
    [
        (
            "corpus/t0_tasks/adversarial_qa_dbert_answer_the_following_q.jsonl",
            b'{"prompt": "fine"}\n{"prompt": 12345}\n',
            r"\.jsonl:2: field 'prompt' must be a string, got int",
        ),
        (
            "guard/harmful/donotanswer/malicious_uses.jsonl",
            b'{"prompt": "fine"}\n{"question": "x"}\n',
            r"\.jsonl:2: a row without the field 'prompt'",
        ),
        (
            "corpus/self_instruct_seed_tasks.jsonl",
            b'{"instruction": "a", "instances": [{"input": 5}]}\n',
            r"\.jsonl:1: the first instance's 'input' must be a string",
        ),
        (
            "guard/injection/bipia/email_train.jsonl",
            b'{"context": "c"}\n[1]\n',
            r"\.jsonl:2: expected an object",
        ),
        (
            "guard/injection/bipia/text_attack_train.json",
            b'{"fam": ["a", 1]}',
            r"\.json: .*'fam'.*list of strings",
        ),
        ("guard/jailbreak/inthewild_jailbreak_llms.json", b'["a", 3]', r"\.json: .*list of strings"),
        ("guard/harmful/advbench_harmful_behaviors.csv", b"target,goal\ny,x\nz\n", r"\.csv:3: .*'goal'"),
        (
            "guard/injection/cyberseceval_prompt_injection.json",
            b'[{"injection_variant": "v", "user_input": ["x"], "test_case_prompt": "p"}]',
            r"\.json: unexpected content in item 0: field 'user_input' must be a string",
        ),
    ],
    ids=[
        "t0-prompt",
        "dna-field",
        "self-instruct",
        "bipia-row",
        "bipia-attack",
        "jailbreak",
        "csv-row",
        "cse",
    ],
)
def test_a_bad_row_is_blamed_on_its_own_file_and_line(
    tmp_path: Path, shared_data: Path, rel: str, content: bytes, match: str
) -> None:
    target = _data_with(tmp_path, shared_data, rel, content)
    with pytest.raises(DataError, match=match) as exc:
        build_examples(target.parents[len(Path(rel).parts) - 1], long_docs=0, synth_per_template=0)
    assert str(exc.value).startswith(str(target)), str(exc.value)


def test_a_bug_after_the_reads_is_not_reported_as_bad_data(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: object) -> list[tuple[str, str]]:
        raise KeyError("a bug in the code, not in any data file")

    monkeypatch.setattr(dataset, "lookalikes", broken)
    with pytest.raises(KeyError, match="a bug in the code"):
        build_examples(shared_data, long_docs=0, synth_per_template=0)
