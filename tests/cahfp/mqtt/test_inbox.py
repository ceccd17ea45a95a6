"""The coordinator's inbox: first in, first out, with payload memory bounded by spooling to disk."""

import os
import random
import threading

from cahfp.mqtt.inbox import Incoming, SpoolingInbox


def messages(n, seed=0):
    rng = random.Random(seed)
    return [Incoming(f"t/{i}", rng.randbytes(rng.randrange(0, 5000)), i % 3 == 0) for i in range(n)]


def test_order_and_bytes_survive_spooling_and_memory_stays_bounded(tmp_path):
    inbox = SpoolingInbox(memory_bytes=20_000, spool_dir=str(tmp_path))
    sent = messages(200)
    for m in sent[:150]:
        inbox.put(m)
        assert inbox.in_memory <= 20_000
    got = [inbox.get(0) for _ in range(100)]
    for m in sent[150:]:  # interleave: new arrivals while spooled ones still wait
        inbox.put(m)
    got += [inbox.get(0) for _ in range(100)]
    assert got == sent
    assert inbox.get(0) is None
    assert inbox.peak_in_memory <= 20_000
    assert inbox.spooled_total > 0.5 * sum(len(m.payload) for m in sent)
    assert 0 < inbox.peak_on_disk <= inbox.spooled_total and inbox.on_disk == 0
    inbox.reset_peaks()
    assert inbox.peak_on_disk == inbox.spooled_total == 0
    inbox.close()


def test_close_drops_the_spool_and_keeps_later_messages_in_memory(tmp_path):
    inbox = SpoolingInbox(memory_bytes=100, spool_dir=str(tmp_path))
    first = Incoming("a", b"a" * 80, False)
    inbox.put(first)
    inbox.put(Incoming("b", b"b" * 80, False))  # spooled
    inbox.close()
    late = Incoming("c", b"c" * 80, False)
    inbox.put(late)  # after close: in memory, never a new file
    assert inbox._file is None
    assert [inbox.get(0), inbox.get(0), inbox.get(0)] == [first, late, None]


def test_spool_file_is_emptied_when_the_backlog_drains(tmp_path):
    inbox = SpoolingInbox(memory_bytes=1000, spool_dir=str(tmp_path))
    for m in messages(20):
        inbox.put(m)
    assert inbox._end > 0
    while inbox.get(0) is not None:
        pass
    assert inbox._end == 0 and os.fstat(inbox._file.fileno()).st_size == 0
    assert list(tmp_path.iterdir()) == []  # unlinked at creation: nothing left behind
    inbox.close()


def test_unwritable_spool_keeps_messages_in_memory(tmp_path, caplog):
    inbox = SpoolingInbox(memory_bytes=100, spool_dir=str(tmp_path / "missing"))
    sent = messages(10, seed=1)
    for m in sent:
        inbox.put(m)
    assert "keeping it in memory" in caplog.text
    assert [inbox.get(0) for _ in sent] == sent


def test_damaged_spool_file_loses_only_the_damaged_messages(tmp_path, caplog):
    inbox = SpoolingInbox(memory_bytes=0, spool_dir=str(tmp_path))
    sent = [Incoming("a", b"x" * 100, False), Incoming("b", b"y" * 100, False)]
    for m in sent:
        inbox.put(m)
    os.ftruncate(inbox._file.fileno(), 150)  # the second message is cut short
    assert inbox.get(0) == sent[0]
    assert inbox.get(0) is None
    assert "lost a spooled message on b" in caplog.text


def test_producer_and_consumer_threads(tmp_path):
    inbox = SpoolingInbox(memory_bytes=50_000, spool_dir=str(tmp_path))
    sent = messages(2000, seed=2)

    def produce():
        for m in sent:
            inbox.put(m)

    t = threading.Thread(target=produce)
    t.start()
    got = []
    while len(got) < len(sent):
        m = inbox.get(5.0)
        assert m is not None, "consumer starved"
        got.append(m)
    t.join()
    assert got == sent
    assert inbox.peak_in_memory <= 50_000
