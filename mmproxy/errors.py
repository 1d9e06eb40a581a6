"""The failure taxonomy.  Shared code raises these; each protocol turns them into replies in one
place (``reply_for``), after the model of Dovecot's ``login_proxy_failure_type``.

    MMProxyError
      ConfigError                 the configuration cannot be used
      ClientError                 about the client's connection or bytes
        ClientGone                  closed or reset: no reply is possible
        ClientTimeout               a deadline passed: the protocol's goodbye, then close
        ClientTooLong               over a size limit: the protocol's "too big" reply
        CommandError                one command refused; the session goes on (a bad command)
          ClientSyntaxError           does not parse
          UnknownCommand              no such verb
          NotNow                      a verb not valid in the session's state
          AuthCancelled               the client cancelled a SASL exchange ("*")
          MechanismUnsupported        AUTHENTICATE/AUTH with a mechanism we do not offer
          PrivacyRequired             a clear-text password before TLS (RestrictPlainPasswords)
      AuthFailed                  bad credentials (counted as a failed login)
        UnknownUser                 no such user or domain in the directory
        AmbiguousUser               the user search matched several entries
        AccountDisabled             the account's or domain's status refuses it (inactive, deleted...)
      AuthzFailed                 authorization identity differs (refused, not counted)
      AccessDenied                a verified user's access filter (TCPAccessAttr) refuses the login
      AuthTempFail                the directory could not answer (never a bad password)
        AccountHeld                 the account or its domain is on hold
        AuthServerUnavailable       the AuthenticationServer could not say (down, slow, garbage, TEMP)
        DirectoryUnavailable        no directory host answered (down, timed out, busy)
        DirectoryError              the directory answered with an error the proxy cannot use
      StoreRefused                the store said no to a replayed login; carries its reply
      BackendError                the store or SMTP relay behind the proxy
        BackendUnavailable          cannot connect, closed, timed out
          HandOverRefused             an SMTP relay will not take the real client (XCLIENT)
        BackendProtocolError        said something we cannot understand (or far too long)
      ServerShutdown              the daemon is stopping: say goodbye
"""
from __future__ import annotations

from typing import Optional


class MMProxyError(Exception):
    """Base of every error mmproxy raises on purpose."""


class ConfigError(MMProxyError):
    """The configuration cannot be used (bad file, bad value, missing mandatory value)."""


class ClientError(MMProxyError):
    """Something about the client's connection or what it sent."""


class ClientGone(ClientError):
    """The client closed, half-closed or reset the connection: end the session without a reply."""


class ClientTimeout(ClientError):
    """The client let a deadline pass (idle, or a phase that took too long): goodbye, then close.

    ``phase`` names the phase whose overall deadline passed ("" for an idle timeout); ``answerable``
    is false in the middle of a TLS handshake, where no protocol reply can reach the client.
    """

    def __init__(self, message: str, phase: str = "", answerable: bool = True) -> None:
        super().__init__(message)
        self.phase = phase
        self.answerable = answerable


class ClientTooLong(ClientError):
    """A line, string, literal or command over its limit.

    ``recoverable``: nothing of the oversized item is left unread (a synchronizing literal that was
    never invited, an SMTP line skipped to its end), so the session may go on; otherwise it ends.
    """

    def __init__(self, message: str, recoverable: bool = False) -> None:
        super().__init__(message)
        self.recoverable = recoverable


class CommandError(ClientError):
    """One command is refused and the session goes on; counts towards the bad-command budget.

    ``reply`` is the text after the protocol's status word (``BAD``, ``-ERR``, a 5xx code) when the
    protocol has no better one for the class.
    """

    def __init__(self, reply: str, detail: Optional[str] = None) -> None:
        super().__init__(detail or reply)
        self.reply = reply


class ClientSyntaxError(CommandError):
    """The command does not parse."""


class UnknownCommand(CommandError):
    """No such command."""


class NotNow(CommandError):
    """A command the protocol knows, but not in the session's present state."""


class AuthCancelled(CommandError):
    """The client answered a SASL challenge with ``*`` (RFC 4422 section 3.5)."""


class MechanismUnsupported(CommandError):
    """A SASL mechanism the proxy does not offer (now)."""


class PrivacyRequired(CommandError):
    """RestrictPlainPasswords: a password in clear text before TLS is refused unseen."""


class AuthFailed(MMProxyError):
    """Wrong user name or password (a permanent answer: NO [AUTHENTICATIONFAILED], -ERR [AUTH], 535)."""


class UnknownUser(AuthFailed):
    """No such user (or domain) in the directory: answered as a wrong password would be."""


class AmbiguousUser(AuthFailed):
    """The user search matched more than one entry: refused as a wrong password would be (the log
    says which search; fix the directory or SearchFormat)."""


class AccountDisabled(AuthFailed):
    """The account's or its domain's status (inactive, disabled, deleted, removed) refuses the
    login: answered as a wrong password would be, never revealing that the account exists."""


class AuthzFailed(MMProxyError):
    """The SASL authorization identity differs from the authentication identity."""


class AccessDenied(MMProxyError):
    """The user's access filter (``TCPAccessAttr``) refuses this client or service, and the
    password was verified (before that, the refusal is an AuthFailed: it must tell no more than a
    wrong password would)."""


class AuthTempFail(MMProxyError):
    """The directory could not answer: never reported as a bad password."""


class AccountHeld(AuthTempFail):
    """The account (or its domain) has the status ``hold`` (its mailbox is being moved): a
    temporary failure, once the password is verified where the proxy verifies it."""


class AuthServerUnavailable(AuthTempFail):
    """The third-party authentication server (AuthenticationServer) could not say: no connection,
    no whole answer in time, an answer not of the protocol, or its own TEMP.  Never a bad password."""


class DirectoryUnavailable(AuthTempFail):
    """No directory host of LdapURL answered within the deadline (down, timed out, busy), after
    failover: a temporary failure."""


class DirectoryError(AuthTempFail):
    """The directory answered with an error the proxy cannot use (BindDN refused, a referral, a
    refused filter, a limit): a temporary failure for the client, a configuration matter for the
    operator (the log line says which)."""


class StoreRefused(MMProxyError):
    """The store refused the replayed login.  ``reply`` is what the client is told (the store's own
    words under the client's tag); ``bad_credentials`` whether it counts as a failed login."""

    def __init__(self, reply: bytes, bad_credentials: bool) -> None:
        super().__init__(reply.decode("utf-8", "replace")[:200])
        self.reply = reply
        self.bad_credentials = bad_credentials


class BackendError(MMProxyError):
    """The store (IMAP, POP) or relay (SMTP) behind the proxy failed."""


class BackendUnavailable(BackendError):
    """The store or relay could not be reached, closed, or did not answer in time."""


class HandOverRefused(BackendUnavailable):
    """An SMTP relay will not take the real client (no XCLIENT for the proxy, or XCLIENT refused)."""


class BackendProtocolError(BackendError):
    """The store or relay said something we could not understand (or a line far too long)."""


class ServerShutdown(MMProxyError):
    """The daemon is stopping: each session says the protocol's goodbye."""
