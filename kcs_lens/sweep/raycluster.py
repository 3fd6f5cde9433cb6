"""Joining a Ray cluster for ``sweep --executor ray``, and checking it before any cell runs.

- :func:`connect`: ``ray.init`` with its failures as one :class:`~kcs_lens.errors.ConfigError`
  line naming the fix: nothing listening at ``--ray-address`` (found by a TCP probe within
  seconds, where ``ray.init`` would wait for minutes), a cluster that refuses the driver's token
  (Ray 2.60's token authentication, docs/study.md#authentication), any other refusal. Ray's own
  log lines of a failed connection (C++ retries on stderr) are kept out of the terminal.
- :func:`check_shared_out`: every node of the cluster sees the study directory: the driver writes
  a marker under ``--out``, one task pinned to each node reads it and writes its own; a node that
  cannot (a node-local path, a filesystem not mounted there) is named before any cell runs.
- :func:`connected`: the two above for the length of a sweep, and Ray shut down after it when the
  sweep started it (without ``--ray-address``: a new instance on this machine, ``address="local"``).
- :func:`node_label`: the node a Ray task runs on, as recorded in a cell's status file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from kcs_lens.errors import ConfigError

AUTH_HINT = (
    "the cluster uses token authentication (Ray 2.60's default); run with RAY_AUTH_MODE=token and the "
    "cluster's token: ~/.ray/auth_token copied from the head node, or RAY_AUTH_TOKEN=<the output of "
    "`ray get-auth-token` on the head> (docs/study.md#authentication)"
)
PROBE_TIMEOUT_S = 5.0
MARKER_DIR = ".cells/nodes"


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` address; None for ``auto``, ``local`` and ``ray://`` addresses."""
    if address in ("auto", "local") or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected auto or HOST:PORT (the head's GCS port, 6379 by default)")
    return host.strip("[]") or "127.0.0.1", int(port)


def probe(address: str) -> None:
    """A ConfigError within :data:`PROBE_TIMEOUT_S` if nothing accepts connections at ``address``."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        why = "no answer" if isinstance(e, (socket.timeout, TimeoutError)) else (e.strerror or str(e))
        raise ConfigError(
            f"--ray-address {address}: nothing answers there ({why}); start the head node with "
            f"`ray start --head --port={hp[1]}` or give its address"
        ) from None


@contextlib.contextmanager
def _stderr_into(said: list[str]) -> Iterator[None]:
    """File descriptor 2 (where Ray's C++ core logs its connection retries) into ``said``."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            said.append(tmp.read().decode(errors="replace"))


def connect(ray: Any, address: str | None) -> None:
    """``ray.init(address)``, failures as one ConfigError line. None starts a new Ray instance on this
    machine (``address="local"``), even where a cluster runs here or ``RAY_ADDRESS`` is set: Ray's own
    default would join that cluster silently; ``--ray-address auto`` joins it."""
    if address is not None:
        probe(address)
    said: list[str] = []
    try:
        with _stderr_into(said):
            ray.init(address=address or "local", log_to_driver=False, logging_level="ERROR")
    except Exception as e:
        text = f"{e} {' '.join(said)}"
        where = f"the Ray cluster at {address}" if address else "Ray on this machine"
        if isinstance(e, getattr(ray.exceptions, "AuthenticationError", ())) or any(
            k in text for k in ("InvalidAuthToken", "Unauthenticated", "Authentication token")
        ):
            raise ConfigError(f"{where} refused this driver's authentication: {AUTH_HINT}") from None
        first = " ".join(str(e).split())[:300]
        raise ConfigError(f"could not connect to {where}: {type(e).__name__}: {first}") from None


def join_cluster(address: str | None, out: Path) -> None:
    """:func:`connect` (unless this process is connected already), then :func:`check_shared_out`;
    the folders this call created are removed again when the check fails."""
    import ray

    if not ray.is_initialized():
        connect(ray, address)
    top = None  # the outermost folder of ``out`` that the check creates
    for d in (out.absolute(), *out.absolute().parents):
        if d.exists():
            break
        top = d
    try:
        check_shared_out(ray, out.absolute())
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


@contextlib.contextmanager
def connected(address: str | None, out: Path) -> Iterator[None]:
    """:func:`join_cluster` for the length of a sweep; on the way out, Ray is shut down again if this
    call connected it (a notebook or a test that called ``ray.init`` itself stays connected)."""
    import ray

    mine = not ray.is_initialized()
    try:
        join_cluster(address, out)
        yield
    finally:
        if mine and ray.is_initialized():
            ray.shutdown()


def node_label() -> str:
    """The node this Ray task runs on: its IP and the first 8 hex digits of its Ray node id
    (several nodes of one machine share the IP)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return f"{ray.util.get_node_ip_address()}/{node_id[:8]}"


def _see(out: str, token: str, node_id: str) -> str | None:
    """On one node: read the driver's marker and write this node's; None, or what went wrong."""
    marker = Path(out) / MARKER_DIR / "driver"
    try:
        if marker.read_text() != token:
            return f"{marker} holds another study's marker (another --out at the same path?)"
        mine = Path(out) / MARKER_DIR / node_id
        mine.write_text(token)
        return None
    except OSError as e:
        return f"{e.filename or out}: {e.strerror or e}"


# How long a node may take to answer the study-directory check: its first worker process imports
# kcs_lens (torch, transformers), a minute or more on a busy 2-core node.
CHECK_TIMEOUT_S = 300


def check_shared_out(ray: Any, out: Path) -> None:
    """Every alive node sees ``out`` (see the module docstring): a ConfigError naming the first
    node that does not, before any cell runs. The markers are removed afterwards."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    token = secrets.token_hex(8)
    mdir = out / MARKER_DIR
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "driver").write_text(token)
    see = ray.remote(_see)
    try:
        refs = {
            see.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False), max_retries=0
            ).remote(str(out), token, n["NodeID"]): n
            for n in nodes
        }
        for ref, n in refs.items():
            where = f"{n.get('NodeManagerAddress')}/{n['NodeID'][:8]}"
            try:
                problem = ray.get(ref, timeout=CHECK_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(
                    f"--out {out}: Ray node {where} did not answer the study-directory check within {CHECK_TIMEOUT_S} s "
                    "(its worker process did not start: the node is overloaded or still starting); rerun when it answers"
                ) from None
            except Exception as e:  # the node died
                problem = f"{type(e).__name__}: {e}".splitlines()[0]
            if problem is None and (mdir / n["NodeID"]).is_file() and (mdir / n["NodeID"]).read_text() == token:
                continue
            raise ConfigError(
                f"--out {out}: Ray node {where} cannot see the study directory "
                f"({problem or 'its marker did not appear here'}); --out must be on storage every node mounts "
                "at the same path (docs/study.md#on-a-cluster---executor-ray)"
            )
    finally:
        for p in mdir.iterdir() if mdir.is_dir() else []:
            p.unlink(missing_ok=True)
        for d in (mdir, mdir.parent):  # .cells/nodes, and .cells when it holds nothing else
            with contextlib.suppress(OSError):
                d.rmdir()
