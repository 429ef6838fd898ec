"""Training: seeded reproducibility, exact resume, torchrun DDP on gloo, exported model, errors."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from steward.model.io import load_model
from steward.model.train import TrainConfig, TrainConfigError, lr_at, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "t0_tasks").mkdir()
    rows = []
    for i in range(120):
        good = i % 3 != 0
        rows.append(
            {
                "prompt": f"Review number {i}: this blender {'is great' if good else 'broke'} "
                f"and the {['jar', 'motor', 'lid', 'blade'][i % 4]} {i * 7 % 13}. Positive?",
                "completion": ("Yes" if good else "No") + "<|endoftext|>",
            }
        )
    (root / "t0_tasks" / "toy_review_positive.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    verse = "\n\n".join(
        f"Line {i} of the play, where the king speaks of {w} and the sea."
        for i, w in enumerate(["crowns", "storms", "ships", "bread", "gold"] * 30)
    )
    (root / "play.txt").write_text(verse)
    return root


def make_cfg(corpus: Path, out: Path, **optim: object) -> TrainConfig:
    o = {"max_steps": 12, "warmup_steps": 3, "batch_size": 4, "lr": 3e-3}
    o.update(optim)
    return TrainConfig.model_validate(
        {
            "name": "toy",
            "out_dir": str(out),
            "seed": 5,
            "precision": "fp32",
            "threads": 1,
            "model": {"max_positions": 32, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64},
            "data": {"corpus_dir": str(corpus), "vocab_size": 320, "heldout_fraction": 0.2},
            "optim": o,
            "eval_every": 6,
            "eval_windows": 8,
            "ckpt_every": 4,
            "log_every": 1,
        }
    )


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_schedule_warms_up_then_decays() -> None:
    o = make_cfg(Path("/nonexistent"), Path("/tmp/x")).optim
    lrs = [lr_at(s, o) for s in range(o.max_steps)]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(o.lr)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert lrs[-1] >= o.min_lr


def test_seeded_runs_are_identical_and_resume_is_exact(corpus: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(make_cfg(corpus, a), progress=False)
    run(make_cfg(corpus, b), progress=False)
    assert losses(a) == losses(b)  # seeded: bit-identical
    # stop at step 5 (a checkpoint is written at the stop), then resume
    run(make_cfg(corpus, c), stop_after=5, progress=False)
    assert [s for s, _ in losses(c)][-1] == 5
    run(make_cfg(corpus, c), resume=True, progress=False)
    assert losses(c) == losses(a)  # the resumed curve equals the uninterrupted one
    wa = load_file(str(a / "model" / "model.safetensors"))
    wc = load_file(str(c / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    first, last = losses(a)[0][1], losses(a)[-1][1]
    assert last < first


def test_exported_model_card_manifest_and_reload(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run(make_cfg(corpus, out), progress=False)
    assert result["heldout_perplexity"] > 1
    cls = result["t0_classification"]
    assert cls["families"]["toy_review_positive"]["n"] > 0
    export = out / "model"
    manifest = json.loads((export / "manifest.json").read_text())
    assert set(manifest["files"]) >= {
        "model.safetensors",
        "tokenizer.json",
        "steward_config.json",
        "MODEL_CARD.md",
        "DATA_CARD.md",
    }
    assert manifest["metrics"]["heldout_perplexity"] == pytest.approx(result["heldout_perplexity"])
    assert "t0_tasks/toy_review_positive.jsonl" in manifest["data_sha256"]
    assert manifest["dtype"] == "bfloat16"
    model, tok = load_model(export)
    assert tok is not None and model.config.vocab_size == tok.vocab_size
    card = (export / "MODEL_CARD.md").read_text()
    assert "perplexity" in card and "majority baseline" in card


@pytest.mark.ddp
def test_torchrun_two_processes_match_gradient_accumulation(corpus: Path, tmp_path: Path) -> None:
    """world=2 × accum=1 sees the windows of world=1 × accum=2; averaged grads must agree."""
    single = tmp_path / "single"
    run(make_cfg(corpus, single, grad_accum=2, max_steps=6), progress=False)
    ddp_out = tmp_path / "ddp"
    cfg = make_cfg(corpus, ddp_out, grad_accum=1, max_steps=6)
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "steward.cli",
            "train",
            str(cfg_path),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,  # so a hang can be killed with its worker processes
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 300 s")
    assert proc.returncode == 0, stderr[-3000:]
    ws = load_file(str(single / "model" / "model.safetensors"))
    wd = load_file(str(ddp_out / "model" / "model.safetensors"))
    for k in ws:  # exported as bf16: equal up to bf16 rounding of nearly identical fp32 values
        assert torch.allclose(ws[k].float(), wd[k].float(), atol=1e-2, rtol=1e-2), k
    ls, ld = losses(single), losses(ddp_out)
    assert [s for s, _ in ls] == [s for s, _ in ld]
    for (_, x), (_, y) in zip(ls, ld, strict=True):
        assert x == pytest.approx(y, rel=1e-4)


def test_bad_configs_are_named(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data: {corpus_dir: x}\noptim: {lr: -1}\n")
    with pytest.raises(TrainConfigError, match=r"optim\.lr"):
        TrainConfig.from_yaml(p)
    p.write_text("data: {corpus_dir: x}\nbogus: 1\n")
    with pytest.raises(TrainConfigError, match="bogus"):
        TrainConfig.from_yaml(p)
    p.write_text("data: [unclosed\n")
    with pytest.raises(TrainConfigError, match="invalid YAML"):
        TrainConfig.from_yaml(p)
    with pytest.raises(TrainConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_resume_without_checkpoint_fails_clearly(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="no checkpoint"):
        run(make_cfg(corpus, tmp_path / "fresh"), resume=True, progress=False)


def test_answer_flags_mark_exactly_the_completion(corpus: Path, tmp_path: Path) -> None:
    from steward.model.data import Document
    from steward.model.tokenizer import train_bpe
    from steward.model.train import batch_at, encode_documents

    tok = train_bpe(["Is this good? Yes it is. The end, no more."] * 20, 300, min_frequency=1)
    docs = [Document("t0/x", "Is this good?", "Yes it is."), Document("text/y", "", "The end.")]
    stream, flags = encode_documents(docs, tok)
    assert stream.shape == flags.shape
    answer = [int(t) for t, f in zip(stream, flags, strict=True) if f]
    assert tok.decode(answer, skip_special_tokens=False) == "Yes it is.<|endoftext|>"
    x, _, w = batch_at(stream, 0, 0, 2, 4, 1, flags, 3.0)
    assert w is not None and set(w.unique().tolist()) <= {1.0, 3.0}
    assert batch_at(stream, 0, 0, 2, 4, 1, flags, 1.0)[2] is None  # uniform: no weights at all
    assert torch.equal(x, batch_at(stream, 0, 0, 2, 4, 1)[0])


def test_answer_weighting_trains(corpus: Path, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, tmp_path / "w")
    cfg.answer_loss_weight = 4.0
    result = run(cfg, progress=False)
    assert result["heldout_perplexity"] > 1
    assert (tmp_path / "w" / "data" / "train_answer_flags.npy").is_file()


def test_fresh_run_refuses_a_used_out_dir(corpus: Path, tmp_path: Path) -> None:
    """Without --resume a directory holding another run's checkpoints is refused, not mixed into."""
    out = tmp_path / "used"
    run(make_cfg(corpus, out), stop_after=5, progress=False)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(TrainConfigError, match=r"already holds a training run.*--resume"):
        run(make_cfg(corpus, out, lr=1e-3), stop_after=1, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing deleted
    assert json.loads((out / "train_config.json").read_text())["optim"]["lr"] == 3e-3


def test_changed_data_config_prepares_the_data_again(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(make_cfg(corpus, out), stop_after=0, progress=False)
    vocab = json.loads((out / "data" / "tokenizer.json").read_text())["model"]["vocab"]
    for p in (out / "checkpoints").glob("step_*"):  # the user cleared the checkpoints, kept data/
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    cfg = make_cfg(corpus, out)
    cfg.data.vocab_size = 400
    run(cfg, stop_after=0, progress=False)
    vocab2 = json.loads((out / "data" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) <= 320 < len(vocab2) <= 400


def test_resume_refuses_a_changed_config(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    run(make_cfg(corpus, out), stop_after=3, progress=False)
    cfg = make_cfg(corpus, out, batch_size=8, lr=0.5)
    cfg.seed = 99
    with pytest.raises(
        TrainConfigError, match=r"optim\.batch_size 4 -> 8, optim\.lr 0\.003 -> 0\.5, seed 5 -> 99"
    ):
        run(cfg, resume=True, progress=False)
    assert json.loads((out / "train_config.json").read_text())["seed"] == 5  # not overwritten
    # what only decides how long the run goes on, or where it reports, may change
    more = make_cfg(corpus, out, max_steps=6)
    more.threads, more.log_every = 2, 3
    assert run(more, resume=True, progress=False)["last_step"] == 5


def test_corrupt_checkpoint_is_one_line_naming_the_file(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from steward.cli import main

    out = tmp_path / "c"
    cfg = make_cfg(corpus, out)
    run(cfg, stop_after=3, progress=False)
    weights = out / "checkpoints" / "step_0000003" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", str(cfg_path), "--quiet", "--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("steward: error: "), err
    assert str(weights) in err[0] and "corrupt" in err[0]
    weights.write_bytes(good)
    (weights.parent / "trainer_state.json").write_text('{"param_groups": []}')  # no "step"
    with pytest.raises(TrainConfigError, match=r"step_0000003/trainer_state\.json: corrupt"):
        run(cfg, resume=True, progress=False)
