"""Direct calls (``raggen.index.direct_calls``) over real loopback sockets:

- replies come back in request order from several servers, over one kept connection per caller
  thread and server (closed when its thread ends); at most ``max_concurrent_calls`` handler calls
  run at once;
- only a caller holding the group's key AND expecting this server's identity gets an answer; a
  peer that does not prove the key never reaches the handler (nothing of its is unpickled), and the
  server keeps serving others;
- a handler's error comes back as a remote DirectCallError and the connection stays usable; a
  closed server (a dead actor) is a non-remote DirectCallError, and a new address works;
- a reply slower than the caller's timeout is an error, not a hang; ``close`` ends the connections.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest

from raggen.index.direct_calls import (
    MAGIC,
    NONCE_BYTES,
    DirectCallError,
    DirectClient,
    DirectServer,
    new_key,
    send_frame,
)


class Handler:
    def __init__(self, tag: bytes):
        self.tag, self.calls = tag, 0

    def __call__(self, op: bytes, payload: bytes) -> bytes:
        self.calls += 1
        if op == b"e":
            raise ValueError("bad request " + payload.decode())
        if op == b"s":
            time.sleep(float(payload))
        return self.tag + op + payload


def closed_by_peer(raw: socket.socket) -> bool:
    """The server closed this connection (an orderly EOF, or a reset when our bytes were left unread)."""
    try:
        return raw.recv(64) == b""
    except ConnectionResetError:
        return True


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def servers():
    key = new_key()
    handlers = [Handler(b"A"), Handler(b"B")]
    made = [DirectServer(h, key=key, identity=f"g/{i}") for i, h in enumerate(handlers)]
    yield key, made, handlers
    for s in made:
        s.close()


def test_replies_in_order_over_one_kept_connection_per_thread(servers):
    key, made, handlers = servers
    client = DirectClient(key, ["g/0", "g/1"])
    addresses = [s.address for s in made]
    try:
        assert client.call(addresses, [1, 0], [b"x1", b"y2"]) == [b"Bx1", b"Ay2"]
        for i in range(5):
            assert client.call(addresses, [0], [b"q" + str(i).encode()]) == [b"Aq" + str(i).encode()]
        assert [s.connections() for s in made] == [1, 1]
        other: list = []
        thread = threading.Thread(target=lambda: other.append(client.call(addresses, [0, 1], [b"t", b"t"])))
        thread.start()
        thread.join()
        assert other == [[b"At", b"Bt"]]
        # the other thread had connections of its own, closed once it ended (and its sockets with it)
        assert wait_for(lambda: [s.connections() for s in made] == [1, 1])
        assert client.call(addresses, [0], [b"again"]) == [b"Aagain"]
        assert handlers[0].calls == 8 and handlers[1].calls == 2
    finally:
        client.close()
    assert wait_for(lambda: [s.connections() for s in made] == [0, 0])
    with pytest.raises(DirectCallError):
        client.call(addresses, [0], [b"after close"])


def test_only_the_key_and_identity_get_answers(servers):
    key, made, handlers = servers
    addresses = [s.address for s in made]
    with pytest.raises(DirectCallError):
        DirectClient(new_key(), ["g/0", "g/1"]).call(addresses, [0], [b"x"])  # another group's key
    with pytest.raises(DirectCallError, match="is not shard actor g/1"):
        DirectClient(key, ["g/1", "g/0"]).call(addresses, [0], [b"x"])  # server 0 is not g/1
    # a peer that sends the hello, then a wrong proof, then a frame: dropped before any handler call
    with socket.create_connection(made[0].address, timeout=5) as raw:
        raw.sendall(MAGIC + os.urandom(NONCE_BYTES))
        raw.recv(64)
        raw.sendall(b"\0" * 32)
        with contextlib.suppress(OSError):  # the server may already have closed it
            send_frame(raw, b"x" + b"\x80\x05junk")
        assert closed_by_peer(raw)
    with socket.create_connection(made[0].address, timeout=5) as raw:  # not even the magic
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 64)
        assert closed_by_peer(raw)
    assert handlers[0].calls == 0
    assert DirectClient(key, ["g/0", "g/1"]).call(addresses, [0], [b"ok"]) == [b"Aok"]


def test_handler_error_is_remote_and_the_connection_stays(servers):
    key, made, handlers = servers
    client = DirectClient(key, ["g/0", "g/1"])
    addresses = [s.address for s in made]
    with pytest.raises(DirectCallError, match="ValueError: bad request 7") as err:
        client.call(addresses, [0, 1], [b"ok", b"e7"])
    assert err.value.remote
    assert client.call(addresses, [0, 1], [b"a", b"b"]) == [b"Aa", b"Bb"]
    assert [s.connections() for s in made] == [1, 1]
    client.close()


def test_a_closed_server_fails_the_call_and_a_new_address_works(servers):
    key, made, handlers = servers
    client = DirectClient(key, ["g/0", "g/1"], reply_timeout_s=5)
    addresses = [s.address for s in made]
    assert client.call(addresses, [0], [b"a"]) == [b"Aa"]
    made[0].close()  # the actor died: its connections end
    with pytest.raises(DirectCallError) as err:
        client.call(addresses, [0], [b"a"])
    assert not err.value.remote
    with pytest.raises(DirectCallError):  # nobody listens there now
        client.call(addresses, [0], [b"a"])
    restarted = DirectServer(Handler(b"C"), key=key, identity="g/0")  # a restarted actor: a new port
    try:
        assert client.call([restarted.address, addresses[1]], [0, 1], [b"a", b"b"]) == [b"Ca", b"Bb"]
    finally:
        restarted.close()
        client.close()


def test_a_slow_reply_is_an_error_not_a_hang(servers):
    key, made, _ = servers
    client = DirectClient(key, ["g/0", "g/1"], reply_timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(DirectCallError):
        client.call([s.address for s in made], [0], [b"s2.0"])
    assert time.monotonic() - t0 < 1.5
    assert client.call([s.address for s in made], [0], [b"s0"]) == [b"As0"]  # a fresh connection
    client.close()


def test_handler_calls_at_once_are_bounded():
    """As a shard actor's Ray calls are by its max_concurrency: 6 callers, at most 2 handler calls."""
    key, lock = new_key(), threading.Lock()
    state = {"now": 0, "most": 0}

    def handler(op: bytes, payload: bytes) -> bytes:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.1)
        with lock:
            state["now"] -= 1
        return payload

    server = DirectServer(handler, key=key, identity="g/0", max_concurrent_calls=2)
    client = DirectClient(key, ["g/0"])
    replies: list = []
    threads = [
        threading.Thread(target=lambda i=i: replies.append(client.call([server.address], [0], [b"x" + bytes([i])])))
        for i in range(6)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r[0] for r in replies) == [bytes([i]) for i in range(6)]
        assert state["most"] == 2
    finally:
        client.close()
        server.close()
