"""Benchmarks for kombu_rpc against hand-written baselines, run as ``python -m benchmarks``.

Each scenario (sequential calls, pipelined calls, casts, payload sizes, threads sharing a
proxy, one vs two server processes, proxy memory, idle CPU) runs on each chosen broker.
Where a baseline makes sense, kombu_rpc alternates rounds with it on the same broker: the
RabbitMQ tutorial-6 client and server written with pika (AMQP only), and the smallest
raw-kombu request/reply loop (every broker). ``python -m benchmarks --help`` lists the
options; ``docs/performance.md`` shows a full run and how to read it.

Nothing here imports pika until an AMQP baseline runs.
"""
