r"""A whole Flower federation on this machine: one SuperLink, N SuperNodes, one run.

    python -m floranna_jax.flower.local --config=configs/glue.py:smoke \
        --workdir=runs/flower --certs=runs/flower_certs

writes each client's data to ``WORKDIR/data/client_<u>.npz`` (:mod:`shards`), starts
``flower-superlink`` (on a free port unless ``--port``) and one SuperNode (:mod:`node`) per
client as separate processes (each node's ``data-path`` points at its own file), each with
a warm ClientApp process (:mod:`warm_node`; ``--nowarm``: Flower's process per message),
submits the app in ``flower_app/`` with ``flwr run`` and streams its log, then stops every
process it started (on Ctrl-C too, within seconds, with one line). The server writes
``WORKDIR/run/metrics.jsonl`` (one row per round) and its checkpoints there. TLS is the
default: ``--certs`` names a folder with ``ca.crt``, ``server.pem`` and ``server.key``
(a localhost CA is created there when it is empty); ``--insecure`` is for tests on
localhost only. Overrides work as in ``launch.py``: ``--config.server.name=fedit``.

Processes and logs: ``WORKDIR/logs/{superlink,node_<u>,warm_<u>,run}.log``; Flower's own state
(installed app bundles, its CLI config) in ``WORKDIR/flwr_home``; all processes share one
XLA compilation cache (``WORKDIR/xla_cache``), so a step one node compiled is loaded by the
others.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import NamedTuple

import tomli_w
from absl import app, flags
from ml_collections import config_flags

from floranna_jax.errors import ConfigError
from floranna_jax.flower import shards

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the folder holding this floranna_jax
APP_DIR = ROOT / "flower_app"
CONNECTION = "floranna-local"
CERT_FILES = ("ca.crt", "server.pem", "server.key")
# flower-supernode without its fixed 3 s wait for the next message (node.py)
NODE = [sys.executable, "-m", "floranna_jax.flower.node"]


class Federation(NamedTuple):
    """The processes of a local federation and where Flower's CLI finds its SuperLink."""

    superlink: subprocess.Popen
    nodes: list[subprocess.Popen]
    executors: list[subprocess.Popen]  # warm_node processes, one per SuperNode (warm=True)
    runs: list[subprocess.Popen]  # the ``flwr run`` processes of :func:`submit`
    env: dict[str, str]
    logs: pathlib.Path


def make_certs(folder: pathlib.Path) -> None:
    """A localhost CA (``ca.crt``) and a server key and certificate it signs for 127.0.0.1
    and localhost (``server.key``, ``server.pem``): TLS for a federation on one machine."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(subject, issuer, key, signer, ca: bool):
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("floranna local CA"), name("floranna local CA"), ca_key, ca_key, ca=True)
    server_cert = cert(name("localhost"), ca.subject, key, ca_key, ca=False)
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (folder / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip


def _tls_args(certs: pathlib.Path | None) -> tuple[list[str], list[str], dict]:
    """SuperLink flags, SuperNode flags and the CLI connection's TLS fields."""
    if certs is None:
        return ["--insecure"], ["--insecure"], {"insecure": True}
    missing = [f for f in CERT_FILES if not (certs / f).is_file()]
    if missing:
        raise ConfigError(f"--certs: {certs} lacks {', '.join(missing)}")
    ca, pem, key = (str((certs / f).resolve()) for f in CERT_FILES)
    link = ["--ssl-ca-certfile", ca, "--ssl-certfile", pem, "--ssl-keyfile", key]
    return link, ["--root-certificates", ca], {"root-certificates": ca}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago (all bound at once,
    so that no two are the same)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"flower-superlink did not open port {port} in {timeout_s:.0f} s")


def _spawn(args: list[str], log: pathlib.Path, env: dict) -> subprocess.Popen:
    """``args`` in a session of its own (so stopping it stops its ClientApp children)."""
    with open(log, "w") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip


def process_env(home: pathlib.Path, xla_cache: pathlib.Path) -> dict[str, str]:
    """The environment of every Flower process: this environment, plus the floranna_jax
    this launcher runs on PYTHONPATH, Flower's home, one XLA cache, and this Python's
    folder first on PATH, where a virtual environment keeps ``flower-superlink``,
    ``flower-supernode`` and ``flwr`` (found there even when it is not activated)."""
    path = os.environ.get("PATH", os.defpath)
    return os.environ | {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), path]),
        # Every process imports the floranna_jax this launcher runs, whatever is installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "FLWR_HOME": str(home),
        "JAX_COMPILATION_CACHE_DIR": str(xla_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


@contextlib.contextmanager
def federation(
    workdir: pathlib.Path,
    data_paths: list[str],
    port: int | None,
    certs: pathlib.Path | None,
    xla_cache: pathlib.Path | None = None,
    warm: bool = True,
) -> Iterator[Federation]:
    """A SuperLink on ``port`` (``None``: a free one) and one SuperNode per data file, all
    stopped on exit (:func:`stop_all`); every process compiles into ``xla_cache`` (default
    ``workdir/xla_cache``). SuperNodes take the ports after ``port``, or free ones. ``warm``:
    each node's ClientApp messages run in one long-lived process (:mod:`warm_node`), else
    Flower's default, a new process per message."""
    home, logs = workdir / "flwr_home", workdir / "logs"
    home.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    link_tls, node_tls, connection = _tls_args(certs)
    if port is None:
        port, *node_ports = free_ports(1 + len(data_paths))
    else:
        node_ports = [port + 1 + i for i in range(len(data_paths))]
    address = f"127.0.0.1:{port}"
    link = {"address": address, **connection}
    settings = {"superlink": {"default": CONNECTION, CONNECTION: link}}
    (home / "config.toml").write_text(tomli_w.dumps(settings))
    env = process_env(home, xla_cache or workdir / "xla_cache")
    superlink = _spawn(["flower-superlink", *link_tls, "--port", str(port),
                        "--disable-runtime-dependency-installation"],
                       logs / "superlink.log", env)  # fmt: skip
    nodes: list[subprocess.Popen] = []
    fed = Federation(superlink, nodes, [], [], env, logs)
    isolation = ["--isolation", "process"] if warm else []
    try:
        _wait_for_port(port, superlink)
        for i, path in enumerate(data_paths):
            node_config = f'data-path="{os.path.abspath(path)}"'
            nodes.append(_spawn([*NODE, *node_tls, *isolation, "--superlink", address,
                                 "--port", str(node_ports[i]), "--node-config", node_config],
                                logs / f"node_{i}.log", env))  # fmt: skip
            if warm:
                runtime = f"127.0.0.1:{node_ports[i]}"
                fed.executors.append(_spawn([sys.executable, "-m", "floranna_jax.flower.warm_node",
                                             runtime], logs / f"warm_{i}.log", env))  # fmt: skip
        yield fed
    finally:
        stop_all([*fed.runs, *fed.executors, *nodes, superlink])


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def stop_all(processes: list[subprocess.Popen], grace_s: float = 1.5) -> None:
    """SIGTERM ``processes`` with their sessions and every descendant (Flower starts some,
    such as the SuperLink's ``flwr-serverapp``, in sessions of their own) at once, and
    SIGKILL whatever is alive after ``grace_s``; waits for them. The grace is short because
    nothing here needs a clean exit: the server's checkpoints are written when saved, and a
    SuperNode's graceful exit waits on its connection to a SuperLink that is stopping."""
    import psutil  # an orbax-checkpoint dependency

    descendants = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants += psutil.Process(p.pid).children(recursive=True)
    for p in processes:
        _signal_group(p, signal.SIGTERM)
    for d in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            d.terminate()
    deadline = time.monotonic() + grace_s
    for p in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    _, alive = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        _signal_group(p, signal.SIGKILL)  # also the children of a leader that already exited
        p.wait()
    for d in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            d.kill()
    # A child of another parent is reaped by that parent (or by no one, in a container whose
    # init does not): dead means gone or a zombie, which psutil.wait_procs would wait out.
    deadline = time.monotonic() + 2.0
    while not all(map(_dead, alive)) and time.monotonic() < deadline:
        time.sleep(0.01)


def _dead(process) -> bool:
    """Whether a ``psutil.Process`` has ended: gone, or a zombie not yet reaped."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``process``'s session (it and its children) and wait for it."""
    _signal_group(process, sig)
    process.wait()


def submit(fed: Federation, run_config: dict, log: pathlib.Path, app_dir=APP_DIR):
    """``flwr run`` of the app with ``run_config`` overrides; its log streams to ``log``.
    Returns the ``flwr run`` process (it exits when the run ends)."""
    overrides = log.with_suffix(".toml")
    overrides.write_text(tomli_w.dumps(run_config))
    args = ["flwr", "run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--stream"]
    fed.runs.append(_spawn(args, log, fed.env))
    return fed.runs[-1]


def run_status(fed: Federation, log: pathlib.Path) -> dict:
    """Flower's record of the run ``flwr run`` started into ``log`` (``flwr ls``): its
    ``status`` (``finished:completed`` on success; ``flwr run`` itself exits 0 either way)
    and ``network-traffic`` (bytes in and out of the SuperLink)."""
    found = re.search(r"Successfully started run (\d+)", log.read_text())
    if found is None:
        return {"status": "not started", "network-traffic": {}}
    args = ["flwr", "ls", CONNECTION, "--run-id", found.group(1), "--format", "json"]
    out = subprocess.run(args, env=fed.env, capture_output=True, text=True, check=False)
    return json.loads(out.stdout)["runs"][0]


def run_config(config, workdir: pathlib.Path, **options) -> dict:
    """The run config of ``config``: the experiment as JSON, the server's workdir, and any
    of the server's ``options`` (``round-timeout-s``, ``retries``, ...; runconfig.py)."""
    return {"experiment": config.to_json(), "workdir": str(workdir), **options}


def define_flags() -> SimpleNamespace:
    """The command line's flags; defined when run as a program, so that importing this
    module defines none (another module's ``--config`` may be defined in the process)."""
    return SimpleNamespace(
        config=config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:arg]"),
        workdir=flags.DEFINE_string("workdir", None, "folder for data, logs and results"),
        nodes=flags.DEFINE_integer("nodes", None, "SuperNodes, one per client (num_clients)"),
        port=flags.DEFINE_integer(
            "port", None, "SuperLink port (default: a free one); SuperNodes use the next ones"
        ),
        certs=flags.DEFINE_string("certs", None, "TLS folder: ca.crt, server.pem, server.key"),
        insecure=flags.DEFINE_bool("insecure", False, "no TLS (tests on localhost only)"),
        timeout=flags.DEFINE_float("round_timeout_s", 600.0, "seconds to wait for replies"),
        retries=flags.DEFINE_integer("retries", 0, "times a silent client is asked again"),
        min_replies=flags.DEFINE_integer("min_replies", 1, "fewer accepted uploads stop the run"),
        warm=flags.DEFINE_bool(
            "warm",
            True,
            "one long-lived ClientApp process per node "
            "(warm_node.py); --nowarm: Flower's new process per message",
        ),
    )


def _certs(cli: SimpleNamespace) -> pathlib.Path | None:
    if cli.insecure.value == (cli.certs.value is not None):
        raise ConfigError("--certs: give a TLS folder (the default), or --insecure, not both")
    if cli.insecure.value:
        return None
    certs = pathlib.Path(cli.certs.value)
    if not certs.exists() or not any(certs.iterdir()):
        make_certs(certs)
    return certs


def main(argv, cli: SimpleNamespace) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = cli.config.value
    workdir = pathlib.Path(cli.workdir.value or "runs/flower").resolve()
    try:
        nodes = cli.nodes.value or config.partition.num_clients
        if nodes != config.partition.num_clients:
            raise ConfigError(
                f"--nodes: {nodes} SuperNodes for partition.num_clients="
                f"{config.partition.num_clients}; one SuperNode per client"
            )
        certs = _certs(cli)
        paths = shards.write(config, str(workdir / "data"))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    options = {"round-timeout-s": cli.timeout.value, "retries": cli.retries.value,
               "min-replies": cli.min_replies.value}  # fmt: skip
    try:
        with federation(workdir, paths, cli.port.value, certs, warm=cli.warm.value) as fed:
            run = submit(fed, run_config(config, workdir / "run", **options), fed.logs / "run.log")
            run.wait()
            status = run_status(fed, fed.logs / "run.log")
    except KeyboardInterrupt:  # the federation's exit has stopped every process by now
        print(f"interrupted: stopped the SuperLink, its SuperNodes and the run; logs: "
              f"{workdir / 'logs'}", file=sys.stderr)  # fmt: skip
        sys.exit(130)
    print((fed.logs / "run.log").read_text())
    print(f"run {status['status']}; results: {workdir / 'run'} (metrics.jsonl, summary.md); "
          f"logs: {fed.logs}")  # fmt: skip
    sys.exit(0 if status["status"] == "finished:completed" else 1)


if __name__ == "__main__":
    _cli = define_flags()
    app.run(lambda argv: main(argv, _cli))
