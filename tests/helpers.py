"""What several test files share (imported from here, not from conftest.py, whose body pytest
runs as a plugin of its own)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOMEDEPOT = Path(os.environ.get("HOMEDEPOT_DIR", REPO.parent / "shared" / "data" / "homedepot"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
