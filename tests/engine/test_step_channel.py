"""The leader's step messages: what is sent is what is received, in order, over TCP
connections that the key-value store introduces; strangers, missing and dropped processes
get a DeploymentError that names them."""

import socket
import threading
import time

import numpy as np
import pytest

from jaxserve.engine.multihost import Message, Op, StepChannel
from jaxserve.engine.step_socket import HELLO_TIMEOUT_S, StepSocket
from jaxserve.errors import DeploymentError


class Store:
    """The coordination service's key-value calls the introductions use, in memory."""

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.changed = threading.Condition()

    def key_value_set_bytes(self, key: str, value: bytes) -> None:
        with self.changed:
            assert key not in self.values, f"{key} written twice"
            self.values[key] = value
            self.changed.notify_all()

    def blocking_key_value_get_bytes(self, key: str, timeout_ms: int) -> bytes:
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.values, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out: {key}")
            return self.values[key]


def sockets(num_processes=2, *, store=None, timeout_s=10.0, connect=None):
    """(leader, [followers]) of one channel, the leader made on a thread (it waits for
    every follower to connect). connect: the processes that connect (default: all)."""
    store = store or Store()
    made, errors = {}, []

    def make_leader():
        try:
            made[0] = StepSocket(store, "t/", process_index=0, num_processes=num_processes,
                                 leader_host="127.0.0.1", timeout_s=timeout_s)
        except DeploymentError as e:
            errors.append(e)

    thread = threading.Thread(target=make_leader)
    thread.start()
    followers = [StepSocket(store, "t/", process_index=i, num_processes=num_processes,
                            leader_host="127.0.0.1", timeout_s=timeout_s)
                 for i in (connect if connect is not None else range(1, num_processes))]
    thread.join()
    if errors:
        raise errors[0]
    return made[0], followers


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


class Recorder:
    """A transport that keeps what the leader sends, for the follower to read back."""

    def __init__(self):
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)

    def receive(self) -> bytes:
        return self.sent.pop(0)


def test_every_follower_receives_every_message_as_sent_in_order():
    leader_end, follower_ends = sockets(3)
    leader = StepChannel(shapes, leader_end)
    followers = [StepChannel(shapes, end) for end in follower_ends]
    sent = [Message(Op.WARM_UP), step((16, 4, 1, 1), 1), step((64, 16, 5, 1), 2),
            step((16, 4, 1, 4), 3), step((16, 4, 1, 1), 4), Message(Op.STOP)]
    for m in sent:
        leader.send(m)
    for follower in followers:
        for m in sent:
            got = follower.receive()
            assert (got.op, got.bucket, got.continues) == (m.op, m.bucket, m.continues)
            if m.op == Op.STEP:
                np.testing.assert_array_equal(got.buffer, m.buffer)
                assert got.buffer.dtype == np.int32 and got.buffer.shape == shapes(m.bucket)
            else:
                assert got.buffer is None
    for end in (leader_end, *follower_ends):
        end.close()


def test_large_messages_arrive_whole():
    leader, (follower,) = sockets()
    big = np.random.default_rng(0).bytes(3 << 20)  # more than a socket buffer
    thread = threading.Thread(target=leader.send, args=(big,))
    thread.start()
    assert follower.receive() == big
    thread.join()
    leader.close(), follower.close()


def leader_in_a_thread(store, timeout_s: float):
    """(thread making the leader's StepSocket for 2 processes, {0: the socket} once made,
    its port)."""
    made = {}
    thread = threading.Thread(target=lambda: made.setdefault(0, StepSocket(
        store, "t/", process_index=0, num_processes=2, leader_host="127.0.0.1",
        timeout_s=timeout_s)))
    thread.start()
    return thread, made, int(store.blocking_key_value_get_bytes("t/port", 5000))


def test_a_stranger_without_the_secret_is_dropped():
    store = Store()
    thread, made, port = leader_in_a_thread(store, timeout_s=10.0)
    with socket.create_connection(("127.0.0.1", port)) as stranger:
        stranger.sendall(b"0" * 32 + (1).to_bytes(4, "little"))  # a real index, no secret
        assert stranger.recv(16) == b""  # the leader closed it
    follower = StepSocket(store, "t/", process_index=1, num_processes=2,
                          leader_host="127.0.0.1", timeout_s=10.0)
    thread.join()
    made[0].send(b"only for process 1")
    assert follower.receive() == b"only for process 1"
    made[0].close(), follower.close()


def test_a_silent_stranger_holds_up_the_leader_for_its_hello_time_only():
    """A connection that never says hello is dropped after HELLO_TIMEOUT_S, not at the
    deadline of the whole start-up, so the followers behind it get in."""
    store = Store()
    thread, made, port = leader_in_a_thread(store, timeout_s=30.0)
    with socket.create_connection(("127.0.0.1", port)) as silent:
        follower = StepSocket(store, "t/", process_index=1, num_processes=2,
                              leader_host="127.0.0.1", timeout_s=30.0)
        thread.join(timeout=HELLO_TIMEOUT_S + 10)  # not the 30 s of timeout_s
        assert not thread.is_alive()
        assert silent.recv(16) == b""  # the leader closed it
    made[0].send(b"after the stranger")
    assert follower.receive() == b"after the stranger"
    made[0].close(), follower.close()


def test_a_process_that_never_connects_is_named():
    with pytest.raises(DeploymentError, match=r"process\(es\) \[2\] did not connect .* "
                                              r"distributed.step_port"):
        sockets(3, timeout_s=1.0, connect=[1])


def test_a_dropped_follower_fails_the_leaders_send_and_a_closed_leader_the_receive():
    leader, (follower,) = sockets()
    follower.close()
    with pytest.raises(DeploymentError, match="process 1 dropped the step channel"):
        for _ in range(1000):  # the first sends may still fit in the kernel's buffers
            leader.send(b"x" * 4096)
    leader.close()

    leader, (follower,) = sockets()
    leader.send(b"last")
    leader.close()
    assert follower.receive() == b"last"
    with pytest.raises(DeploymentError, match="the leader closed the step channel"):
        follower.receive()
    follower.close()


def test_the_leader_names_a_follower_whose_connection_closed_without_sending():
    leader, followers = sockets(3)
    leader.send(b"x")  # unread by the followers: what waits on their side is no sign
    assert leader.lost_peers() == []
    followers[1].close()  # process 2 stops (during warm-up, say: no step is sent)
    deadline = time.monotonic() + 5
    while not (lost := leader.lost_peers()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost == [2]
    assert followers[0].receive() == b"x"
    leader.close()
    followers[0].close()


def test_a_step_like_the_last_one_in_its_bucket_travels_as_its_changed_entries():
    wire = Recorder()
    leader, follower = StepChannel(shapes, wire), StepChannel(shapes, wire)
    first = step((64, 16, 5, 1), 1)
    second = Message(Op.STEP, (64, 16, 5, 1), True, first.buffer.copy())
    second.buffer[0, :, :16] += 1  # the positions move on; the page tables stay
    sizes = []
    for m in (first, step((16, 4, 1, 1), 2), second):
        leader.send(m)
        sizes.append(len(wire.sent[-1]))
        got = follower.receive()
        np.testing.assert_array_equal(got.buffer, m.buffer)
    header = 6 * 4
    assert sizes[0] == header + 1 + first.buffer.nbytes  # the first of its bucket: whole
    assert sizes[2] == header + 1 + 2 * 4 * 32  # 32 entries changed: indices and values


def test_a_step_that_changes_most_entries_travels_whole():
    wire = Recorder()
    leader, follower = StepChannel(shapes, wire), StepChannel(shapes, wire)
    for seed in (1, 2):  # random buffers: every entry changes
        m = step((16, 4, 1, 1), seed)
        leader.send(m)
        assert len(wire.sent[-1]) == 6 * 4 + 1 + m.buffer.nbytes
        np.testing.assert_array_equal(follower.receive().buffer, m.buffer)


def test_a_follower_whose_leader_never_opens_the_channel_says_so():
    with pytest.raises(DeploymentError, match="the leader did not open its step channel "
                                              "within 0.2 s"):
        StepSocket(Store(), "t/", process_index=1, num_processes=2, leader_host="127.0.0.1",
                   timeout_s=0.2)
