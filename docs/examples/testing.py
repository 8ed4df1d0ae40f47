"""Testing served functions on memory://: ``pytest docs/examples/testing.py``.

Running this file with python runs pytest on it.
"""

import uuid
from collections.abc import Iterator

import pytest

from kombu_rpc import MethodNotFound, Registry, RPCProxy, RPCServer

registry = Registry()


@registry.remote(name="math.add")
def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture
def proxy() -> Iterator[RPCProxy]:
    # memory:// is shared by the whole process: a fresh queue name per test keeps
    # requests left over by one test away from the next.
    queue = f"test-{uuid.uuid4().hex}"
    server = RPCServer("memory://", registry=registry, queue=queue)
    with server.running(), RPCProxy("memory://", queue=queue, timeout=5) as proxy:
        yield proxy


def test_add(proxy: RPCProxy) -> None:
    assert proxy.math.add(2, 3) == 5


def test_unknown_function(proxy: RPCProxy) -> None:
    with pytest.raises(MethodNotFound):
        proxy.math.sub(2, 3)


def test_still_a_plain_function() -> None:
    assert add(2, 3) == 5  # no broker needed to test the function itself


if __name__ == "__main__":
    import subprocess
    import sys

    # In a new interpreter, so pytest loads its plugins before kombu_rpc is imported.
    raise SystemExit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q"]))
