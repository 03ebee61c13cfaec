"""Ctrl+C must reach the caller as ``KeyboardInterrupt``.

Lightning's Trainer answers an interrupt with a graceful shutdown that ends in ``sys.exit(1)`` and leaves
SIGINT ignored, so ``except KeyboardInterrupt`` in a script or notebook never runs. The writers restore
the weights before that shutdown; here the interrupt is given back its own type and SIGINT its handler.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def call_trainer(entry_point: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``entry_point(*args, **kwargs)`` (``trainer.fit``, ``trainer.predict``, ...), re-raising interrupts."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        return entry_point(*args, **kwargs)
    except SystemExit as exit_:
        interrupt = exit_.__context__
        if isinstance(interrupt, KeyboardInterrupt):
            raise interrupt.with_traceback(interrupt.__traceback__) from None
        raise
    finally:
        if handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)
