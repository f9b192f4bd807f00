"""Running an iterator ahead of its consumer, in a background thread behind a bounded queue.

Both stages use it: training to read and decode cache batches while the GPU steps, extraction
to tokenise chat records while the target runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

__all__ = ["prefetch"]


def prefetch(items: Iterator, depth: int = 4) -> Iterator:
    """Run ``items`` in a background thread, keeping at most ``depth`` results ahead.

    Closing the returned generator (or dropping it) stops the producer, closes ``items`` (so its
    own threads shut down) and joins the thread: nothing keeps reading after the consumer ends.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            else:
                buffer.put(done)
        except BaseException as err:  # re-raised in the consumer
            buffer.put(err)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="talon-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.1)
