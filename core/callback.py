"""Progress callbacks for ``ChatModule.generate`` (the seed's interface).

``generate`` calls ``callback(message=<whole reply so far>)`` every ``callback_interval`` tokens
and ``callback(stopped=True)`` at the end; :class:`DeltaCallback` turns that into deltas.
"""

from __future__ import annotations

import sys


class DeltaCallback:
    """Base class: override ``delta_callback(delta)`` and ``stopped_callback()``."""

    callback_interval = 1

    def __init__(self):
        self.curr_message = ""

    def __call__(self, message: str = "", stopped: bool = False):
        if stopped:
            self.stopped_callback()
            self.curr_message = ""
            return
        delta = message[len(self.curr_message):] if message.startswith(self.curr_message) else message
        self.curr_message = message
        if delta:
            self.delta_callback(delta)

    def delta_callback(self, delta_message: str):
        raise NotImplementedError

    def stopped_callback(self):
        raise NotImplementedError


class StreamToStdout(DeltaCallback):
    """Print the reply as it is generated, every ``callback_interval`` tokens."""

    def __init__(self, callback_interval: int = 2):
        super().__init__()
        self.callback_interval = max(1, int(callback_interval))

    def delta_callback(self, delta_message: str):
        sys.stdout.write(delta_message)
        sys.stdout.flush()

    def stopped_callback(self):
        sys.stdout.write("\n")
        sys.stdout.flush()
