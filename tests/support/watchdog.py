"""Where a hung async test was: every task's stack, printed before pytest-timeout strikes.

pytest-timeout's report of a hang in an async test shows the event loop's frame and nothing
of the coroutines it runs. A block wrapped in ``stacks_printed_after`` prints each task's
stack to stderr once it has run ``seconds`` (the test goes on; pytest shows the output with
the failure).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


@asynccontextmanager
async def stacks_printed_after(seconds: float) -> AsyncIterator[None]:
    async def watch() -> None:
        await asyncio.sleep(seconds)
        print(f"--- still running after {seconds:g} s; every task's stack:", file=sys.stderr)
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                print(f"--- task {task.get_name()}", file=sys.stderr)
                task.print_stack(file=sys.stderr)

    watcher = asyncio.create_task(watch(), name="watchdog")
    try:
        yield
    finally:
        watcher.cancel()
