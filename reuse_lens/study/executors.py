"""Where a study's units of work run: in this process, or as Ray tasks on a cluster.

An executor takes units (``reuse_lens.study.units``) and yields each with its result as
it finishes. ``LocalExecutor`` runs them here, in order, on the models the study has
loaded already; it needs no Ray. ``RayExecutor`` sends each unit to a Ray cluster as a
task that loads its models by spec, with one GPU when the study asks for a CUDA device.
Units depend only on their own inputs, so both give the same results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from reuse_lens.study.units import Found, Measured, Models, Unit, run_in_worker, run_unit

__all__ = [
    "Executor",
    "LocalExecutor",
    "MissingExtraError",
    "RayExecutor",
    "executor_named",
]

RAY_HINT = 'pip install "ray>=2.40,<3"'
"""How to get Ray (all that reuse_lens's ``ray`` extra installs; reuse_lens itself is
installed from its repository, not from a package index). cli.py repeats it."""


class MissingExtraError(ImportError):
    """An optional dependency that is not installed: the message says what to install."""


class Executor(Protocol):
    """Runs units and yields ``(unit, result)`` as each finishes, in any order."""

    def map(
        self, units: Sequence[Unit], models: Models, show: Callable[[str], None]
    ) -> Iterator[tuple[Unit, Found | Measured]]:
        """Run ``units``; ``models`` holds what this process has loaded, ``show`` takes
        a short line on the work in hand (the progress bar's postfix)."""
        ...


class LocalExecutor:
    """Every unit in this process, one after another, in the order given."""

    def map(
        self, units: Sequence[Unit], models: Models, show: Callable[[str], None]
    ) -> Iterator[tuple[Unit, Found | Measured]]:
        for unit in units:
            show(unit.key)
            yield unit, run_unit(unit, models)

    def __repr__(self) -> str:
        return "LocalExecutor()"


class RayExecutor:
    """Every unit as a Ray task, on the cluster at ``address`` or on a new local one.

    Arguments:
        address: a running cluster's address (``HEAD:6379``, ``ray://HEAD:10001``);
            None reads ``RAY_ADDRESS``, and without it starts a cluster on this machine.
            When Ray is initialised already (``ray.init`` in your script), that is used.
        num_cpus: the CPUs of a cluster started here (None: all of them).
        gpus: GPUs per unit; None gives one when the study's device is CUDA, else none.

    Each task loads its models by spec on its worker, which keeps them for the next
    unit. Every node needs the same reuse_lens, and each spec must load the same weights
    there: a circuit whose worker saw other weights is refused (by their digest).

    Raises:
        MissingExtraError: at once, when Ray is not installed.
    """

    def __init__(
        self, address: str | None = None, *, num_cpus: int | None = None, gpus: float | None = None
    ) -> None:
        if importlib.util.find_spec("ray") is None:
            raise MissingExtraError(f"the ray executor needs Ray: {RAY_HINT}")
        self.address = address
        self.num_cpus = num_cpus
        self.gpus = gpus
        self._reaper: subprocess.Popen[str] | None = None

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r})"

    def check(self) -> None:
        """ConnectionError, at once, when the cluster's address does not answer.

        ``ray.init`` at an address where nothing listens retries for minutes, logging
        about addresses of its own; a study checks here first, before loading any model,
        and names the address it was given.
        """
        try:
            import ray

            if ray.is_initialized():
                return
        except ImportError:  # pragma: no cover - checked when made
            raise MissingExtraError(f"the ray executor needs Ray: {RAY_HINT}") from None
        given = self.address or os.environ.get("RAY_ADDRESS") or None
        if not given or given in ("auto", "local"):
            return
        source = "--address" if self.address else "RAY_ADDRESS"
        host, port = _host_port(given)
        if host is None:
            raise ValueError(
                f"{source} {given!r} is not a Ray address: give HEAD:PORT (e.g. "
                "127.0.0.1:6379) or ray://HEAD:10001"
            )
        from reuse_lens.models import reachable

        if not reachable(host, port, CONNECT_SECONDS):
            raise ConnectionError(
                f"cannot reach the Ray cluster at {given!r} ({source}): nothing answers at "
                f"{host}:{port} within {CONNECT_SECONDS:g} s. Start a cluster there (`ray start "
                f"--head --port={port}`), fix {source}, or leave it out to start one on this "
                "machine"
            )

    def map(
        self, units: Sequence[Unit], models: Models, show: Callable[[str], None]
    ) -> Iterator[tuple[Unit, Found | Measured]]:
        import ray

        started = self._connect(ray)
        try:
            _check_cpus(ray, units)
        except ValueError:
            if started:
                self._shutdown(ray)
            raise
        # A GPU task's worker normally exits after one task (max_calls=1), which would
        # reload the model for every unit; it is kept (0: no limit) to reuse the model.
        remote = ray.remote(max_calls=0)(run_in_worker)
        try:
            pending: dict[Any, Unit] = {}
            for unit in units:
                gpus = self.gpus if self.gpus is not None else float(_uses_gpu(unit))
                cpus = unit.model.threads or 1  # the worker runs torch on as many threads
                pending[remote.options(num_cpus=cpus, num_gpus=gpus).remote(unit)] = unit
            show(f"{len(pending)} units sent to Ray")
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    unit = pending.pop(done[0])
                    result = ray.get(done[0])
                    show(f"{unit.key} done, {len(pending)} to go")
                    yield unit, result
            finally:
                for ref in pending:  # stopped early: the rest is not needed
                    ray.cancel(ref)
        finally:
            if started:
                self._shutdown(ray)

    def _connect(self, ray: Any) -> bool:
        """Connect to the cluster; True when this call started it (and so stops it)."""
        if ray.is_initialized():
            return False
        self.check()
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=True)
            return True
        reaper = _start_reaper()
        try:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False)
            node = _node_id(ray)
            if node is None or reaper is None or reaper.stdin is None:
                _stop_reaper(reaper)  # nothing it could find: let it go
                reaper = None
            else:
                reaper.stdin.write(f"{node}\n")
                reaper.stdin.flush()
        except BaseException:
            _stop_reaper(reaper)
            raise
        self._reaper = reaper
        return True

    def _shutdown(self, ray: Any) -> None:
        """Stop the cluster this executor started, and let its reaper sweep what is left."""
        try:
            ray.shutdown()
        finally:
            _stop_reaper(self._reaper)
            self._reaper = None


def _start_reaper() -> subprocess.Popen[str] | None:
    """The process that ends a cluster's leftovers if this one dies (``_reaper.py``)."""
    if not Path("/proc").is_dir():
        return None
    script = Path(__file__).with_name("_reaper.py")
    try:
        return subprocess.Popen(
            [sys.executable, "-I", str(script)], stdin=subprocess.PIPE, text=True,
            start_new_session=True,  # a Ctrl-C to the study's terminal does not reach it
        )  # fmt: skip
    except OSError:
        return None


def _node_id(ray: Any) -> str | None:
    """The id of the node this driver started, as its processes' RAY_NODE_ID gives it."""
    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # an older or stand-in Ray without it: no reaping
        return None
    return node if isinstance(node, str) and node else None


def _stop_reaper(reaper: subprocess.Popen[str] | None) -> None:
    """Close the reaper's pipe (it sweeps, then exits) and collect it."""
    if reaper is None:
        return
    with contextlib.suppress(OSError):
        if reaper.stdin is not None:
            reaper.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        reaper.wait(timeout=10)


CONNECT_SECONDS = 10.0
"""How long a study waits for a Ray cluster's address to answer before refusing it."""

_RAY_PORT = 6379  # a GCS address without a port, as Ray itself reads it


def _host_port(address: str) -> tuple[str | None, int]:
    """The host and port an address names (``HEAD:6379``, ``ray://HEAD:10001``)."""
    text = address.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep:
        return (text or None), _RAY_PORT
    if not port.isdigit() or not host:
        return None, 0
    return host.strip("[]"), int(port)


def _check_cpus(ray: Any, units: Sequence[Unit]) -> None:
    """Refuse units that ask for more CPUs than any node has: Ray would queue them forever."""
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    wanted = max((unit.model.threads or 1 for unit in units), default=1)
    if wanted > largest:
        raise ValueError(
            f"each unit runs torch on {wanted} threads and asks Ray for as many CPUs, but no "
            f"node of the cluster has more than {largest:g}: pass --threads {max(1, int(largest))} "
            "(StudyConfig(threads=...)) or fewer"
        )


def _uses_gpu(unit: Unit) -> bool:
    device = unit.model.device
    return device is not None and device.startswith("cuda")


def executor_named(name: str, address: str | None = None) -> Executor:
    """``local`` or ``ray`` (at ``address``), as the command line names them."""
    if name == "local":
        if address is not None:
            raise ValueError("--address is for --executor ray; the local executor needs none")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address)
    raise ValueError(f"unknown executor {name!r}: choose 'local' or 'ray'")
