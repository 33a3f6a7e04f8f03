"""How the tests start the processes they signal, whatever state the suite was started in."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """`preexec_fn`: the child gets SIGINT's default disposition before exec.

    A suite started as a background job (`make test &`), under nohup or by a launcher has
    SIGINT ignored, and a child inherits an ignored signal (Python then leaves Ctrl-C
    ignored), so a test that sends Ctrl-C to a child must give it the default first.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
