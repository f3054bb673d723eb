"""Run the OpenAI HTTP app on uvicorn in a thread of the server process, beside gRPC.

The socket is bound here (through :func:`ports.listen`), so a taken port fails with the same
one-line error as the gRPC and metrics ports instead of uvicorn's exit from inside a thread.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .ports import listen


class HttpServer:
    def __init__(self, app: Any, host: str, port: int):
        import uvicorn

        self.socket = listen(host, port, "--http-port")
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", ws="none")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="adapterhub-http", daemon=True)

    def start(self, timeout: float = 30.0) -> "HttpServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start; see the log above")
            time.sleep(0.01)
        return self

    def stop(self, grace: float) -> None:
        """Stop accepting; requests in flight (streams too) get ``grace`` seconds to finish."""
        self.server.config.timeout_graceful_shutdown = grace
        self.server.should_exit = True
        self.thread.join(grace + 5)
        self.socket.close()
