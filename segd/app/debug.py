"""Routes for the test suite only (``settings.test_hooks``; never mounted otherwise).

``POST /debug/wedge?seconds=N`` blocks the event loop for N seconds on purpose — the state a
deadlocked or CPU-starved server is in — so a test can watch the systemd watchdog pings stop.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query

router = APIRouter(prefix="/debug", tags=["debug"], include_in_schema=False)


@router.post("/wedge")
async def wedge(seconds: Annotated[float, Query(gt=0, le=60)] = 1.0) -> dict[str, float]:
    t0 = time.monotonic()
    time.sleep(seconds)  # blocking on the loop is the point
    return {"blocked_seconds": round(time.monotonic() - t0, 3)}
