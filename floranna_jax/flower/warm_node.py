"""A warm client: one long-lived process runs a SuperNode's every ClientApp message.

flwr 1.42 has no long-running ClientApp: by default (``--isolation subprocess``) a SuperNode
starts ``flower-superexec``, which starts one ``flwr-clientapp`` process per message; that
process imports JAX, builds the model and loads its compiled step, every round. With
``--isolation process`` the node starts no executor and waits for one to take its tasks
from its Runtime API (``--port``); this module is that executor:

    python -m floranna_jax.flower.node --isolation process --port 9095 ...   # the node
    python -m floranna_jax.flower.warm_node 127.0.0.1:9095     # beside it, on its machine

It asks the node for ClientApp tasks and runs each with :data:`client_app.app` in this
process, so ``client_app.build_job``'s cache (the model and the jitted ``local_update``)
lives across rounds and runs. It asks every 0.05 s after a task, backing off to once a
second when idle, and retries a message's arrays the node has not stored yet after 0.05 s,
not Flower's 1 s (:mod:`waits`). It uses the runtime-client functions of
``flwr.supernode.runtime.run_clientapp`` (internal to flwr 1.42; the deployed tests in
``tests/test_flower.py`` run through them). A failing message is answered with an error
reply, as Flower's own ClientApp process does; the loop goes on.
"""

from __future__ import annotations

import sys
import time
from logging import ERROR, INFO

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as flwr_runtime

from floranna_jax.flower import waits

LAST_S = 1.0  # the longest wait between asks for a task, Flower's SuperExec's fixed one


def _client(address: str, *interceptors) -> RuntimeHttpClient:
    """A client of the node's Runtime API (plain HTTP: it listens on this machine)."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      *interceptors],
        retry_invoker=make_simple_http_retry_invoker(),
    )  # fmt: skip


def run_task(address: str, token: str) -> None:
    """Pull the message and context of the task ``token`` names, run the ClientApp on it in
    this process and push the reply and the updated context (its state) back."""
    from floranna_jax.flower import client_app  # JAX and the model, once per process

    client = _client(address, RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, status, details = None, SubStatus.FAILED, ""
    t0 = time.perf_counter()
    try:
        message, context, _, _ = flwr_runtime.pull_task_input(client)
        t1 = time.perf_counter()
        try:
            reply = client_app.app(message=message, context=context)
            status = SubStatus.COMPLETED
        except Exception as e:  # noqa: BLE001 - the server is told, as Flower's own process does
            log(ERROR, "ClientApp raised an exception", exc_info=e)
            details = f"{type(e)}:<'{e}'>"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details), reply_to=message)
        t2 = time.perf_counter()
        flwr_runtime.push_message(client, reply, context)
        log(INFO, "%s message: pulled in %.2f s, ran in %.2f s, pushed in %.2f s",
            message.metadata.message_type, t1 - t0, t2 - t1, time.perf_counter() - t2)  # fmt: skip
    finally:
        flwr_runtime.push_task_output(client, context, status, details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()


def serve(address: str) -> None:
    """Take the ClientApp tasks of the node whose Runtime API is at ``address``, forever."""
    client = _client(address)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    # Asks soon after a task (the next message of the round follows), rarely when idle.
    wait, reset = waits.make_backoff(waits.FIRST_S, LAST_S)
    log(INFO, "warm ClientApp executor on the Runtime API at %s", address)
    while True:
        res = client.AcquireTask(request)
        if res.HasField("task") and res.token:
            try:
                run_task(address, res.token)
            except Exception as e:  # noqa: BLE001 - a lost task must not stop the node's executor
                log(ERROR, "task lost: %s", e)
            reset()
        else:
            wait()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(
            "usage: python -m floranna_jax.flower.warm_node HOST:PORT (the SuperNode's --port)"
        )
    waits.check_version()
    waits.quicken_pulls(flwr_runtime, "pull_and_inflate_object_from_tree")  # a task's message
    serve(sys.argv[1])
