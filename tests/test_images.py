"""Images in requests (contract v2, contract 2.1): checked before any vendor sees them,
estimated in the prompt budget, sent as content parts, kept in history by reference."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.adapters.llm.tokens import TokenCounter
from actors.aliases import Aliases, check_capabilities
from actors.job.prompt import IMAGE_REF, MISSING_IMAGE, build_messages, fill_images, stored_images
from config import load_config
from messages.images import URL_IMAGE_TOKENS, ImageProblem, check_image, image_size, image_tokens
from messages.mailboxes import ImageRef, Turn
from messages.wire import BadInput, decode_request
from tests.fakes import FlatPricing, WordCounting
from tests.helpers import events_of, message_rows, produce, request, worker_running
from tests.images import data_url, gif_header, jpeg_header, png, webp_vp8x

HOSTS = ("images.example.com",)
count = TokenCounter("openai/gpt-4o-mini").count


def check(url: str, *, max_bytes: int = 1 << 20) -> object:
    return check_image(url, max_bytes=max_bytes, url_hosts=HOSTS)


@pytest.mark.parametrize(("kind", "data", "size"), [
    ("png", png(300, 200), (300, 200)),
    ("jpeg", jpeg_header(1024, 768), (1024, 768)),
    ("gif", gif_header(64, 32), (64, 32)),
    ("webp", webp_vp8x(4000, 3000), (4000, 3000)),
])
def test_each_format_is_read_from_its_header(kind, data, size):
    image = check(data_url(kind, data))
    assert image_size(kind, data) == size
    assert image.media_type == f"image/{kind}" and image.data == data
    assert image.tokens == image_tokens(*size)


def test_the_estimate_is_the_larger_of_the_vendors_counts():
    # OpenAI (high detail): 1024 x 768 -> 768 on the short side -> 1024 x 768 -> 2 x 2
    # tiles -> 85 + 4 x 170 = 765; Anthropic: 1024 x 768 / 750 = 1049. The larger wins.
    assert image_tokens(1024, 768) == 1049
    # Small: OpenAI 85 + 170 = 255 beats Anthropic's 64 x 64 / 750 = 6.
    assert image_tokens(64, 64) == 255
    # Huge: both scale it down; Anthropic to 1568 x 1176 = 2459 tokens.
    assert image_tokens(8000, 6000) == 2459
    assert image_tokens(8000, 6000) > URL_IMAGE_TOKENS > image_tokens(512, 512)


@pytest.mark.parametrize(("url", "rule"), [
    (data_url("png", b"GIF89a" + b"\x00" * 20), "not a PNG image"),
    (data_url("jpeg", png(2, 2)), "not a JPEG image"),
    (data_url("png", png(2, 2)[:20]), "not a PNG image"),  # cut inside the header
    (data_url("jpeg", b"\xff\xd8\xff\xe0\x00\x01"), "not a JPEG image"),  # a length < 2
    (data_url("gif", gif_header(0, 10)), "each side must be 1 to 100000"),
    (data_url("webp", b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 20), "not a WEBP image"),
    ("data:image/svg+xml;base64,PHN2Zz4=", "data:image/(png|jpeg|webp|gif);base64,"),
    ("data:image/png,rawbytes", "data:image/(png|jpeg|webp|gif);base64,"),
    ("data:image/png;base64,iVBORw0KGgo=\n", "not valid base64"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("file:///etc/passwd", "an https:// URL"),
    ("http://images.example.com/a.png", "an https:// URL"),
    ("https://evil.example.org/a.png", "'evil.example.org' is not in limits.image_url_hosts"),
    ("https://images.example.com.evil.org/a.png", "is not in limits.image_url_hosts"),
    ("https://user:pw@images.example.com/a.png", "user name or password"),
    ("https://images.example.com:8443/a.png", "port 8443"),
    ("https://images.example.com:99999/a.png", "cannot be parsed"),
    ("https://images.example.com/a b.png", "whitespace or control"),
    ("https://[::1]/a.png", "'::1' is not in limits.image_url_hosts"),
    ("https:///a.png", "names no host"),
    ("https://images.example.com/" + "a" * 3000, "longer than 2048"),
])
def test_a_bad_image_names_the_rule(url, rule):
    with pytest.raises(ImageProblem) as info:
        check(url)
    assert rule in str(info.value)


def test_an_oversize_image_is_refused_before_it_is_decoded():
    big = data_url("png", png(400, 400, shade=7) + b"\x00" * 5000)
    with pytest.raises(ImageProblem, match="limits.max_attachment_bytes is 1000"):
        check(big, max_bytes=1000)


def test_an_allowed_host_passes_with_the_worst_case_estimate():
    image = check("https://Images.Example.COM./cat.png?size=large")
    assert (image.data, image.sha256, image.tokens) == (b"", "", URL_IMAGE_TOKENS)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["png", "jpeg", "gif", "webp"]), data=st.binary(max_size=300),
       prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff",
                               b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8L", b"RIFF\x00\x00\x00\x00WEBPVP8X"]))
def test_no_bytes_break_the_header_reader(kind, data, prefix):
    """Whatever follows a plausible start, the answer is a size or an ImageProblem."""
    try:
        width, height = image_size(kind, prefix + data)
    except ImageProblem:
        return
    assert 0 < width <= 100_000 and 0 < height <= 100_000


def test_a_jpeg_with_many_segments_is_read_in_linear_time():
    """Segments are skipped by their lengths: a megabyte of APPn segments is one pass."""
    segment = b"\xff\xe1\x00\x10" + b"x" * 14
    data = b"\xff\xd8" + segment * 50_000 + jpeg_header(10, 20)[2:]
    assert image_size("jpeg", data) == (10, 20)


def _decode(body: dict, hosts: tuple[str, ...] = ()) -> object:
    config = load_config()
    return decode_request(json.dumps(body).encode(), max_message_chars=100,
                          model_aliases=frozenset(config.llm.models), image_url_hosts=hosts)


def test_an_alias_without_vision_refuses_images_naming_the_fix():
    picture = [{"type": "image", "url": data_url("png", png(8, 8))}]
    req = _decode(request("What is this?", v=2, attachments=picture))
    config = load_config()
    with pytest.raises(BadInput) as info:
        check_capabilities(req, Aliases.resolve(config, FlatPricing(),
                                                WordCounting()).chain(req.model))
    assert info.value.field == "$.attachments" and "takes no images" in info.value.rule
    assert "llm.models.local.vision = true" in info.value.rule
    seeing = load_config(environ={"CHAT_ACTORS__LLM__MODELS__LOCAL__VISION": "true"})
    check_capabilities(req, Aliases.resolve(seeing, FlatPricing(),
                                            WordCounting()).chain(req.model))


def test_the_request_size_bounds_the_whole_message():
    """Images within their own limit still count against limits.max_request_bytes."""
    pictures = [{"type": "image", "url": data_url("png", png(200, 200, shade=n) + bytes(300_000))}
                for n in range(4)]
    raw = json.dumps(request("Compare these", v=2, attachments=pictures)).encode()
    with pytest.raises(BadInput, match="the limit is 1048576"):
        decode_request(raw, max_message_chars=100, model_aliases=frozenset({"local"}),
                       max_attachment_bytes=400_000)


def test_images_count_in_the_prompt_and_history_images_come_by_reference():
    old = ImageRef(tokens=700, sha256="a" * 64, media_type="image/png")
    gone = ImageRef(tokens=300, sha256="b" * 64, media_type="image/png")
    linked = ImageRef(tokens=URL_IMAGE_TOKENS, url="https://images.example.com/x.png")
    new = ImageRef(tokens=255, sha256="c" * 64, media_type="image/gif")
    history = [Turn(role="user", content="and this?", images=[old, gone, linked]),
               Turn(role="assistant", content="A cat, a dog and a map.")]
    messages, used = build_messages(system_prompt="", history=history, user_message="again?",
                                    context_window=8000, answer_tokens=100, count=count,
                                    user_images=[new])
    texts = count("and this?") + count("A cat, a dog and a map.") + count("again?")
    assert used == texts + 700 + 300 + URL_IMAGE_TOKENS + 255 + 3 * 4 + 3
    assert stored_images(messages) == {"a" * 64, "b" * 64, "c" * 64}
    fill_images(messages, {"a" * 64: "data:image/png;base64,AAAA",
                           "c" * 64: "data:image/gif;base64,BBBB"})
    assert messages[0]["content"] == [
        {"type": "text", "text": "and this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": MISSING_IMAGE},
        {"type": "image_url", "image_url": {"url": "https://images.example.com/x.png"}}]
    assert messages[-1]["content"][1] == {"type": "image_url",
                                          "image_url": {"url": "data:image/gif;base64,BBBB"}}
    assert not any(IMAGE_REF in json.dumps(m) for m in messages)
    # A model without vision gets the history's text alone, and pays nothing for images.
    blind, blind_used = build_messages(system_prompt="", history=history, user_message="again?",
                                       context_window=8000, answer_tokens=100, count=count,
                                       vision=False)
    assert blind[0] == {"role": "user", "content": "and this?"}
    assert blind_used == texts + 3 * 4 + 3


def test_an_image_too_big_for_the_window_drops_its_turn_not_the_question():
    history = [Turn(role="user", content="look", images=[ImageRef(tokens=5000, sha256="d" * 64)]),
               Turn(role="assistant", content="I see.")]
    messages, used = build_messages(system_prompt="", history=history, user_message="and now?",
                                    context_window=2000, answer_tokens=100, count=count)
    assert messages == [{"role": "user", "content": "and now?"}]
    assert used < 1900


VISION = {"CHAT_ACTORS__LLM__MODELS__SCRIPTED__VISION": "true",
          "CHAT_ACTORS__LIMITS__IMAGE_URL_HOSTS": '["images.example.com"]'}


def _user_parts(call: Any) -> list[dict[str, Any]]:
    return [part for m in call.messages if m["role"] == "user" and isinstance(m["content"], list)
            for part in m["content"]]


async def test_images_reach_the_vendor_as_parts_and_history_keeps_each_once(
        make_config, llm, rds, db):
    """Turn 1 attaches a PNG and an allowed URL; turn 2 the same PNG again; turn 3 none.
    The vendor gets them as content parts, turn 3 with the history's images read back;
    the history rows hold references, the bytes are stored once."""
    config, _ = make_config(environ=VISION)
    user = f"img-{uuid.uuid4().hex[:8]}"
    picture = png(64, 48, shade=200)
    url = data_url("png", picture)
    linked = "https://images.example.com/cat.jpg"
    turns = [request("What is in these?", v=2, userId=user, sessionId="s-img",
                     attachments=[{"type": "image", "url": url}, {"type": "image", "url": linked}]),
             request("And this one?", v=2, userId=user, sessionId="s-img",
                     attachments=[{"type": "image", "url": url}]),
             request("Which was brighter?", userId=user, sessionId="s-img")]
    async with worker_running(config):
        for turn in turns:
            produce(config, turn)
            events = await events_of(rds, config, turn["jobId"])
            assert events[-1]["data"]["status"] == "completed", events
    assert _user_parts(llm.calls[0]) == [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": linked}}]
    assert [p["image_url"]["url"] for p in _user_parts(llm.calls[2]) if p["type"] == "image_url"] \
        == [url, linked, url]
    assert llm.calls[2].messages[-1] == {"role": "user", "content": "Which was brighter?"}
    sha = hashlib.sha256(picture).hexdigest()
    row = message_rows(db, turns[0]["jobId"])[0]
    assert (row["role"], row["content"]) == ("user", "What is in these?")
    assert row["attachments"] == [
        {"tokens": image_tokens(64, 48), "sha256": sha, "mediaType": "image/png"},
        {"tokens": URL_IMAGE_TOKENS, "url": linked}]
    assert "base64" not in json.dumps([message_rows(db, t["jobId"]) for t in turns], default=str)
    stored = db.execute("SELECT sha256, media_type, data FROM llm_attachments WHERE user_id = %s",
                        (user,)).fetchall()
    assert [(s, m, bytes(d)) for s, m, d in stored] == [(sha, "image/png", picture)]


async def test_an_image_goes_to_anthropic_as_a_base64_block(make_config, llm, rds, monkeypatch):
    monkeypatch.setenv("SCRIPTED_ANTHROPIC_KEY", "sk-ant-scripted")
    alias = "CHAT_ACTORS__LLM__MODELS__CLAUDE__"
    config, _ = make_config(environ={
        f"{alias}MODEL": "anthropic/claude-sonnet-4-5", f"{alias}API_BASE": llm.url,
        f"{alias}API_KEY_ENV": "SCRIPTED_ANTHROPIC_KEY", f"{alias}MAX_TOKENS": "256"})
    picture = png(10, 10, shade=3)
    job = request("Describe it.", v=2, model="claude",
                  attachments=[{"type": "image", "url": data_url("png", picture)}])
    async with worker_running(config):
        produce(config, job)
        events = await events_of(rds, config, job["jobId"])
    assert events[-1]["data"]["status"] == "completed"
    (sent,) = [m for m in llm.calls[0].body["messages"] if m["role"] == "user"]
    blocks = {block["type"]: block for block in sent["content"]}
    assert blocks["text"]["text"] == "Describe it."
    assert blocks["image"]["source"] == {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(picture).decode()}


async def test_a_bad_image_is_rejected_naming_the_rule_with_no_model_call(
        make_config, llm, rds):
    config, _ = make_config(environ=VISION)
    bad = [request("Look", v=2, attachments=[{"type": "image", "url": u}]) for u in (
        data_url("png", b"<svg onload=alert(1)>"), "https://metadata.google.internal/x.png")]
    blind = request("Look", v=2, model="local",
                    attachments=[{"type": "image", "url": data_url("png", png(4, 4))}])
    async with worker_running(config):
        produce(config, *bad, blind)
        answers = [await events_of(rds, config, job["jobId"]) for job in (*bad, blind)]
    rules = [events[-2]["data"]["message"] for events in answers]
    assert [events[-1]["data"]["status"] for events in answers] == ["rejected"] * 3
    assert "$.attachments[0].url" in rules[0] and "not a PNG image" in rules[0]
    assert "'metadata.google.internal' is not in limits.image_url_hosts" in rules[1]
    assert "takes no images" in rules[2]
    assert llm.calls == []
