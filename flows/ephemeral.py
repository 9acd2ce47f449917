"""Keep the console of a successful run clean on Prefect's temporary (ephemeral) server.

When the temporary server stops at interpreter exit, Prefect 3.8's task-run recorder cancels
its periodic flush. A flush caught mid-write logs "Error flushing N events (N to retry,
0 dropped)" with a CancelledError traceback, then re-queues the batch and writes it in its
final flush. Nothing is lost, but users read a traceback as a failure. This filter hides
exactly that record; any event that is really dropped ("M dropped" with M > 0, or "Dropping
event ...") still reaches the console.
"""

from __future__ import annotations

import asyncio
import logging
import re

RECORDER_LOGGER = "prefect.server.services.task_run_recorder"
_RETRIED_ONLY = re.compile(r"^Error flushing \d+ events \(\d+ to retry, 0 dropped\)$")


class RetriedFlushFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        cancelled = record.exc_info is not None and isinstance(record.exc_info[1], asyncio.CancelledError)
        return not (cancelled and _RETRIED_ONLY.match(record.getMessage()))


def install_quiet_shutdown() -> None:
    logger = logging.getLogger(RECORDER_LOGGER)
    if not any(isinstance(f, RetriedFlushFilter) for f in logger.filters):
        logger.addFilter(RetriedFlushFilter())
