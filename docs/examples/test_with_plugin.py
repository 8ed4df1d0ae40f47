"""Testing remote functions with the kombu_rpc pytest plugin.

Run it with ``pytest docs/examples/test_with_plugin.py``; from a source checkout that is
not installed, add ``-p kombu_rpc.testing.pytest_plugin``. Running this file with
python runs pytest on it.
"""

import subprocess
import sys
import threading

import pytest

from kombu_rpc import MethodNotFound, Registry, RemoteError, RPCProxy, RPCServer, remote


# The functions under test. In an application they live in a module of their own,
# which the test module imports.
@remote(name="math.add")
def add(a: int, b: int) -> int:
    return a + b


@remote
def divide(a: float, b: float) -> float:
    return a / b


def test_add(rpc_proxy: RPCProxy) -> None:
    assert rpc_proxy.math.add(2, 3) == 5


def test_remote_errors(rpc_proxy: RPCProxy) -> None:
    with pytest.raises(RemoteError) as info:
        rpc_proxy.divide(1, 0)
    assert info.value.exc_type == "ZeroDivisionError"
    with pytest.raises(MethodNotFound):
        rpc_proxy.math.sub(2, 3)


def test_a_function_for_one_test(rpc_registry: Registry, rpc_proxy: RPCProxy) -> None:
    seen: list[str] = []

    @rpc_registry.remote  # this test's registry only: other tests do not serve it
    def record(value: str) -> None:
        seen.append(value)

    rpc_proxy.record("hello")  # returns once the server has run it
    assert seen == ["hello"]


barrier = threading.Barrier(2, timeout=5)


def meet() -> int:
    return barrier.wait()  # returns only once two calls are waiting here


@pytest.mark.rpc(functions=[meet], concurrency=2, timeout=10)
def test_calls_run_concurrently(rpc_server: RPCServer, rpc_proxy: RPCProxy) -> None:
    assert rpc_server.registry.names() == ["meet"]
    calls = [rpc_proxy.meet.call_async() for _ in range(2)]
    assert sorted(call.result() for call in calls) == [0, 1]


if __name__ == "__main__":
    from kombu_rpc.testing import pytest_plugin_args

    # In a new interpreter: importing this file a second time in this one would
    # register add and divide with @remote again, which is refused.
    command = [sys.executable, "-m", "pytest", __file__, "-q", *pytest_plugin_args()]
    raise SystemExit(subprocess.call(command))
