"""Test-session environment: development mode, and no deployment secrets inherited from the shell.

``BRAINSCAN_ENV=development`` lets tests build the services in-process (``create_app(Settings(...))``)
without secrets; those apps then run without internal authentication. The servers that
tests/servers.py and tests/redis_server.py start get a token and a password all the same, so the
real stack is always tested with its trust boundary on (and a test of production mode sets
``BRAINSCAN_ENV=production`` itself).
"""

from __future__ import annotations

import os

os.environ["BRAINSCAN_ENV"] = "development"
for _secret in ("BRAINSCAN_INTERNAL_TOKEN", "BRAINSCAN_REDIS_PASSWORD"):
    os.environ.pop(_secret, None)
