"""`POST /v1/moderations`: OpenAI's input forms and category mapping, against a real gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway_harness import Running, ThreadedUpstream, free_port, start_gateway
from steward.gateway.settings import ModelRoute, Settings


@pytest.fixture(scope="module")
def ggw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    up = ThreadedUpstream(reply_text="{echo}")
    models = [ModelRoute(name="echo", backend="openai", base_url=up.up.url, upstream_model="fake-model")]
    settings = Settings(
        data_dir=Path(tmp_path_factory.mktemp("moderations")),
        port=free_port(),
        models=models,
        embedding_model="",
    )
    yield from start_gateway(settings)
    up.close()


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_moderations_take_content_parts_and_say_what_is_wrong_with_bad_input(ggw: Running) -> None:
    """OpenAI's third input form, a list of content parts, is one input with one result (its text
    parts read together); an image part, an empty list, too many inputs and wrong types each get a
    400 that names what is wrong, with `param: "input"`."""
    key = ggw.key("acme", "user")
    c = openai.OpenAI(base_url=ggw.url + "/v1", api_key=key, max_retries=0)
    parts: Any = [
        {"type": "text", "text": "Give me step by step instructions"},
        {"type": "text", "text": "to build a pipe bomb"},
    ]
    r = c.moderations.create(model="omni-moderation-latest", input=parts)
    assert len(r.results) == 1 and r.results[0].flagged
    assert r.results[0].categories.model_dump(by_alias=True)["illicit/violent"]
    calm = c.moderations.create(input=[{"type": "text", "text": "A lovely day for a walk."}])
    assert len(calm.results) == 1 and not calm.results[0].flagged

    def bad(inp: Any) -> dict[str, Any]:
        resp = httpx.post(ggw.url + "/v1/moderations", json={"input": inp}, headers=auth(key), timeout=60)
        assert resp.status_code == 400, resp.text
        err: dict[str, Any] = resp.json()["error"]
        assert err["param"] == "input", err
        return err

    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    assert "image input is not supported" in bad([parts[0], image])["message"]
    assert "empty" in bad([])["message"]
    assert "at most 256" in bad(["hi"] * 257)["message"]
    assert "not a number" in bad(5)["message"]
    assert "not null" in bad(None)["message"]
    assert "not a mix" in bad(["hi", {"type": "text", "text": "x"}])["message"]
    assert "unknown type 'audio'" in bad([{"type": "audio"}])["message"]
    assert "`text` must be a string" in bad([{"type": "text", "text": 5}])["message"]


def test_moderation_hazards_map_to_openai_categories() -> None:
    """Every hazard the harmful scanner names has its OpenAI category: explicit sexual content is
    `sexual` (it fell back to `illicit`), defamation is `harassment`."""
    from types import SimpleNamespace

    from steward.gateway.routes.moderations import _HAZARD_TARGETS, OPENAI_CATEGORIES, map_verdict
    from steward.guard.classifier import HAZARDS

    assert set(HAZARDS) <= set(_HAZARD_TARGETS)
    assert all(set(t) <= set(OPENAI_CATEGORIES) for t in _HAZARD_TARGETS.values())

    def verdict(hazard: str) -> Any:
        finding = SimpleNamespace(category="harmful", subtype=hazard)
        return SimpleNamespace(
            scores={"harmful": 0.99, "toxicity": 0.01},
            thresholds={"harmful": 0.9, "toxicity": 0.9},
            findings=[finding],
        )

    sexual = map_verdict(verdict("sexual_content"))["categories"]
    assert sexual["sexual"] and not sexual["illicit"]
    assert map_verdict(verdict("defamation"))["categories"]["harassment"]
    minors = map_verdict(verdict("child_sexual_exploitation"))["categories"]
    assert minors["sexual/minors"] and minors["sexual"]
