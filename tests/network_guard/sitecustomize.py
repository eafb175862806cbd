"""Refuse every connection that leaves the machine: installed in the test session by conftest.py and, as
`sitecustomize` on PYTHONPATH, in every Python process the tests start (CLIs, `accelerate launch`, the kill tests).
The machine's own host name counts as local, since torchrun resolves it to set up its rendezvous."""

import socket

_LOCAL_PREFIXES = ("127.", "::1", "localhost")
_HOST_NAME = socket.gethostname()


class NetworkBlockedError(RuntimeError):
    pass


def _is_local(address):
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = str(address[0]) if address else ""
    return host in ("", _HOST_NAME) or host.startswith(_LOCAL_PREFIXES)


def _guard(real, action, target_of):
    def guarded(*args, **kwargs):
        target = target_of(*args, **kwargs)
        if target is not None and not _is_local(target):
            raise NetworkBlockedError(f"Tests may not reach the network (tried to {action} {target!r}).")
        return real(*args, **kwargs)

    return guarded


socket.socket.connect = _guard(socket.socket.connect, "connect to", lambda self, address, *a, **k: address)
socket.socket.connect_ex = _guard(socket.socket.connect_ex, "connect to", lambda self, address, *a, **k: address)
socket.create_connection = _guard(socket.create_connection, "connect to", lambda address, *a, **k: address)
socket.getaddrinfo = _guard(socket.getaddrinfo, "resolve", lambda host, *a, **k: None if host is None else (host,))
