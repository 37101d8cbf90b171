"""The checks every public entry point runs on what a user hands it, in one place.

The library's functions and the ``reuse-lens`` command call these before any work, so a
wrong type, a circuit of another model, a bad count or an unusable output path is refused
at the boundary with a message that names the argument and what to pass, instead of
surfacing later as an AttributeError from deep inside or as a silently wrong number.
docs/errors.md lists what each check raises.
"""

from __future__ import annotations

import contextlib
import operator
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reuse_lens.models import check_model, describe

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from reuse_lens.circuits.circuit import Circuit
    from reuse_lens.nodes import ModelShape
    from reuse_lens.tasks.task import Task

__all__ = [
    "OutputPathError",
    "check_circuit",
    "check_count",
    "check_fits",
    "check_mapping",
    "check_model",
    "check_out_entries",
    "check_out_file",
    "check_out_folder",
    "check_seed",
    "check_side_file",
    "check_task",
    "folder_lock",
]


class OutputPathError(ValueError):
    """An output path that cannot be written: the message names the path and the fix."""


# ---- types ----------------------------------------------------------------------------------


def check_task(task: object, arg: str = "task") -> Task:
    """The task itself, or TypeError when ``task`` is not a Task."""
    from reuse_lens.tasks.task import Task

    if not isinstance(task, Task):
        hint = (
            ": build one from lists of prompts with rl.Task.from_pairs(model, clean, "
            "corrupted, answers, wrong)"
            if isinstance(task, list | tuple | dict)
            else ""
        )
        raise TypeError(
            f"{arg} must be a reuse_lens Task (from rl.tasks.load(name, model) or "
            f"rl.Task.from_pairs), got {describe(task)}{hint}"
        )
    return task


def check_pair(model: object, task: object) -> tuple[TransformerBridge, Task]:
    """Both types, then that the task's token ids mean the same words in this model."""
    checked_model = check_model(model)
    checked_task = check_task(task)
    checked_task.check_model(checked_model)
    return checked_model, checked_task


def check_circuit(circuit: object, arg: str = "circuit") -> Circuit:
    """The circuit itself, or TypeError when ``circuit`` is not a Circuit."""
    from reuse_lens.circuits.circuit import Circuit

    if not isinstance(circuit, Circuit):
        hint = (
            ": build one from node names with rl.Circuit.from_nodes(names, model)"
            if isinstance(circuit, list | tuple | set | frozenset)
            else ": read a circuit file with rl.Circuit.from_json(path)"
            if isinstance(circuit, str | os.PathLike)
            else ""
        )
        raise TypeError(f"{arg} must be a reuse_lens Circuit, got {describe(circuit)}{hint}")
    return circuit


def check_mapping(value: object, arg: str, of: str) -> Mapping[str, Any]:
    """``value`` if it is a mapping of names to ``of``, else TypeError saying how to make one."""
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{arg} must map names to {of}, e.g. {{'ioi': ...}}, got {describe(value)}; give each "
            "its name, as in dict(zip(names, items))"
        )
    return value


def check_fits(circuit: Circuit, shape: ModelShape, arg: str = "circuit") -> None:
    """CircuitError unless ``circuit`` was made for a model of exactly ``shape``.

    A circuit of a smaller model names only nodes a larger one has too, so a node-by-node
    check passes, yet "everything else" ablated in the larger model is not what the
    circuit was measured against: the number would mean nothing.
    """
    from reuse_lens.circuits.circuit import CircuitError

    ours = circuit.shape
    if ours != shape:
        raise CircuitError(
            f"{arg} was made for a model of {_shape_text(ours)}, but this model has "
            f"{_shape_text(shape)}. A circuit only measures the model it was found in (or a "
            "fine-tune of the same shape): discover it again in this model with "
            "rl.discover_circuit(model, task)"
        )


def _shape_text(shape: ModelShape) -> str:
    mlps = "with MLPs" if shape.has_mlps else "attention-only"
    block = ", attention and MLP in parallel" if shape.parallel else ""
    return f"{shape.n_layers} layers of {shape.n_heads} heads ({mlps}{block})"


# ---- numbers --------------------------------------------------------------------------------


def _whole(value: object, arg: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{arg} must be a whole number, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        pass
    if isinstance(value, float) and value.is_integer():
        raise TypeError(f"{arg} must be a whole number, got the float {value!r}: pass {int(value)}")
    raise TypeError(f"{arg} must be a whole number, got {describe(value)}")


def check_count(value: object, arg: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int, or TypeError (not a whole number) / ValueError (out of range)."""
    number = _whole(value, arg)
    if number < minimum:
        need = "a positive whole number" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{arg} must be {need}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{arg} must be at most {maximum}, got {number}")
    return number


def check_seed(seed: object, arg: str = "seed") -> int:
    """``seed`` as an int, or TypeError: None or a string would not say which prompts.

    Negative seeds are refused everywhere (ValueError): numpy's generators, behind the
    random baselines and resamples, take none, and a study that accepted -1 for its
    prompts would fail on it only after all its discoveries.
    """
    if seed is None:
        raise TypeError(
            f"{arg} must be a whole number such as 0, got None: the seed decides which "
            "prompts (or samples) are drawn, so it is always explicit"
        )
    number = _whole(seed, arg)
    if number < 0:
        raise ValueError(
            f"{arg} must be 0 or a positive whole number, got {number}: numpy's random "
            "generators take no negative seeds, so none is accepted anywhere"
        )
    return number


# ---- model specs ----------------------------------------------------------------------------

# ---- output paths ---------------------------------------------------------------------------


def _first_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path.cwd()


def _check_parents(path: Path, arg: str) -> None:
    existing = _first_existing(path.parent)
    if not existing.is_dir():
        raise OutputPathError(
            f"{arg} {str(path)!r} lies under {str(existing)!r}, which is a file, not a "
            "folder: choose a path under a folder"
        )
    if not _writable(existing):
        raise OutputPathError(
            f"{arg} {str(path)!r} cannot be written: {str(existing)!r} is not writable by "
            "you; choose a folder you can write to"
        )


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder``, by trying: permission bits alone do
    not tell (root, read-only mounts, /proc)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".reuse-lens-probe-"):
            return True
    except OSError:
        return False


def check_out_file(path: str | os.PathLike[str], arg: str = "--out") -> Path:
    """The path of a file to write, or OutputPathError before any work is done."""
    target = Path(path).expanduser()
    if str(path) == "" or target.is_dir():
        raise OutputPathError(
            f"{arg} {str(path)!r} is a folder, but a file goes there: give a file name such "
            f"as {str(target / 'circuit.json')!r}"
        )
    _check_parents(target, arg)
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{arg} {str(path)!r} exists and is not writable by you")
    return target


def check_out_folder(path: str | os.PathLike[str], arg: str = "--out") -> Path:
    """The path of a folder to write into, or OutputPathError before any work is done."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputPathError(
            f"{arg} {str(path)!r} is a file, but a folder goes there: give a folder name, "
            "or remove the file"
        )
    if target.is_dir():
        if not _writable(target):
            raise OutputPathError(
                f"{arg} {str(path)!r} is not writable by you; choose a folder you can write to"
            )
        return target
    _check_parents(target, arg)
    return target


def check_side_file(main: Path, side: Path, what: str, arg: str = "--out") -> Path:
    """``side``, a file written beside ``main``, or OutputPathError when it is ``main``.

    ``discover --out c.html`` writes the circuit to c.html and then its figure, named
    NAME.html, over it: the discovery would be lost with exit status 0. Names are
    compared without case, as a case-insensitive file system would.
    """
    same = os.path.normcase(os.path.abspath(main)).lower() == (
        os.path.normcase(os.path.abspath(side)).lower()
    )
    if same or (main.exists() and side.exists() and os.path.samefile(main, side)):
        raise OutputPathError(
            f"{arg} {str(main)!r} is also where the {what} goes ({str(side)!r}), which would "
            f"overwrite it: give {arg} another name, such as "
            f"{str(main.with_name(main.stem + '.json'))!r}"
        )
    return check_out_file(side, f"{arg}'s {what}")


def check_out_entries(
    folder: Path, *, files: tuple[str, ...] = (), folders: tuple[str, ...] = (), arg: str = "--out"
) -> None:
    """OutputPathError when a name the run writes in ``folder`` is taken by the wrong kind
    of thing (a folder ``report.html``, a file ``circuits``): found before any work, not
    after it."""
    for name in files:
        path = folder / name
        if path.is_dir():
            raise OutputPathError(
                f"{arg} {str(folder)!r} holds a folder {name!r} where the run writes a file of "
                "that name: remove or rename it, or choose another folder"
            )
        if path.exists() and not os.access(path, os.W_OK):
            raise OutputPathError(f"{arg} {str(folder)!r}: {name!r} exists and is not writable")
    for name in folders:
        path = folder / name
        if path.exists() and not path.is_dir():
            raise OutputPathError(
                f"{arg} {str(folder)!r} holds a file {name!r} where the run keeps a folder of "
                "that name: remove or rename it, or choose another folder"
            )


_LOCK_NAME = ".reuse-lens.lock"
_HELD: set[str] = set()


@contextlib.contextmanager
def folder_lock(folder: Path, arg: str = "out") -> Iterator[None]:
    """Hold ``folder``'s lock for one run, or OutputPathError when another run holds it.

    Two runs into one folder would each redo all the work and overwrite the other's
    files; the second is refused at once instead. The lock is an advisory ``flock``, so
    the kernel frees it when its holder dies, even by SIGKILL: no stale lock is left.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on Windows: run unlocked
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD:  # this process holds it already (the demo around its study)
        yield
        return
    fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise OutputPathError(
                f"another reuse-lens run (process {holder}) is writing to {arg} "
                f"{str(folder)!r}: wait for it to finish, or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # closing releases the flock
