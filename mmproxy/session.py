"""What every protocol session shares: the command loop over a command table, explicit states,
the one failure mapping, bounded reads with deadlines, TLS, replies and the session-end log line.

A protocol module subclasses :class:`Session` (SMTP) or :class:`mmproxy.login.LoginSession` (IMAP,
POP) and provides:

* a state enum and ``COMMANDS``, its command table: verb -> :class:`Verb` (handler, the states it
  is allowed in, its argument count), after pyftpdlib's ``proto_cmds`` and Twisted's
  state-qualified lookup.  :meth:`Session.dispatch` refuses an unknown verb, a verb not valid in
  the present state and arguments that do not fit, so handlers hold no such checks;
* ``read_request``: one command in the protocol's syntax, as a :class:`Request`;
* ``reply_for``: the one place where the failure taxonomy (``errors.py``) becomes the protocol's
  replies.  It only returns them; :meth:`Session.fail` sends them, counts bad commands and failed
  logins, logs, and ends the session when the reply says so.

Every read a client can influence runs inside :meth:`Session.serve`, so whatever it raises
(continuations of a SASL exchange included) reaches that mapping: a client always gets a protocol
reply, never silence, and never a traceback in the log.
"""
from __future__ import annotations

import enum
import functools
import itertools
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Type, Union

import gevent

from mmproxy import hostnames, proxyproto, state, stats, tls
from mmproxy.access import Host
from mmproxy.addresses import address_key
from mmproxy.badguys import BadGuys
from mmproxy.connlimits import ConnLimits
from mmproxy.errors import (
    AccessDenied,
    AccountDisabled,
    AccountHeld,
    AmbiguousUser,
    AuthFailed,
    AuthServerUnavailable,
    AuthTempFail,
    AuthzFailed,
    BackendError,
    ClientGone,
    ClientSyntaxError,
    ClientTimeout,
    ClientTooLong,
    CommandError,
    DirectoryError,
    NotNow,
    ServerShutdown,
    StoreRefused,
    UnknownCommand,
    UnknownUser,
)
from mmproxy.linereader import LineReader, send_now
from mmproxy.logs import DETAIL
from mmproxy.proxyproto import Origin

MAX_BAD_COMMANDS = 10      # then the session is closed (nginx max_errors, aiosmtpd BOGUS_LIMIT)
MAX_AUTH_FAILURES = 3      # failed logins per connection before it is closed
SEND_TIMEOUT = 60.0        # a client that does not read its answers is dropped after this
LINGER = 2.0               # seconds a closing session reads away what the client still sends

# Why a login (or a relay) may not go through besides a wrong password (AuthFailed)
LOGIN_OUTCOMES = (AuthzFailed, AccessDenied, AuthTempFail, StoreRefused, BackendError)

Line = Union[str, bytes]
_ids = itertools.count(1)
_worker = ""               # "w2-" in worker process 2 of NumThreads > 1: session ids never collide


def set_worker(number: Optional[int]) -> None:
    """Mark this process's session ids with its worker number (``#w2-42``); None: one process."""
    global _worker
    _worker = "" if number is None else "w%d-" % number


@functools.lru_cache(maxsize=64)
def one_line(text: object) -> str:
    """A configured text (Banner, ServerDownAlert) as one line of single spaces."""
    return " ".join(str(text or "").split())


class State(enum.Enum):
    """Base of the protocols' state enums: members hash by identity (Enum's own __hash__ is Python
    code, and the command loop asks "is the state in this set?" for every command)."""

    __hash__ = object.__hash__


@dataclass(frozen=True)
class Verb:
    """One row of a command table.

    ``handler(session, request)`` runs the command; None marks a verb the proxy knows but leaves to
    the store (the states say when).  ``args`` is the (least, most) number of arguments, most -1 for
    any.  ``strings``: every argument must be a string (no IMAP parenthesised list).  ``not_now``:
    the refusal text in a state the verb is not allowed in (the protocol's default when empty).
    """

    handler: Optional[Callable[[Any, "Request"], None]]
    states: FrozenSet[State]
    args: Tuple[int, int] = (0, 0)
    syntax: str = ""
    strings: bool = True
    not_now: str = ""


@dataclass
class Request:
    """One command as read: its verb (upper case), its arguments in the protocol's shape, the raw
    line (SMTP forwards it).  (An IMAP command's tag is the session's ``tag``.)"""

    verb: str
    args: List[Any] = field(default_factory=list)
    line: bytes = b""
    lists: bool = False          # some argument is a parenthesised list (IMAP)


_UNREAD = object()           # Session.sentence before a BadGuys sentence is read


def linger_close(sock: socket.socket, seconds: float = LINGER) -> int:
    """Close a client connection behind the last reply: a FIN right after it and, when the client
    has sent more than was read (pipelined commands, the rest of an over-long line, junk before a
    refusal), up to ``seconds`` of reading that away first, so that the close is not a reset that
    could cost the client our last reply (a lingering close, as Apache's).  Returns the octets
    read away."""
    n = 0
    try:
        if not isinstance(sock, ssl.SSLSocket):
            sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        sock.settimeout(0.0)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            n += len(data)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
    except (OSError, ValueError, gevent.GreenletExit):
        pass                             # nothing more to read now, the client is gone, or we stop
    try:
        sock.close()
    except OSError:
        pass
    return n


class Service:
    """One ServiceList entry at run time: its settings, TLS context, connection limits and sessions."""

    kind = "service"               # a kinds.SERVICES name: "imap", "pop", "smtp"
    session_class: Type["Session"]

    def __init__(self, entry: Any, previous: Optional["Service"] = None) -> None:
        """``previous``: the service this one replaces at a refresh (see :meth:`resources`)."""
        self.entry = entry
        self.cfg = entry.cfg
        self.tls: Optional[ssl.SSLContext] = tls.server_context(self.cfg) if self.cfg.SSLEnable else None
        self.ssl_ports = {(e.host, e.port) for e in (self.cfg.SSLPorts or [])}
        self.proxy_ports = {(e.host, e.port) for e in (self.cfg.ProxyProtocolPorts or [])}
        self.sessions: set = set()
        self.limits = ConnLimits(self.cfg.ConnLimits or (), self.kind)
        self.badguys = BadGuys.from_cfg(self.cfg) if self.counts_failures() else None
        self.commands: Mapping[str, Verb] = self.session_class.COMMANDS    # the table its sessions use
        self.log = logging.getLogger("mmproxy." + self.kind)

    def counts_failures(self) -> bool:
        """Whether failed authentications make the client address wait (BadGuys)."""
        return True

    def implicit_tls(self, host: str, port: int) -> bool:
        """Whether the listener ``host:port`` is in SSLPorts (TLS from the first byte)."""
        return (host, port) in self.ssl_ports or ("", port) in self.ssl_ports

    def proxy_protocol(self, host: str, port: int) -> bool:
        """Whether connections to the listener ``host:port`` start with a PROXY header (ProxyProtocolPorts)."""
        return (host, port) in self.proxy_ports or ("", port) in self.proxy_ports

    def handle(self, sock: socket.socket, addr: Tuple[str, int], implicit_tls: bool, proxied: bool = False) -> None:
        """One accepted connection, start to end (the listener's handler).  ``proxied``: the
        listener is in ProxyProtocolPorts; the client is who the balancer's header names."""
        origin = None
        if proxied:
            origin = self.read_origin(sock, addr, implicit_tls)
            if origin is None:
                return
            addr = origin.client
        if not self.admit(sock, addr, implicit_tls, origin):
            return
        admitted, release = self.limits.admit(addr[0])
        if not admitted:
            stats.refused(self.kind, "connlimits")
            self.log.warning("[%s:%d] refused: this address holds its %s connection(s) already (ConnLimits)",
                             addr[0], addr[1], self.limits.limit_for(addr[0]))
            self.refuse(sock, self.session_class.TOO_MANY_CONNECTIONS, implicit_tls)
            return
        try:
            session = self.session_class(self, sock, addr, origin)
        except (OSError, ValueError) as e:        # the client is gone already; an unusable vdmap.cfg value
            release()
            self.log.error("[%s:%d] cannot start a session: %s: %s", addr[0], addr[1], type(e).__name__, e,
                           exc_info=self.log.isEnabledFor(logging.DEBUG))
            self.refuse(sock, self.session_class.INTERNAL_ERROR, implicit_tls)
            return
        session.release = release
        self.sessions.add(session)
        try:
            session.run(implicit_tls)
        finally:
            self.sessions.discard(session)
            if not session.pumping:
                session.release()

    def refuse(self, sock: socket.socket, reply: str, implicit_tls: bool, handshake: bool = False) -> None:
        """No session for this connection: say why in the protocol's words and close.  On an
        implicit-TLS port only with ``handshake`` (the refusal then goes over TLS), else nothing
        is said there."""
        try:
            if implicit_tls and handshake and self.tls is not None:
                sock = tls.handshake(self.tls, sock, float(self.cfg.HandshakeTimeout), server_side=True)
                implicit_tls = False
            if not implicit_tls:
                sock.settimeout(5)
                sock.sendall(reply.encode() + b"\r\n")
                linger_close(sock)
                return
        except (OSError, ssl.SSLError, socket.timeout, tls.HandshakeTimeout):
            pass
        sock.close()

    def read_origin(self, sock: socket.socket, addr: Tuple[str, int], implicit_tls: bool) -> Optional[Origin]:
        """The PROXY header of a connection to a ProxyProtocolPorts listener (proxyproto.py), read
        within HandshakeTimeout; None: refused (a source not in ProxyProtocolFrom, no header or a bad
        one), with the protocol's refusal where it can be said, one log line, the socket closed."""
        if not proxyproto.trusted(addr[0], self.cfg.ProxyProtocolFrom):
            stats.refused(self.kind, "proxy_protocol")
            self.log.warning("[%s:%d] refused: not a load balancer in ProxyProtocolFrom, on a ProxyProtocolPorts "
                             "listener", addr[0], addr[1])
            self.refuse(sock, self.session_class.ACCESS_DENIED, implicit_tls, handshake=True)
            return None
        try:
            return proxyproto.read_origin(sock, addr, float(self.cfg.HandshakeTimeout))
        except proxyproto.HeaderError as e:
            stats.refused(self.kind, "proxy_protocol")
            self.log.warning("[%s:%d] refused: %s (ProxyProtocolPorts)", addr[0], addr[1], e)
            self.refuse(sock, self.session_class.ACCESS_DENIED, implicit_tls)
            return None

    def admit(self, sock: socket.socket, addr: Tuple[str, int], implicit_tls: bool,
              origin: Optional[Origin] = None) -> bool:
        """``TCPAccess`` (the virtual domain's own when vdmap.cfg sets one) for a new connection,
        before anything else; ``ClientLookup`` starts the client's reverse DNS.  ``origin``: what a
        PROXY header said (the server address is the one the client connected to).  False: refused
        (the protocol's refusal sent, one log line, the socket closed)."""
        cfg = self.cfg
        if cfg.TCPAccess is None and not cfg.ClientLookup and getattr(self.entry, "vdomains", None) is None:
            return True                        # nothing to check (the common case: no system call)
        try:
            server = origin.server if origin is not None else sock.getsockname()
        except OSError:                        # gone already
            sock.close()
            return False
        over = self.overrides_for(server[0])
        if over.get("ClientLookup", cfg.ClientLookup):
            hostnames.prefetch(addr[0])
        flt = over.get("TCPAccess", cfg.TCPAccess)
        if flt is None:
            return True
        service = self.kind + ("s" if implicit_tls else "")
        decision = flt.decide(service, Host(addr[0], hostnames.lookup), Host(server[0], hostnames.lookup))
        if decision.allowed:
            return True
        stats.refused(self.kind, "tcpaccess")
        self.log.info("[%s:%d] refused: TCPAccess %s: %s", addr[0], addr[1], service, decision.why)
        self.refuse(sock, self.session_class.ACCESS_DENIED, implicit_tls, handshake=True)
        return False

    def overrides_for(self, server_ip: str) -> Dict[str, Any]:
        """The vdmap.cfg settings of the virtual domain at ``server_ip`` (empty when none)."""
        vd = getattr(self.entry, "vdomains", None)
        return vd.for_address(server_ip) if vd is not None else {}

    def resources(self) -> List[Any]:
        """What this service holds that a refresh may hand on to the service replacing it (each with
        a ``close()``): LoginService's directories, with their caches and connections."""
        return []

    def close(self) -> None:
        """The daemon stops: release what it holds."""
        for r in self.resources():
            r.close()


class Session:
    """One client connection.  Subclasses set the class attributes below and the three methods
    ``greet``, ``read_request`` and ``reply_for``."""

    kind = "?"                              # a kinds.SERVICES name
    max_line = 8192                         # a command line, its terminator included
    COMMANDS: Mapping[str, Verb] = {}
    NOT_NOW_IN: Mapping[Any, str] = {}      # state -> the refusal of every verb not valid in it
    INITIAL: Any = None                     # the state a session starts in
    CLOSED: Any = None                      # the state of a session that is over
    FINAL: FrozenSet[Any] = frozenset()     # states in which the command loop stops (derived)
    BYE_TOO_MANY = ""                       # the goodbye after MAX_BAD_COMMANDS
    BYE_AUTH_FAILURES = ""                  # the goodbye after MAX_AUTH_FAILURES failed logins
    TOO_MANY_CONNECTIONS = ""               # the refusal before a session starts (ConnLimits)
    ACCESS_DENIED = ""                      # the refusal before a session starts (TCPAccess)
    INTERNAL_ERROR = ""                     # the goodbye when a session cannot even start
    LOGIN_PHASE = "the dialogue before login"   # what LoginTimeout bounds, as the log says it

    def __init__(self, service: Service, sock: socket.socket, addr: Tuple[str, int],
                 origin: Optional[Origin] = None) -> None:
        """``addr``: the client (ip, port); ``origin``: what the load balancer's PROXY header said."""
        self.service = service
        self.sock = sock
        self.client_ip, self.client_port = addr[0], addr[1]
        self.origin = origin
        local = origin.server if origin is not None else sock.getsockname()
        self.server_ip, self.server_port = local[0], local[1]
        self.id = "%s%d" % (_worker, next(_ids))
        self.greenlet = gevent.getcurrent()
        self.log = logging.LoggerAdapter(service.log, {
            "ctx": "%s %s:%d #%s" % (self.kind, self.client_ip, self.client_port, self.id)})
        self.cfg = service.cfg
        over = service.overrides_for(self.server_ip)
        if over:
            self.cfg = self.cfg.override(over)
        self.out: List[bytes] = []
        self.sent = 0
        # Before login (SMTP: before EHLO) reads wait at most LoginIdleTimeout (or Timeout, when
        # lower) and the whole dialogue must be over within LoginTimeout: a client that trickles
        # bytes cannot hold a session.  After login, Timeout is the idle limit.
        self.reader = LineReader(sock, self.max_line, float(min(self.cfg.LoginIdleTimeout, self.cfg.Timeout)),
                                 self.flush)
        self.reader.set_deadline(float(self.cfg.LoginTimeout), self.LOGIN_PHASE)
        self.tls_active = origin is not None and origin.tls       # a balancer may have taken the TLS
        self.peer_cert: Optional[bytes] = None      # the client's certificate (DER), verified, when it sent one
        self.state = self.INITIAL
        self.end_state: Any = None          # where the session was when it ended
        self.end_reason = ""
        self.bad = 0
        self.auth_failures = 0
        self.pumping = False                # the pump owns the sockets now
        self.started = time.monotonic()
        self.tag = ""                       # IMAP: the tag of the command being read, once known
        self.implicit_tls = False           # on an SSLPorts port (access filters: imaps, pops, smtps)
        self.sentence: Any = _UNREAD        # the BadGuys sentence last read for this client (bad_guys)

    release: Callable[[], None] = staticmethod(lambda: None)   # gives the ConnLimits slot back

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.FINAL = cls.final_states()

    @classmethod
    def final_states(cls) -> FrozenSet[Any]:
        """The states in which the command loop stops: the end (LoginSession adds the pump's)."""
        return frozenset({cls.CLOSED})

    def busy(self) -> bool:
        """In the middle of something a stopping daemon lets finish within ShutdownGrace (SMTP: a
        mail transaction); otherwise the session gets the protocol's goodbye at once."""
        return False

    # ------------------------------------------------------------------ what a protocol provides
    def greet(self) -> None:
        raise NotImplementedError

    def read_request(self) -> Request:
        """One command from the client; raises ClientError subclasses for what does not parse."""
        raise NotImplementedError

    def reply_for(self, e: BaseException) -> Tuple[List[Line], bool]:
        """The replies for a failure, and whether the session ends after them."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the session-end line says beyond state, time and bytes (user, store or relay)."""
        return ""

    @property
    def relaying(self) -> bool:
        """Whether ``mmproxy status`` counts the session as relaying (else as before login):
        IMAP and POP hand relayed sessions to the pump, SMTP relays once the client is introduced."""
        return self.pumping

    # ------------------------------------------------------------------ output
    def send(self, line: Line) -> None:
        """Queue one reply line; it goes out before the next blocking read (or at flush)."""
        self.out.append((line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line) + b"\r\n")

    def flush(self) -> None:
        """Send what is queued, as a whole within SEND_TIMEOUT and within the present phase's
        deadline (a client that reads its answers a little at a time must not outlast it; a
        deadline already passed still leaves LINGER seconds for the goodbye).  ClientGone when the
        client cannot take it; ClientTimeout naming the phase when its deadline passes meanwhile."""
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        if not isinstance(self.sock, ssl.SSLSocket):
            try:
                n = send_now(self.sock, data)
            except OSError as e:
                raise ClientGone("write failed: %s" % e) from None
            self.sent += n
            if n == len(data):
                return
            data = data[n:]
        seconds, r = SEND_TIMEOUT, self.reader
        by_deadline = r.deadline is not None and r.deadline - time.monotonic() < SEND_TIMEOUT
        if r.deadline is not None and by_deadline:
            seconds = max(r.deadline - time.monotonic(), LINGER)
        # gevent's sendall bounds a plain socket's whole send by its timeout; on a TLS socket the
        # ssl module's timeout counts per wait, so one timer bounds the whole send there
        timer = gevent.Timeout.start_new(seconds) if isinstance(self.sock, ssl.SSLSocket) else None
        try:
            self.sock.settimeout(seconds)
            self.sock.sendall(data)
        except (OSError, socket.timeout, gevent.Timeout) as e:
            if isinstance(e, gevent.Timeout) and e is not timer:
                raise
            if by_deadline and isinstance(e, (socket.timeout, gevent.Timeout)):
                raise ClientTimeout(str(r.deadline_passed()), phase=r.phase, answerable=False) from None
            raise ClientGone("write failed: %s" % (e if not isinstance(e, gevent.Timeout) else "timed out")) from None
        finally:
            if timer is not None:
                timer.close()
        self.sent += len(data)

    # ------------------------------------------------------------------ life cycle
    def run(self, implicit_tls: bool) -> None:
        """The whole session: TLS on implicit-TLS ports, greeting, commands until the state says
        stop, the goodbye.  Each step runs through ``attempt``."""
        self.implicit_tls = implicit_tls
        try:
            self.attempt(self.open, implicit_tls)
            while self.state not in self.FINAL:
                self.attempt(self.step)
            try:
                self.flush()
            except (ClientGone, ClientTimeout) as e:
                if not self.end_reason:
                    self.end_reason = self.log_failure(e)
        finally:
            if not self.pumping:
                self.close()
                self.log_end(self.end_reason or "closed", self.reader.received, self.sent)

    def attempt(self, action: Callable[..., None], *args: Any) -> None:
        """Run one step of the session; what it raises is answered through ``fail``.

        The one place where an exception becomes a reply.  A client can make any step fail: with
        an error of the taxonomy (errors.py), or with one nobody foresaw, which is answered as the
        protocol's internal error (the last resort that keeps tracebacks out of the log); the
        daemon stopping (GreenletExit) gets the protocol's shutdown goodbye.
        """
        try:
            try:
                action(*args)
            except gevent.GreenletExit:
                raise
            except Exception as e:
                self.fail(e)             # may wait (a BadGuys sentence): the daemon may stop meanwhile
        except gevent.GreenletExit:
            self.fail(ServerShutdown("server shutting down"))

    def open(self, implicit_tls: bool) -> None:
        """TLS on an implicit-TLS port, then the greeting."""
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if implicit_tls:
            self.wrap_tls()
        self.greet()

    def step(self) -> None:
        """One command, read and dispatched.

        A client that keeps the socket full never makes a read wait, and gevent switches only when
        one would: after a command, while more of the client's input is already buffered, the step
        waits until the hub has nothing else to do (``gevent.idle``: every pending I/O event of the
        other sessions is served first; ``sleep(0)`` would only run the other ready greenlets)."""
        self.dispatch(self.read_request())
        if self.reader.buf:
            gevent.idle()

    def close(self) -> None:
        """Close the client connection behind the last reply (:func:`linger_close` unless the
        client has closed already); what is read away counts as received."""
        if self.reader.eof:
            try:
                self.sock.close()
            except OSError:
                pass
            return
        self.reader.take_pending()
        self.reader.received += linger_close(self.sock)

    def lookup(self, name: str) -> Verb:
        """The table row of a verb allowed now; UnknownCommand or NotNow (the state's refusal, else
        the verb's, else the protocol's)."""
        verb = self.service.commands.get(name)
        if verb is None:
            # the name is not logged: it may be a password (the rest of a refused SASL exchange)
            raise UnknownCommand("Unknown command", "unknown command (%d octets)" % len(name))
        if self.state not in verb.states or verb.handler is None:
            raise NotNow(self.NOT_NOW_IN.get(self.state) or verb.not_now or "Command not valid in this state",
                         "%s not valid in state %s" % (name, self.state.value))
        return verb

    def dispatch(self, request: Request) -> None:
        """Run ``request`` through the command table: known verb, allowed state, fitting arguments."""
        verb = self.lookup(request.verb)
        least, most = verb.args
        n = len(request.args)
        if n < least or (most >= 0 and n > most) or (verb.strings and request.lists):
            raise ClientSyntaxError("Syntax: %s" % (verb.syntax or request.verb))
        verb.handler(self, request)      # type: ignore[misc]  # lookup() refused None

    def finish(self, reason: str) -> None:
        """End the session after what is queued has been sent."""
        if self.state is not self.CLOSED:
            self.end_state, self.end_reason = self.state, reason
            self.state = self.CLOSED

    # ------------------------------------------------------------------ the one failure mapping
    def fail(self, e: BaseException) -> None:
        """Answer a failure in the protocol's words (``reply_for``), log it at its level, count it
        (bad commands, failed logins), and end the session when the reply says so or a budget is spent."""
        # a client that is gone (or in the middle of a TLS handshake) can be told nothing
        silent = isinstance(e, ClientGone) or (isinstance(e, ClientTimeout) and not e.answerable)
        lines, end = ([], True) if silent else self.reply_for(e)
        reason = self.log_failure(e)
        bad_command = isinstance(e, CommandError) or (isinstance(e, ClientTooLong) and e.recoverable)
        if bad_command and not end:
            self.bad += 1
            if self.bad >= MAX_BAD_COMMANDS:
                lines, end, reason = [*lines, self.BYE_TOO_MANY], True, "too many bad commands"
        elif is_login_failure(e):
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES and not end:
                lines, end, reason = [*lines, self.BYE_AUTH_FAILURES], True, "too many failed logins"
        for line in lines:
            self.send(line)
        if end:
            self.finish(reason)

    def log_failure(self, e: BaseException) -> str:
        """One log line for a failure, at the level it deserves; returns the reason for the end line.
        A client can never put a traceback in the log: an unforeseen error is one ERROR line, its
        traceback only at LogLevel 5 and up."""
        state = self.state.value if self.state is not None else "-"
        if isinstance(e, ClientGone):
            self.log.debug("client gone: %s", e)
            return "client: %s" % e
        if isinstance(e, ClientTimeout):
            if e.phase:            # a deadline: the one line that names the phase, at LogLevel 1
                self.log.info("deadline passed in state %s: %s", state, e)
                return "deadline passed"
            self.log.log(DETAIL, "client timed out in state %s: %s", state, e)
            return "client timed out (%s)" % e
        if isinstance(e, ClientTooLong):
            self.log.info("refused a command too long in state %s: %s", state, e)
            return "command too long"
        if isinstance(e, CommandError):
            self.log.debug("bad command in state %s: %s", state, e)
            return "bad command"
        if isinstance(e, (AuthFailed, *LOGIN_OUTCOMES)):
            return self.log_login_failure(e)
        if isinstance(e, ServerShutdown):
            self.log.debug("server shutting down in state %s", state)
            return "server shutting down"
        self.log.error("internal error in state %s: %s: %s", state, type(e).__name__, e,
                       exc_info=self.log.isEnabledFor(logging.DEBUG))
        return "internal error"

    def log_login_failure(self, e: BaseException) -> str:
        """How a protocol logs failures of its back end (login, store, relay)."""
        self.log.info("%s: %s", failure_kind(e), e)
        return failure_kind(e)

    def log_end(self, reason: str, received: int, sent: int) -> None:
        """The one line every session leaves at its end (LogLevel 2 and up)."""
        state = self.end_state or self.state
        log_end_line(self.log, reason, state.value if state is not None else "-", self.describe(), self.started,
                     received, sent)

    # ------------------------------------------------------------------ BadGuys
    def bad_guys(self, failed: bool, forgive: bool = True, wait: bool = True) -> None:
        """BadGuys (badguys.py), just before the answer to an authentication: this session waits
        the client address's sentence as it stood (a timer for this session only; never before
        the greeting, which would pin connections and ConnLimits slots).  A failure (``failed``)
        lengthens the sentence first, for every worker; a success after failures (``forgive``) is
        forgiven after its wait.  Every other answer to an authentication (a right password
        refused by an access filter, a user without a store, ...) waits as well, without
        ``forgive``: its timing must not tell a right password from a wrong one.  ``wait`` false: this
        attempt has waited already.  The proxy's own trouble with the state store never delays
        anybody."""
        rules = self.service.badguys
        if rules is None or not rules.active or rules.exempt(self.client_ip):
            return
        key = address_key(self.client_ip)
        store = state.store()
        try:
            if wait or self.sentence is _UNREAD:      # else: read by this attempt's waiting call just before
                self.sentence = store.penalty(self.kind, key)
            sentence = self.sentence
            delay = rules.sentence(sentence, store.clock()) if wait else 0.0
            if failed:
                badness = store.add_penalty(self.kind, key, rules.after_failure, rules.keep, rules.decay)
                self.sentence = _UNREAD
                self.log.debug("BadGuys: %s now waits %.1fs", key, badness)
        except state.StateBusy as e:
            self.log.warning("BadGuys not applied: %s", e)
            return
        if delay > 0:
            stats.refused(self.kind, "badguys")
            self.log.info("BadGuys: answer delayed %.1fs (recent failed logins from this address)", delay)
            gevent.sleep(delay)
        if not failed and forgive and sentence is not None:
            try:
                store.forgive(self.kind, key)
                self.sentence = None
            except state.StateBusy as e:
                self.log.warning("BadGuys: %s not forgiven: %s", key, e)

    # ------------------------------------------------------------------ TLS
    def wrap_tls(self) -> None:
        """The server side of a TLS handshake on the client socket, all of it within
        HandshakeTimeout (a client that never sends its ClientHello, or trickles it), and before
        login within what is left of LoginTimeout: the handshake is part of that dialogue."""
        ctx = self.service.tls
        if ctx is None:
            raise ClientGone("TLS requested but not configured")
        seconds = float(self.cfg.HandshakeTimeout)
        login = self.reader if self.reader.deadline is not None and self.reader.phase == self.LOGIN_PHASE else None
        left = login.deadline - time.monotonic() if login is not None and login.deadline is not None else seconds
        try:
            if left <= 0:                # the handshake is not even started: the login time is up
                raise tls.HandshakeTimeout("no time left")
            self.sock = tls.handshake(ctx, self.sock, min(seconds, left), server_side=True)
        except tls.HandshakeTimeout as e:
            why = str(login.deadline_passed() if login is not None and left < seconds else e)
            raise ClientTimeout(why, phase="TLS handshake", answerable=False) from None
        except (OSError, ssl.SSLError) as e:
            raise ClientGone("TLS handshake failed: %s" % e) from None
        self.tls_active = True
        self.peer_cert = self.sock.getpeercert(binary_form=True) or None
        old = self.reader
        self.reader = LineReader(self.sock, self.max_line, old.idle, self.flush)
        self.reader.received = old.received
        self.reader.set_deadline(old.limit if old.deadline is not None else None, old.phase, old.deadline)

    def starttls(self) -> None:
        """After the protocol's go-ahead: drop anything pipelined in plaintext, then handshake."""
        self.flush()
        dropped = self.reader.take_pending()
        if dropped:
            self.log.warning("discarded %d bytes pipelined after STARTTLS", len(dropped))
        self.wrap_tls()

    @property
    def plaintext_refused(self) -> bool:
        """RestrictPlainPasswords and no TLS yet: no password may be sent in clear."""
        return bool(self.cfg.RestrictPlainPasswords) and not self.tls_active


def log_end_line(log: logging.LoggerAdapter, reason: str, state: str, describe: str, started: float,
                 received: int, sent: int) -> None:
    """``session end: <reason> (state <state>, <who>, <seconds>s, in <bytes from the client> B,
    out <bytes to the client> B)``, at DETAIL (LogLevel 2 and up), as Dovecot's disconnect line."""
    log.log(DETAIL, "session end: %s (state %s%s, %ds, in %d B, out %d B)", reason, state,
            ", " + describe if describe else "", time.monotonic() - started, received, sent)


def is_login_failure(e: BaseException) -> bool:
    """A login refused for its credentials (by the directory or by the store): counted per
    connection (MAX_AUTH_FAILURES) and per client address (BadGuys)."""
    return isinstance(e, AuthFailed) or (isinstance(e, StoreRefused) and e.bad_credentials)


_OUTCOMES: Dict[type, str] = {}


def outcome_of(e: BaseException) -> str:
    """A failed login's outcome as the metrics name it: failure_kind's words with underscores
    ("auth_failed", "store_unavailable"), worked out once per exception class."""
    try:
        return _OUTCOMES[type(e)]
    except KeyError:
        words = _OUTCOMES[type(e)] = failure_kind(e).replace(" ", "_")
        return words


def failure_kind(e: BaseException) -> str:
    """A few words for logs: why a login (or a relay) did not go through."""
    for cls, words in ((UnknownUser, "unknown user"), (AmbiguousUser, "ambiguous user"),
                       (AccountDisabled, "account disabled"), (AuthFailed, "auth failed"),
                       (AuthzFailed, "authorization identity refused"),
                       (AccountHeld, "account on hold"), (AccessDenied, "access denied"),
                       (AuthServerUnavailable, "authentication server unavailable"),
                       (DirectoryError, "directory error"),
                       (AuthTempFail, "directory unavailable"), (StoreRefused, "refused by store"),
                       (BackendError, "store unavailable")):
        if isinstance(e, cls):
            return words
    return type(e).__name__

