"""mmproxy: an IMAP4/POP3/SMTP front-end proxy that reads Messaging Multiplexor configuration."""

__version__ = "0.2.0"
