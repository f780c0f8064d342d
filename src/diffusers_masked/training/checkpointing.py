"""What the trainer keeps in a checkpoint besides accelerate's files, and how a checkpoint folder is guarded.

Checkpoints get shared and downloaded, so resuming one must never run code from it. accelerate stores the model as
safetensors and reads its other files (optimizer, lr scheduler, RNG states) with ``torch.load(weights_only=True)``;
but it pickles registered custom objects (``custom_checkpoint_N.pkl``) and unpickles them with
``weights_only=False``. So the trainer registers nothing with accelerate: its own state (counters, noise
generators, run totals, EMA weights) is written here as ``NAME.safetensors`` (tensors) + ``NAME.json`` (everything
else), which loading never executes.

Also here: the output-folder lock against two live runs, checkpoint deletion that never leaves a broken folder
under a valid ``checkpoint-N`` name, and the `CheckpointManager` that saves, prunes and resumes a run's checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

#: Files of the trainer's own state in a checkpoint folder (NAME.json + NAME.safetensors each).
STATE_FORMAT = "diffusers_masked.checkpoint/1"
LEGACY_CUSTOM_STATE = "custom_checkpoint_{}.pkl"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain values; nothing of it was executed."""


# ----------------------------------------------------------------------------------------------------------------
# State dicts as safetensors + JSON
# ----------------------------------------------------------------------------------------------------------------
def _flatten(value: Any, tensors: Dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: only string keys can be stored as JSON, got {list(value)!r}")
        if "__tensor__" in value or "__tuple__" in value:
            raise TypeError(f"{where}: the keys __tensor__ / __tuple__ are reserved")
        return {k: _flatten(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored as safetensors + JSON")


def _unflatten(value: Any, tensors: Dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            if value["__tensor__"] not in tensors:
                raise UnsafeCheckpointError(f"{where}: tensor {value['__tensor__']!r} is missing from the safetensors file")
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_unflatten(v, tensors, where) for v in value["__tuple__"])
        return {k: _unflatten(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors, where) for v in value]
    return value


def save_state(state: Dict[str, Any], folder: Path, name: str) -> None:
    """Write ``state`` (nested dicts / lists / tuples of tensors and JSON values) as NAME.safetensors + NAME.json."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, name)
    # safetensors writes from host memory; nothing is copied on the device (an EMA can be large).
    save_file({k: t.cpu().contiguous() for k, t in tensors.items()}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"format": STATE_FORMAT, "state": skeleton}, indent=1))


def load_state(folder: Path, name: str) -> Dict[str, Any]:
    """Read what `save_state` wrote (tensors on the CPU)."""
    from safetensors.torch import load_file

    meta_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{meta_path} is not a diffusers-masked trainer state ({STATE_FORMAT})")
    return _unflatten(meta["state"], load_file(str(tensor_path)), name)


def safe_torch_load(path: Path, allowed_globals: Optional[List[Any]] = None) -> Any:
    """``torch.load(weights_only=True)`` with an explicit allow-list; a file that needs anything else is refused with
    `UnsafeCheckpointError` (the unpickler stops at the first unknown global, before building it)."""
    import pickle

    allowed = list(allowed_globals or [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{path} was refused: it holds Python objects other than tensors and plain values ({first}). A "
            "checkpoint written by this trainer never does, so the file may have been tampered with; nothing in it "
            "was executed. Resume from a checkpoint you trust, or start without --resume_from_checkpoint."
        ) from None


def check_accelerate_pickles(folder: Path, process_index: int) -> None:
    """Refuse, with a clear error, an accelerate RNG-state file that ``weights_only`` loading rejects.

    accelerate reads ``random_states_N.pkl`` safely (weights_only with its own allow-list) but, if that fails, only
    logs and goes on with fresh random states: a tampered file would pass unnoticed and the resume would not be
    exact. The optimizer / scheduler files raise by themselves in accelerate (the trainer passes
    ``weights_only=True`` explicitly), so only the small RNG file is read twice."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    rng = folder / f"random_states_{process_index}.pkl"
    if rng.is_file():
        safe_torch_load(rng, TORCH_SAFE_GLOBALS)


def explain_refused_pickle(folder: Path, err: Exception) -> UnsafeCheckpointError:
    """accelerate's own ``weights_only`` load refused a file without naming it: find it (error path only)."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".bin", ".pkl", ".pt", ".pth") and not path.name.startswith("custom_"):
            try:
                safe_torch_load(path, TORCH_SAFE_GLOBALS)
            except UnsafeCheckpointError as refused:
                return refused
            except Exception:  # noqa: BLE001 - not the refused file (or unreadable for another reason)
                continue
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UnsafeCheckpointError(f"a file in {folder} was refused ({first}); nothing in it was executed.")


def legacy_custom_states(folder: Path) -> List[Path]:
    """``custom_checkpoint_N.pkl`` files of a checkpoint written before the safetensors + JSON format, in order."""
    found = sorted(folder.glob("custom_checkpoint_*.pkl"), key=lambda p: int(p.stem.rsplit("_", 1)[-1])
                   if p.stem.rsplit("_", 1)[-1].isdigit() else -1)
    return found


@contextlib.contextmanager
def accelerate_view_without(folder: Path, names: List[str], parent: Path):
    """A temporary folder of symbolic links to everything in ``folder`` except ``names``: lets accelerate's
    ``load_state`` read an old-format checkpoint without the pickles it would unpickle unsafely, and without touching
    the checkpoint itself."""
    view = parent / f".resume-view-{os.getpid()}"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    try:
        for entry in folder.iterdir():
            if entry.name not in names:
                os.symlink(entry.resolve(), view / entry.name, target_is_directory=entry.is_dir())
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Deleting checkpoints
# ----------------------------------------------------------------------------------------------------------------
DELETING_SUFFIX = ".deleting"


def delete_checkpoint(path: Path) -> None:
    """Rename ``checkpoint-N`` to a hidden temporary name (atomic), then delete it: a kill during the delete leaves
    a ``.checkpoint-N.deleting`` folder that nothing resumes from, never a broken ``checkpoint-N``."""
    doomed = path.with_name(f".{path.name}.{os.getpid()}{DELETING_SUFFIX}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(output_dir: Path) -> None:
    """Remove what a killed run left behind: unfinished deletions, half-written checkpoints, resume views. Called
    with the output-folder lock held, so no live run is writing them."""
    if output_dir.is_dir():
        for pattern in (f".checkpoint-*{DELETING_SUFFIX}", ".checkpoint-*.tmp", ".resume-view-*"):
            for entry in output_dir.glob(pattern):
                shutil.rmtree(entry, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Output-folder lock
# ----------------------------------------------------------------------------------------------------------------
LOCK_NAME = ".diffusers_masked.lock"


def _process_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` (Linux /proc), to tell a live owner from a new process that reuses its id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 (starttime); the command name may hold spaces


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    now = _process_start(pid)
    return start is None or now is None or now == start


class OutputDirLock:
    """An exclusive lock file in the output folder, held by the main process for the whole run.

    A second run on the same folder would overwrite the first's checkpoints, or crash half-way through writing
    one; it is refused while the owner lives. A lock left by a dead process (killed, out of memory) is taken
    over. The owner is identified by host, pid and the pid's start time; a lock from another host cannot be
    checked and is refused with the way to clear it."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def _record(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def _owner(self) -> Tuple[Optional[Dict[str, Any]], str]:
        try:
            owner = json.loads(self.path.read_text())
            return (owner if isinstance(owner, dict) else None), ""
        except FileNotFoundError:
            return None, "gone"
        except (OSError, ValueError):
            return None, "unreadable"

    def acquire(self) -> None:
        for _ in range(3):  # a race with another run taking over the same stale lock: look again
            if self._try_create():
                self.held = True
                return
            owner, problem = self._owner()
            if problem == "gone":
                continue
            me = socket.gethostname()
            if owner is not None and owner.get("host") == me and isinstance(owner.get("pid"), int):
                pid = owner["pid"]
                if pid != os.getpid() and _alive(pid, owner.get("start")):
                    raise RuntimeError(
                        f"Another training run (pid {pid} on {me}, since {owner.get('since', '?')}) is using "
                        f"--output_dir {self.path.parent}: two runs in one folder overwrite each other's checkpoints. "
                        "Wait for it to finish, stop it, or pass another --output_dir."
                    )
                logger.warning("Taking over the lock of a run that is no longer alive (pid %s on %s): %s",
                               pid, me, self.path)
            elif owner is not None:
                raise RuntimeError(
                    f"--output_dir {self.path.parent} is locked by a run on host {owner.get('host')!r} (pid "
                    f"{owner.get('pid')}, since {owner.get('since', '?')}), which cannot be checked from here. If "
                    f"that run is over, delete {self.path}; otherwise pass another --output_dir."
                )
            else:
                logger.warning("Replacing an unreadable lock file %s.", self.path)
            # Replace the stale lock atomically, then make sure this process is the one that won.
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._record()))
            os.replace(tmp, self.path)
            owner, _ = self._owner()
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.held = True
                return
        raise RuntimeError(f"Could not take the lock {self.path}: other runs keep taking it; pass another --output_dir.")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner, _ = self._owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


# ----------------------------------------------------------------------------------------------------------------
# The run's checkpoints
# ----------------------------------------------------------------------------------------------------------------
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointManager:
    """Saves, prunes and resumes the ``OUTPUT_DIR/checkpoint-N`` folders of a run.

    A checkpoint is accelerate's `save_state` (model as safetensors, optimizer / scheduler / RNG files) plus the
    trainer's own objects (``objects``: name -> object with ``state_dict`` / ``load_state_dict``) as safetensors +
    JSON; nothing is registered with accelerate, which would pickle it.

    Args:
        accelerator: The run's `accelerate.Accelerator`.
        output_dir: The run's folder.
        objects: The trainer state (``train_state``) and, with --use_ema, the EMA (``ema``), in that order.
        total_limit: Keep only the newest N checkpoints (None = all).
        before_save: Called before the objects' states are taken (records the run totals).
    """

    def __init__(self, accelerator: Any, output_dir: Path, objects: Dict[str, Any], total_limit: Optional[int] = None,
                 before_save: Optional[Callable[[], None]] = None):
        self.accelerator, self.output_dir, self.objects = accelerator, Path(output_dir), objects
        self.total_limit, self.before_save = total_limit, before_save

    def list_checkpoints(self) -> List[Path]:
        """Complete checkpoints, oldest first: temporary names (being written or deleted) never match."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), d) for d in self.output_dir.iterdir()
                 if d.is_dir() and (m := CHECKPOINT_RE.match(d.name))]
        return [d for _, d in sorted(found)]

    def save(self, step: int) -> Path:
        """Write ``checkpoint-{step}`` into a temporary folder, then rename it (atomic): a kill mid-save never leaves
        a half-written checkpoint that ``--resume_from_checkpoint latest`` would pick. Runs on every process."""
        acc = self.accelerator
        final, tmp = self.output_dir / f"checkpoint-{step}", self.output_dir / f".checkpoint-{step}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.before_save is not None:
            self.before_save()
        states = {name: obj.state_dict() for name, obj in self.objects.items()}  # gathers on every process
        if acc.is_main_process:
            for name, state in states.items():
                save_state(state, tmp, name)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                delete_checkpoint(final)
            os.replace(tmp, final)
            if self.total_limit is not None:
                for old in self.list_checkpoints()[:-self.total_limit]:
                    delete_checkpoint(old)
        acc.wait_for_everyone()
        return final

    def resolve(self, spec: Optional[str]) -> Optional[Path]:
        """The folder ``--resume_from_checkpoint`` names ('latest': the newest, None when there is none)."""
        if not spec:
            return None
        if spec == "latest":
            found = self.list_checkpoints()
            if not found:
                logger.info("No checkpoint in %s; starting from scratch.", self.output_dir)
                return None
            return found[-1]
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {spec} is not a checkpoint folder.")
        return path

    def resume(self, path: Path) -> None:
        """Load ``path`` into accelerate's objects and the trainer's; errors say where to resume from instead."""
        try:
            self._load(path)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"Could not resume from {path}: {err}{self._resume_hint(path)}") from None
        except Exception as err:  # surface a clear message instead of a deep stack trace
            raise RuntimeError(
                f"Could not resume from {path}: {err}. The checkpoint is corrupt or was written by a different model "
                "configuration / number of processes." + self._resume_hint(path)
            ) from err

    def _resume_hint(self, path: Path) -> str:
        """Where to resume from instead of the checkpoint ``path`` that failed: the newest older one."""
        m = CHECKPOINT_RE.match(path.name)
        older = [c for c in self.list_checkpoints() if c.resolve() != path.resolve()
                 and (m is None or int(CHECKPOINT_RE.match(c.name).group(1)) < int(m.group(1)))]
        if older:
            return (f" The previous checkpoint is {older[-1]}: resume from it with --resume_from_checkpoint "
                    f"{older[-1]} (delete or move {path} so that 'latest' skips it).")
        return " There is no older checkpoint: start without --resume_from_checkpoint."

    def _accelerate_load(self, path: Path, report_as: Optional[Path] = None) -> None:
        import pickle

        try:
            # weights_only=True explicitly: accelerate's optimizer / scheduler files are pickles.
            self.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        except pickle.UnpicklingError as err:
            refused = explain_refused_pickle(path, err)
            raise UnsafeCheckpointError(str(refused).replace(str(path), str(report_as or path))) from None

    def _load(self, path: Path) -> None:
        """Load ``path`` without unpickling anything that could run code."""
        check_accelerate_pickles(path, self.accelerator.process_index)
        legacy = legacy_custom_states(path)
        if legacy and not (path / "train_state.json").is_file():
            self._load_legacy(path, legacy)
            return
        if legacy:
            raise UnsafeCheckpointError(f"{path} holds {[f.name for f in legacy]} next to the trainer state: a "
                                        "checkpoint of this trainer never does; it was not loaded.")
        missing = [name for name in self.objects if not (path / f"{name}.json").is_file()]
        if missing:
            hint = " (was it written with --use_ema? resume with the same setting)" if missing == ["ema"] else ""
            raise FileNotFoundError(f"{path} has no {', '.join(m + '.json' for m in missing)}{hint}")
        self._accelerate_load(path)
        for name, obj in self.objects.items():
            obj.load_state_dict(load_state(path, name))

    def _load_legacy(self, path: Path, legacy: List[Path]) -> None:
        """A checkpoint from before the safetensors + JSON format: accelerate would unpickle its trainer state with
        weights_only=False. Read those files with weights_only=True instead (they held only tensors and plain
        values) and let accelerate load the rest through a view of the folder without them."""
        if len(legacy) != len(self.objects):
            raise ValueError(f"{path} has {len(legacy)} trainer state file(s) (custom_checkpoint_*.pkl); this run "
                             f"has {len(self.objects)} ({', '.join(self.objects)}): resume with the same --use_ema "
                             "setting.")
        states = [safe_torch_load(f) for f in legacy]  # registration order: train state, then EMA
        with accelerate_view_without(path, [f.name for f in legacy], self.output_dir) as view:
            self._accelerate_load(view, report_as=path)
        for obj, state in zip(self.objects.values(), states):
            obj.load_state_dict(state)
        logger.warning("%s is in the old checkpoint format (pickled trainer state, read safely); the next "
                       "checkpoints are written as safetensors + JSON.", path)
