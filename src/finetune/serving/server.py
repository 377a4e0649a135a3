"""Running the web app: a listening socket bound before anything starts (a taken port is one clear error), and
uvicorn serving on it until SIGINT/SIGTERM, which stop taking new connections, finish the requests in flight and
return; a second signal ends the process at once."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import threading

from finetune.errors import ResourceError, UsageError

GRACE_S = 30  # in-flight requests get this long to finish after a stop signal


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be between 0 and 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ResourceError(f"--host {host} --port {port}: cannot listen ({e.strerror}); choose another --port, "
                            "or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """True when only this machine can reach host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(app, sock: socket.socket, access_log: bool = False) -> int | None:
    """Serve app on sock until a stop signal; returns that signal's number (None if it stopped otherwise)."""
    import uvicorn

    class Server(uvicorn.Server):
        stop_signal: int | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version re-raises the signal after shutting down, which would turn a clean stop
            # into a death by signal; here the first signal stops gracefully and a second one at once.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def on_signal(self, sig, frame) -> None:
            if self.should_exit:
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)
                return
            self.stop_signal, self.should_exit = sig, True

    config = uvicorn.Config(app, log_config=None, access_log=access_log, timeout_graceful_shutdown=GRACE_S,
                            server_header=False, lifespan="on")
    server = Server(config)
    server.run(sockets=[sock])
    return server.stop_signal
