"""The pump on real loopback sockets: integrity under back-pressure, ends, idle timeout and goodbye, TLS."""
import hashlib
import os
import socket
import ssl

import gevent
import pytest

from mmproxy import pump as pumpmod
from mmproxy.testing.proxy import make_cert

from helpers import tcp_pair, until_close


def start(idle=30.0, to_store=b"", to_client=b"", wrap=None, goodbye=b""):
    client, client_in = tcp_pair()
    store, store_in = tcp_pair()
    if wrap:
        client, client_in = wrap(client, client_in)
    done = gevent.event.AsyncResult()
    r = pumpmod.Pump(client_in, store_in, idle, done.set, to_store, to_client, {"idle": goodbye})
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


def test_pending_bytes_go_first_and_the_store_ending_closes_both_at_once():
    """After LOGOUT the store closes: what it sent reaches the client, then both connections close
    (the client's slot is free at once, no lingering half-open connection)."""
    client, store, r, done = start(to_store=b"A SELECT INBOX\r\n", to_client=b"* 1 EXISTS\r\n")
    assert store.recv(100) == b"A SELECT INBOX\r\n"
    assert client.recv(100) == b"* 1 EXISTS\r\n"
    store.sendall(b"* BYE\r\nb OK Logout completed\r\n")
    store.shutdown(socket.SHUT_WR)
    assert done.get(timeout=2).reason == "closed by store"
    assert until_close(client) == b"* BYE\r\nb OK Logout completed\r\n"
    assert store.recv(100) == b""                  # the store's connection was closed too


def test_client_half_close_still_gets_the_last_answer():
    client, store, r, done = start()
    client.sendall(b"z LOGOUT\r\n")
    client.shutdown(socket.SHUT_WR)
    assert store.recv(100) == b"z LOGOUT\r\n"
    assert store.recv(100) == b""                  # the client's end reached the store
    store.sendall(b"* BYE\r\nz OK\r\n")
    store.close()
    assert client.recv(100) == b"* BYE\r\nz OK\r\n"
    assert done.get(timeout=2).reason == "closed by client"


def test_idle_timeout_says_goodbye_and_closes_both(monkeypatch):
    monkeypatch.setattr(pumpmod, "SWEEP_EVERY", 0.1)
    pumpmod._sweeper = None
    client, store, r, done = start(idle=0.3, goodbye=b"* BYE Disconnected for inactivity.\r\n")
    assert "idle" in done.get(timeout=5).reason
    assert client.recv(100) == b"* BYE Disconnected for inactivity.\r\n"
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
