"""kombu's ``filesystem://`` transport, with message files that appear only once whole
(used for ``filesystem://`` unless :func:`check` finds that kombu changed; see
:mod:`kombu_rpc._transports`).

kombu's channel creates a message file under its final name and then writes it, and a
consumer reads files without a lock, so a consumer in another process can take the file
while it is still empty: the read fails (``JSONDecodeError``) and the message is gone,
as kombu has already moved the file away. :class:`Channel` writes the file under a name
no queue matches and renames it into place (atomic on POSIX and Windows), so no
consumer ever sees it half-written. Names, order and folders are kombu's.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import uuid
from time import monotonic
from typing import Any

from kombu import Connection
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps

__all__ = ["Channel", "Transport", "check"]


class Channel(filesystem.Channel):  # type: ignore[misc]
    """kombu's filesystem channel, whose message files are written, then renamed."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """Write ``payload`` as a message of ``queue``: kombu's file name (creation
        time, then a uuid, so files sort in the order they were put), reached by a
        rename."""
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        folder = self.data_folder_out
        partial = os.path.join(folder, f".partial-{uuid.uuid4()}")  # matches no queue
        try:
            with open(partial, "wb") as file:
                file.write(dumps(payload).encode())
            os.replace(partial, os.path.join(folder, name))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


class Transport(filesystem.Transport):  # type: ignore[misc]
    """kombu's filesystem transport with :class:`Channel`."""

    Channel = Channel


def check() -> str | None:
    """``None`` if kombu's filesystem channel still puts through ``_put`` and reads the
    file names :class:`Channel` writes; else what is wrong."""
    base = filesystem.Channel
    params = list(inspect.signature(base._put).parameters) if callable(getattr(base, "_put", None)) else []
    if params[:3] != ["self", "queue", "payload"]:
        return f"kombu.transport.filesystem.Channel._put takes {params}"
    with tempfile.TemporaryDirectory(prefix="kombu_rpc-check-") as folder:
        control = os.path.join(folder, "control")  # kombu's default is in the working directory
        os.mkdir(control)
        options = {"data_folder_in": folder, "data_folder_out": folder, "control_folder": control}
        try:
            with Connection(transport=Transport, transport_options=options) as conn:
                # a name of its own: kombu remembers exchanges declared in the process
                queue = conn.SimpleQueue(f"kombu_rpc.check.{uuid.uuid4().hex}", no_ack=True)
                queue.put({"n": 1}, serializer="json")
                got = queue.get(timeout=1).payload
                queue.close()
        except Exception as exc:
            return f"a message through a folder failed: {type(exc).__name__}: {exc}"
    return None if got == {"n": 1} else f"a message through a folder came back as {got!r}"
