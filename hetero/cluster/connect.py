"""Joining a Ray cluster, or starting one that keeps to this machine.

Ray's servers have no authentication of their own, so hetero never starts a Ray head that listens
beyond this machine: ``"auto"`` joins the cluster named by RAY_ADDRESS, or the one last started on this
machine (if it still answers), and otherwise starts one here whose every server listens on 127.0.0.1
only, checked once it runs. A cluster across machines is one the user starts (``ray start --head`` on
one machine, ``ray start --address HEAD:PORT`` on the others) and names by its address.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import psutil

from ..errors import HeteroError, one_line
from ..selection import AUTO

log = logging.getLogger(__name__)

HETERO_DIR = Path(__file__).resolve().parent.parent  # the package every node imports: the driver's own
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # off: Ray takes 127.0.0.1 as this node's address
CONNECT_TIMEOUT_S = 5.0  # to reach a cluster's address before Ray is asked to join it (Ray retries for minutes)


class RayUnavailableError(HeteroError):
    """Ray is not installed here."""


def ray_module() -> Any:
    """Ray, imported on first use: an optional extra."""
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("running on a Ray cluster needs Ray: pip install 'hetero[ray]'") from None
    return ray


def _host(address: str) -> str:
    """The host of "host:port", "ray://host:port" or "[::1]:port"."""
    rest = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 or rest.startswith("[") else rest
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    host = _host(address)
    return host == "localhost" or host.startswith("127.") or host == "::1"


@contextmanager
def loopback_only() -> Iterator[None]:
    """While a cluster is started or joined on this machine, Ray takes 127.0.0.1 as this node's address.

    Ray turns a node address of 127.0.0.1 into the machine's outward address (so that other machines could
    reach it) unless its switch for single-machine clusters is off; with the address 127.0.0.1 every server
    it starts (GCS, raylets, object managers, workers, agents) listens on the loopback interface only. The
    switch is Ray's module constant in this process and its environment variable for the processes started
    meanwhile; both are put back afterwards.
    """
    from ray._private import ray_constants

    saved, saved_env = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), os.environ.get(LOOPBACK_SWITCH)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[LOOPBACK_SWITCH] = "0"
    try:
        yield
    finally:
        if saved is None:
            with suppress(AttributeError):
                del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = saved_env


def listening_beyond_loopback(pids: set[int]) -> list[str]:
    """The sockets of processes `pids` that listen on an address other than the loopback interface."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids:
            continue
        ip = conn.laddr.ip.removeprefix("::ffff:")
        if not (ip.startswith("127.") or ip == "::1"):
            with suppress(psutil.Error):
                found.append(f"{psutil.Process(conn.pid).name()} on {ip}:{conn.laddr.port}")
    return found


def _reachable(address: str) -> str | None:
    """Why the cluster's address cannot be reached (refused, timed out), or None when it can."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return None
    except ValueError:
        return f"{address!r} is not HOST:PORT"
    except OSError as exc:
        return exc.strerror or one_line(exc)


def _running_cluster() -> str | None:
    """The address of the cluster "auto" joins: RAY_ADDRESS, else the one last started on this machine (if it
    still answers), else None."""
    named = os.environ.get("RAY_ADDRESS")
    if named:
        return named
    try:
        from ray._private import services

        found = services.get_ray_address_from_environment("auto", None)
    except ConnectionError:
        return None
    except Exception as exc:  # another Ray's internals: start a cluster here, as when none runs
        log.debug("looking for a running Ray cluster failed: %s", one_line(exc))
        return None
    if found and found != "auto" and _reachable(found) is None:
        return found
    return None


def start_local(ray: Any, options: dict) -> None:
    """A cluster of this machine alone, every server on 127.0.0.1, checked once it runs."""
    with loopback_only():
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **options)
    me = psutil.Process()
    try:
        started = {me.pid} | {child.pid for child in me.children(recursive=True)}
        beyond = listening_beyond_loopback(started)
    except psutil.AccessDenied:  # no right to read sockets here: the node's address says where it listens
        beyond = [] if is_loopback(ray.util.get_node_ip_address()) else [ray.util.get_node_ip_address()]
    if beyond:
        ray.shutdown()
        raise HeteroError(f"the Ray cluster started on this machine listened beyond it ({', '.join(beyond)}), so it "
                          f"was stopped; start one yourself (ray start --head) and pass its address")


def connect(address: str) -> bool:
    """Join the Ray cluster at `address` (HOST:PORT, ray://HOST:PORT, or "auto": RAY_ADDRESS, the cluster last
    started on this machine, else a new one here on 127.0.0.1). True when this call connected, and so should
    disconnect; False when Ray was connected already (that connection is used as it is)."""
    ray = ray_module()
    if ray.is_initialized():
        return False
    # every node imports this driver's hetero: the package travels with the job (Ray's py_modules)
    options = {"log_to_driver": False, "logging_level": logging.WARNING,
               "runtime_env": {"py_modules": [str(HETERO_DIR)]}}
    if address == AUTO:
        found = _running_cluster()
        if found is None:
            start_local(ray, options)
            return True
        address = found
    if not address.startswith("ray://") and (why := _reachable(address)) is not None:
        raise HeteroError(f"cannot reach the Ray cluster at {address} ({why})")
    with loopback_only() if is_loopback(address) else nullcontext():
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise HeteroError(f"cannot join the Ray cluster at {address}: {one_line(exc)}") from None
    return True


@contextmanager
def connected(address: str) -> Iterator[tuple[Any, bool]]:
    """Ray joined for the time of the block, and whether this joined it (then it leaves it afterwards)."""
    joined = connect(address)
    try:
        yield ray_module(), joined
    finally:
        if joined:
            ray_module().shutdown()
