"""The failure taxonomy.  Shared code raises these; each protocol maps them to replies in one place."""


class MMProxyError(Exception):
    """Base of every error mmproxy raises on purpose."""


class ConfigError(MMProxyError):
    """The configuration cannot be used (bad file, bad value, missing mandatory value)."""


class ClientSyntaxError(MMProxyError):
    """The client sent something that does not parse: answered with BAD/-ERR/5xx, the session survives."""


class ClientTooLong(ClientSyntaxError):
    """A line or literal over its limit."""


class ClientGone(MMProxyError):
    """The client closed, half-closed or timed out: end the session without a reply."""


class AuthFailed(MMProxyError):
    """Wrong user name or password (a permanent answer: NO [AUTHENTICATIONFAILED], -ERR [AUTH], 535)."""


class AuthTempFail(MMProxyError):
    """The directory could not answer: never reported as a bad password."""


class BackendUnavailable(MMProxyError):
    """The store could not be reached or did not greet."""


class BackendProtocolError(MMProxyError):
    """The store said something we could not understand."""
