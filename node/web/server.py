"""The web service run inside ``musclenode serve``: uvicorn in a background thread."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)


class WebServer:
    """uvicorn serving :func:`node.web.app.create_app` on ``host:port`` in a thread."""

    def __init__(self, engine: Engine, data_dir: Path, host: str, port: int):
        import uvicorn

        from .app import create_app
        self.app = create_app(engine, data_dir)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="musclenode-web", daemon=True)

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen when the configuration said 0)."""
        servers = getattr(self.server, "servers", [])
        for s in servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return int(self.server.config.port)

    def start(self, timeout: float = 30.0) -> WebServer:
        """Start serving; returns once the socket listens."""
        self.thread.start()
        end = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > end:
                raise RuntimeError(f"the web service did not start on {self.server.config.host}:"
                                   f"{self.server.config.port}")
            time.sleep(0.05)
        log.info("web service on http://%s:%d", self.server.config.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
