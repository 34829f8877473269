"""The leader's step messages through a key-value store: what is sent is what is received,
in order, and the store keeps a bounded number of them."""

import numpy as np
import pytest

from jaxserve.engine import multihost
from jaxserve.engine.multihost import Message, Op, StepChannel


class Store:
    """The coordination service's key-value calls, in memory."""

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.timeouts = 0

    def key_value_set_bytes(self, key: str, value: bytes) -> None:
        assert key not in self.values, f"{key} written twice"
        self.values[key] = value

    def key_value_delete(self, key: str) -> None:
        """The key and every key below it, as the coordination service does."""
        gone = [k for k in self.values if k == key or k.startswith(key + "/")]
        assert gone, f"{key}: nothing to delete"
        for k in gone:
            del self.values[k]

    def blocking_key_value_get_bytes(self, key: str, timeout_ms: int) -> bytes:
        if key not in self.values:
            self.timeouts += 1
            raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
        return self.values[key]


def shapes(bucket):
    t, s, *_ = bucket
    return 1, 2, 3 * t + 2 * s


def step(bucket, seed):
    """A step's buffer: random int32 entries, then float32 ones (as their bits)."""
    rng = np.random.default_rng(seed)
    d, p, n = shapes(bucket)
    floats = rng.standard_normal((d, p, bucket[1])).astype(np.float32).view(np.int32)
    ints = rng.integers(-2**31, 2**31 - 1, (d, p, n - bucket[1]), dtype=np.int32)
    return Message(Op.STEP, bucket, bool(seed % 2), np.concatenate([ints, floats], axis=-1))


def test_a_follower_receives_every_message_as_sent_in_order():
    store = Store()
    leader = StepChannel(shapes, store, name="t")
    follower = StepChannel(shapes, store, name="t")
    sent = [Message(Op.WARM_UP), step((16, 4, 1, 1), 1), step((64, 16, 5, 1), 2),
            step((16, 4, 1, 4), 3), step((16, 4, 1, 1), 4),
            Message(Op.PING), Message(Op.STOP)]
    for m in sent:
        leader.send(m)
    for m in sent:
        got = follower.receive()
        assert (got.op, got.bucket, got.continues) == (m.op, m.bucket, m.continues)
        if m.op == Op.STEP:
            np.testing.assert_array_equal(got.buffer, m.buffer)
            assert got.buffer.dtype == np.int32 and got.buffer.shape == shapes(m.bucket)
        else:
            assert got.buffer is None


def test_the_store_keeps_one_to_two_blocks_of_messages(monkeypatch):
    monkeypatch.setattr(multihost, "KEEP", 4)
    store = Store()
    leader = StepChannel(shapes, store, name="t")
    follower = StepChannel(shapes, store, name="t")
    kept = []
    for i in range(14):
        leader.send(step((16, 4, 1, 1), i))
        assert follower.receive().buffer[0, 0, 0] == step((16, 4, 1, 1), i).buffer[0, 0, 0]
        kept.append(len(store.values))
    # blocks of 4: starting block b deletes block b - 2 in one call
    assert kept == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    assert sorted(store.values, key=lambda k: int(k.rsplit("/", 1)[1])) == [
        f"jaxserve/steps/t/{i // 4}/{i}" for i in range(8, 14)]


def test_a_follower_waits_through_timeouts_and_fails_on_other_errors():
    store = Store()
    follower = StepChannel(shapes, store, name="t")
    calls = iter([RuntimeError("DEADLINE_EXCEEDED: timed out"),
                  RuntimeError("DEADLINE_EXCEEDED: timed out")])

    def get(key, timeout_ms):
        error = next(calls, None)
        if error is not None:
            raise error
        return np.array([Op.STOP, 0, 0, 1, 1, 0], np.int32).tobytes()

    store.blocking_key_value_get_bytes = get
    assert follower.receive().op == Op.STOP

    def broken(key, timeout_ms):
        raise RuntimeError("UNAVAILABLE: the coordination service is gone")

    store.blocking_key_value_get_bytes = broken
    with pytest.raises(RuntimeError, match="UNAVAILABLE"):
        follower.receive()


def test_channels_made_in_the_same_order_share_their_keys_and_others_do_not():
    a, b = StepChannel(shapes, Store()), StepChannel(shapes, Store())
    assert a._prefix != b._prefix


def test_a_step_like_the_last_one_in_its_bucket_travels_as_a_small_difference():
    store = Store()
    leader = StepChannel(shapes, store, name="t")
    follower = StepChannel(shapes, store, name="t")
    first = step((64, 16, 5, 1), 1)
    second = Message(Op.STEP, (64, 16, 5, 1), True, first.buffer.copy())
    second.buffer[0, :, :16] += 1  # the positions move on; the page tables stay
    for m in (first, step((16, 4, 1, 1), 2), second):
        leader.send(m)
        got = follower.receive()
        np.testing.assert_array_equal(got.buffer, m.buffer)
    raw_bytes = first.buffer.nbytes
    assert len(store.values["jaxserve/steps/t/0/0"]) > raw_bytes  # random: incompressible
    assert len(store.values["jaxserve/steps/t/0/2"]) < raw_bytes // 10
