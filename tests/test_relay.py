"""The relay on real loopback sockets: integrity under back-pressure, half-close, idle timeout, TLS."""
import hashlib
import os
import socket
import ssl

import gevent
import pytest
from gevent import socket as gsocket

from mmproxy import relay
from mmproxy.testing.proxy import make_cert


def pair():
    """(outside end, inside end) of one loopback TCP connection; both gevent sockets."""
    lst = gsocket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    outside = gsocket.create_connection(lst.getsockname())
    inside, _ = lst.accept()
    lst.close()
    return outside, inside


def start(idle=30.0, to_store=b"", to_client=b"", wrap=None):
    client, client_in = pair()
    store, store_in = pair()
    if wrap:
        client, client_in = wrap(client, client_in)
    done = gevent.event.AsyncResult()
    r = relay.Relay(client_in, store_in, idle, done.set, to_store, to_client)
    return client, store, r, done


def pump(src, dst, size, slow=False):
    data = os.urandom(1 << 20)
    h_out, h_in = hashlib.sha256(), hashlib.sha256()

    def writer():
        left = size
        while left:
            chunk = data[:min(left, len(data))]
            src.sendall(chunk)
            h_out.update(chunk)
            left -= len(chunk)

    w = gevent.spawn(writer)
    got = 0
    while got < size:
        chunk = dst.recv(65536)
        assert chunk
        h_in.update(chunk)
        got += len(chunk)
        if slow and got % (1 << 20) < 65536:
            gevent.sleep(0.01)        # a slow reader: the relay must hold back, not buffer everything
    w.get(timeout=30)
    assert h_in.digest() == h_out.digest()


@pytest.mark.parametrize("slow", [False, True])
def test_bulk_both_ways_intact(slow):
    client, store, r, done = start()
    pump(client, store, 24 << 20, slow)
    pump(store, client, 24 << 20, slow)
    assert r.bytes_up == r.bytes_down == 24 << 20
    client.close()
    store.close()
    assert "closed by" in done.get(timeout=5).reason


def test_pending_bytes_go_first_and_half_close_is_passed_on():
    client, store, r, done = start(to_store=b"A SELECT INBOX\r\n", to_client=b"* 1 EXISTS\r\n")
    assert store.recv(100) == b"A SELECT INBOX\r\n"
    assert client.recv(100) == b"* 1 EXISTS\r\n"
    store.sendall(b"* BYE\r\n")
    store.shutdown(socket.SHUT_WR)
    assert client.recv(100) == b"* BYE\r\n"
    assert client.recv(100) == b""                 # the store's end reached the client
    client.sendall(b"late\r\n")
    assert store.recv(100) == b"late\r\n"          # the other direction still flows
    client.close()
    assert done.get(timeout=5).reason == "closed by store"


def test_idle_timeout_closes_both(monkeypatch):
    monkeypatch.setattr(relay, "SWEEP_EVERY", 0.1)
    relay._sweeper = None
    client, store, r, done = start(idle=0.3)
    assert "idle" in done.get(timeout=5).reason
    assert client.recv(10) == b"" and store.recv(10) == b""


def test_tls_client_side(tmp_path):
    cert, key = make_cert(str(tmp_path))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl._create_unverified_context()

    def wrap(outside, inside):
        g = gevent.spawn(sctx.wrap_socket, inside, server_side=True)
        c = cctx.wrap_socket(outside)
        return c, g.get(timeout=10)

    client, store, r, done = start(wrap=wrap)
    pump(client, store, 8 << 20, slow=True)
    pump(store, client, 8 << 20, slow=True)
    client.close()
    assert done.get(timeout=5).closed
