"""Topics, control messages and the chunk format: typed errors only, bounded memory."""

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahfp.errors import InvalidUpdate
from cahfp.messages import Metrics, TaskMessage, UpdateMessage
from cahfp.models import build_model
from cahfp.mqtt.protocol import (
    Ack,
    Hello,
    Presence,
    ProtocolError,
    Reassembler,
    Status,
    Topics,
    decode_chunk,
    parse_json,
    split_payload,
)
from cahfp.wire import decode_state, decode_update

MESSAGES = [TaskMessage, UpdateMessage, Hello, Presence, Ack, Status]
LAYOUT = build_model("vgg11", 10, 1, 0.125, seed=0).state_dict()


def test_topics_round_trip_and_reject_foreign_ones():
    t = Topics("fed-1")
    assert t.parse(t.update("pi-01")) == ("update", "pi-01", False)
    assert t.parse(t.update_data("pi-01")) == ("update", "pi-01", True)
    assert t.parse(t.status) == ("status", None, False)
    for bad in ("cahfp/other/update/x", "elsewhere/fed-1/x", "cahfp/fed-1/update/a/b/c"):
        with pytest.raises(ProtocolError):
            t.parse(bad)
    with pytest.raises(ProtocolError, match="federation id"):
        Topics("bad/id")


def test_chunks_reassemble_in_any_order_with_duplicates():
    data = bytes(range(256)) * 1000
    transfer, chunks = split_payload(data, 10_000)
    assert len(chunks) == 26
    r = Reassembler()
    results = [r.add(c) for c in [*reversed(chunks), chunks[3], chunks[0]]]
    done = [x for x in results if x is not None]
    assert done == [(transfer, data)]
    assert r.add(chunks[5]) is None  # late duplicate of a finished transfer
    assert r.buffered_bytes == 0


def test_redelivered_chunks_inside_an_open_transfer_are_ignored():
    data = bytes(range(256)) * 100
    transfer, chunks = split_payload(data, 1000)
    r = Reassembler()
    order = [0, 1, 0, 3, 1, 3, 2, *range(4, len(chunks))]  # repeats before and after the prefix
    results = [r.add(chunks[i]) for i in order]
    assert [x for x in results if x is not None] == [(transfer, data)]
    assert results[-1] == (transfer, data)


def test_reassembler_refuses_bad_transfers():
    data = b"x" * 5000
    _, chunks = split_payload(data, 1000)
    r = Reassembler(max_bytes=4000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        r.add(chunks[0])
    r = Reassembler()
    tampered = chunks[:]
    tampered[2] = tampered[2][:-1] + b"y"
    for c in tampered[:-1]:
        assert r.add(c) is None
    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        r.add(tampered[-1])
    _, other = split_payload(
        b"z" * 5000,
        1000,
        transfer=json.loads(chunks[0][8 : 8 + int.from_bytes(chunks[0][4:8], "big")])["transfer"],
    )
    r = Reassembler()
    r.add(chunks[0])
    with pytest.raises(ProtocolError, match="disagree"):
        r.add(other[1])


def test_reassembler_memory_is_bounded():
    r = Reassembler(max_transfers=3, timeout=60)
    for i in range(10):
        _, chunks = split_payload(bytes([i]) * 3000, 1000)
        r.add(chunks[0])
    assert len(r.open) == 3 and r.buffered_bytes == 3000
    assert r.expire(now=1e12) and not r.open


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_chunk_decoder_only_raises_protocol_errors(blob):
    r = Reassembler()
    for candidate in (blob, b"CHFP" + blob, b"CHFP" + len(blob).to_bytes(4, "big") + blob):
        try:
            decode_chunk(candidate)
            r.add(candidate)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_chunks_only_raise_protocol_errors(data):
    payload = data.draw(st.binary(min_size=1, max_size=3000))
    _, chunks = split_payload(payload, data.draw(st.integers(100, 1000)))
    r = Reassembler()
    for c in chunks:
        if data.draw(st.booleans()):
            pos = data.draw(st.integers(0, len(c) - 1))
            c = c[:pos] + bytes([data.draw(st.integers(0, 255))]) + c[pos + 1 :]
        try:
            out = r.add(c)
            if out is not None:
                assert out[1] == payload
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.text(max_size=200).map(str.encode),
        st.dictionaries(
            st.text(max_size=10),
            st.one_of(st.integers(), st.text(max_size=20), st.none(), st.floats()),
            max_size=6,
        ).map(lambda d: json.dumps(d).encode()),
    ),
    st.sampled_from(MESSAGES),
)
def test_message_decoders_only_raise_protocol_errors(blob, model):
    with contextlib.suppress(ProtocolError):
        parse_json(model, blob)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_payload_decoders_only_raise_invalid_update(blob):
    for decode in (decode_state, lambda b: decode_update(b, LAYOUT)):
        with contextlib.suppress(InvalidUpdate):
            decode(blob)


def test_valid_messages_parse():
    msg = UpdateMessage(
        task_id="t",
        round=1,
        client_id="c",
        status="ok",
        metrics=Metrics(samples=3),
        transfer="ab" * 8,
    )
    assert parse_json(UpdateMessage, msg.model_dump_json().encode()) == msg
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_json(UpdateMessage, b" " * (2 << 20))
