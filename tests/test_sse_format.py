"""One stream entry as an SSE event (gateway.app.sse): whatever the entry's data holds,
the event's data is one line of JSON, the entry's object with its attempt and seq."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.app import sse

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


def event_of(raw: str, attempt: int = 3, seq: int = 7) -> tuple[list[str], Any]:
    text = sse(("1700000000000-5", {"event": "token", "data": raw}), attempt, seq).decode()
    assert text.endswith("\n\n")
    lines = text[:-2].split("\n")
    return lines, json.loads(lines[2].removeprefix("data: "))


@given(JSON, st.sampled_from([None, 2]))
def test_any_json_data_becomes_one_line_holding_its_position(value, indent):
    raw = json.dumps(value, indent=indent, ensure_ascii=False)
    lines, data = event_of(raw)
    assert lines[:2] == ["id: 1700000000000-5", "event: token"] and len(lines) == 3
    expected = dict(value) if isinstance(value, dict) else {"value": value}
    assert data == expected | {"attempt": 3, "seq": 7}


def test_the_position_replaces_one_the_data_holds_already():
    for raw in ('{"text":"a","attempt":1,"seq":0}', '{"\\u0061ttempt":9,"text":"a"}',
                '{"seq":1}'):
        _, data = event_of(raw)
        assert data["attempt"] == 3 and data["seq"] == 7


def test_damaged_or_hostile_data_is_an_event_with_only_its_position():
    for raw in ("{", "{\"text\":\"a\n\"}", "not json", '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",
                "[" * 100_000 + "]" * 100_000, ""):
        lines, data = event_of(raw)
        assert len(lines) == 3 and data == {"attempt": 3, "seq": 7}


@given(st.text())
def test_an_event_name_never_adds_lines_to_the_event(name):
    """An entry's event name is written on the event's one `event:` line; a name with
    a line break (a damaged or hand-written entry) is sent as `message`, so it can
    neither end the event early nor add fields (a forged `id:` or `data:`)."""
    text = sse(("1700000000000-5", {"event": name, "data": "{}"}), 1, 2).decode()
    lines = re.split(r"\r\n|\r|\n", text.removesuffix("\n\n"))  # SSE's line ends alone
    assert len(lines) == 3 and lines[0] == "id: 1700000000000-5"
    assert lines[1] == ("event: message" if "\n" in name or "\r" in name
                        else f"event: {name}")
    assert json.loads(lines[2].removeprefix("data: ")) == {"attempt": 1, "seq": 2}
