"""The stream reassembler: every kind of input counted, nothing raised."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from vmha_protocol import FrameDecoder, encode_frame
from vmha_protocol.limits import MAX_FRAME_BYTES

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def test_one_frame_in_one_read() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b'\n{"a":1}\n') == [{"a": 1}]
    assert decoder.stats.frames == 1
    assert decoder.stats.empty_lines == 1  # the leading delimiter


def test_fragments_are_reassembled() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b'\n{"a"') == []
    assert decoder.feed(b":1,") == []
    assert decoder.feed(b'"b":2}\n') == [{"a": 1, "b": 2}]


def test_several_messages_in_one_read() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b'{"a":1}\n\n{"b":2}\n{"c":3}\n') == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert decoder.stats.frames == 3
    assert decoder.stats.empty_lines == 1


def test_garbage_resynchronises_at_next_newline() -> None:
    decoder = FrameDecoder()
    out = decoder.feed(b'xx{"a":1}\n{"b":\n[1,2]\n"str"\n{"ok":true}\n')
    assert out == [{"ok": True}]
    assert decoder.stats.garbage == 4  # prefix junk, truncated, array, string


def test_invalid_utf8_and_nan_are_garbage() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b'{"a":"\xff"}\n{"a":NaN}\n{"a":Infinity}\n') == []
    assert decoder.stats.garbage == 3


def test_deep_nesting_is_garbage_not_a_crash() -> None:
    decoder = FrameDecoder()
    deep = b"[" * 4000 + b"]" * 4000
    assert decoder.feed(b'{"a":' + deep + b"}\n") == []
    assert decoder.stats.garbage == 1


def test_oversize_frame_dropped_and_counted_once() -> None:
    decoder = FrameDecoder()
    big = b'{"a":"' + b"x" * (MAX_FRAME_BYTES + 10) + b'"}'
    # Arrives in pieces, as from a serial port.
    out = feed_all(decoder, [big[:1000], big[1000:5000], big[5000:], b'\n{"next":1}\n'])
    assert out == [{"next": 1}]
    assert decoder.stats.oversize == 1


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder()
    body = b'{"a":"' + b"x" * (MAX_FRAME_BYTES - 8) + b'"}'
    assert len(body) == MAX_FRAME_BYTES
    assert decoder.feed(body[:100]) == []
    assert decoder.feed(body[100:] + b"\n") == [{"a": "x" * (MAX_FRAME_BYTES - 8)}]
    assert decoder.feed(b"{" + body + b"}\n") == []
    assert decoder.stats.oversize == 1


def test_encode_frame_never_contains_a_raw_newline() -> None:
    frame = encode_frame({"text": "line1\nline2\r\u2028", "n": 1})
    assert frame.startswith(b"\n") and frame.endswith(b"\n")
    assert frame.count(b"\n") == 2
    assert json.loads(frame) == {"text": "line1\nline2\r\u2028", "n": 1}


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame_bytes=256)
    for obj in feed_all(decoder, chunks):
        assert isinstance(obj, dict)
    stats = decoder.stats
    assert stats.bytes == sum(map(len, chunks))


@settings(max_examples=200)
@given(st.lists(json_objects, min_size=1, max_size=8), st.lists(st.integers(0, 10_000)))
def test_any_split_of_a_valid_stream_yields_the_same_objects(
    objects: list[dict[str, object]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(obj) for obj in objects)
    decoder = FrameDecoder()
    assert feed_all(decoder, split_at(stream, cuts)) == objects
    assert decoder.stats.garbage == 0 and decoder.stats.oversize == 0


@given(
    st.lists(json_objects, min_size=1, max_size=5),
    st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), max_size=5),
)
def test_valid_frames_survive_garbage_lines_between_them(
    objects: list[dict[str, object]], junk: list[bytes]
) -> None:
    stream = b""
    for i, obj in enumerate(objects):
        stream += (junk[i] if i < len(junk) else b"") + b"\n" + encode_frame(obj)
    out = FrameDecoder().feed(stream)
    for obj in objects:
        assert obj in out
