"""What the trainer guarantees about its output folder: checkpoints never run code on resume, deleting old
checkpoints never leaves a broken one, a second live run on the same folder is refused, and resumed runs report
whole-run totals."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusers_masked.training import main
from diffusers_masked.training.checkpointing import LOCK_NAME, OutputDirLock, UnsafeCheckpointError, load_state
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe

from test_trainer import needs_fmnist, tiny_args


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after 2 of 4 steps (checkpoint-2), to copy and tamper with."""
    tmp = tmp_path_factory.mktemp("stopped")
    result = main(MaskDiTRecipe(), tiny_args(tmp, out="run", stop_after_steps=2))
    (tmp / "first_segment.json").write_text(json.dumps(result))
    return tmp


def _copy(stopped_run, tmp_path, name="run"):
    shutil.copytree(stopped_run / "run", tmp_path / name)
    return tmp_path / name / "checkpoint-2"


@needs_fmnist
def test_checkpoint_holds_no_pickled_trainer_state(stopped_run):
    ckpt = stopped_run / "run" / "checkpoint-2"
    assert not list(ckpt.glob("custom_checkpoint_*"))
    state = load_state(ckpt, "train_state")
    assert state["global_step"] == 2 and state["images_seen"] == 16 and len(state["generators"]) == 1
    ema = load_state(ckpt, "ema")
    assert isinstance(ema["shadow_params"], list) and all(isinstance(p, torch.Tensor) for p in ema["shadow_params"])


@needs_fmnist
@pytest.mark.parametrize("target", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                    "custom_checkpoint_0.pkl"])
def test_resume_refuses_a_planted_pickle_payload(stopped_run, tmp_path, target):
    ckpt = _copy(stopped_run, tmp_path)
    marker = tmp_path / "payload_ran"
    if target == "custom_checkpoint_0.pkl":  # the old format, as accelerate's custom-object hook wrote it
        for name in ("train_state", "ema"):
            for ext in ("json", "safetensors"):
                (ckpt / f"{name}.{ext}").unlink(missing_ok=True)
        torch.save({"global_step": 2, "generators": [_Payload(marker)]}, ckpt / "custom_checkpoint_0.pkl")
        torch.save({"shadow_params": []}, ckpt / "custom_checkpoint_1.pkl")
    else:
        torch.save({"state": _Payload(marker)}, ckpt / target)
    with pytest.raises(UnsafeCheckpointError, match=f"{target} was refused.*nothing in it was executed"):
        main(MaskDiTRecipe(), tiny_args(tmp_path, resume_from_checkpoint="latest"))
    assert not marker.exists()
    assert not (tmp_path / "run" / "model_index.json").exists()


@needs_fmnist
def test_old_format_checkpoint_resumes_safely_and_exactly(stopped_run, tmp_path):
    new = _copy(stopped_run, tmp_path, "new")
    old = _copy(stopped_run, tmp_path, "old")
    for index, name in enumerate(("train_state", "ema")):
        torch.save(load_state(old, name), old / f"custom_checkpoint_{index}.pkl")
        for ext in ("json", "safetensors"):
            (old / f"{name}.{ext}").unlink()
    before = sorted(p.name for p in old.iterdir())
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="new", resume_from_checkpoint="latest"))
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="old", resume_from_checkpoint="latest"))
    a = load_file(new.parent / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(old.parent / "transformer" / "diffusion_pytorch_model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert sorted(p.name for p in old.iterdir()) == before  # the old checkpoint is left as it was
    assert (old / "custom_checkpoint_0.pkl").exists() and not (old / "train_state.json").exists()
    assert (old.parent / "checkpoint-4" / "train_state.json").exists()  # new checkpoints use the new format


@needs_fmnist
def test_resume_reports_whole_run_totals_and_says_how_to_resume(stopped_run, tmp_path, capsys):
    _copy(stopped_run, tmp_path)
    first_segment_s = json.loads((stopped_run / "first_segment.json").read_text())["train_time_s"]
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="run2", stop_after_steps=2))
    out = capsys.readouterr().out
    assert "Stopped early at step 2 of 4" in out and str(tmp_path / "run2" / "checkpoint-2") in out
    assert "--resume_from_checkpoint latest" in out
    main(MaskDiTRecipe(), tiny_args(tmp_path, resume_from_checkpoint="latest"))
    done = json.loads((tmp_path / "run" / "train_results.json").read_text())
    main(MaskDiTRecipe(), tiny_args(tmp_path, resume_from_checkpoint="latest"))  # resumed at the end: 0 steps
    again = json.loads((tmp_path / "run" / "train_results.json").read_text())
    for result in (done, again):
        assert result["global_step"] == 4 and result["images_seen"] == 4 * 8
        assert result["train_time_s"] > first_segment_s > 0
        assert result["final_loss"] == done["final_loss"] and result["final_loss"] == result["final_loss"]  # no NaN
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Final loss nan" not in card and f"Final loss {done['final_loss']:.4f}" in card


@needs_fmnist
def test_latest_with_a_corrupt_newest_checkpoint_names_the_previous_one(tmp_path):
    main(MaskDiTRecipe(), tiny_args(tmp_path, stop_after_steps=2, checkpointing_steps=1))
    (tmp_path / "run" / "checkpoint-2" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="Could not resume") as err:
        main(MaskDiTRecipe(), tiny_args(tmp_path, resume_from_checkpoint="latest"))
    assert f"--resume_from_checkpoint {tmp_path / 'run' / 'checkpoint-1'}" in str(err.value)


@needs_fmnist
def test_pruning_killed_mid_delete_leaves_no_broken_checkpoint(tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        path = os.fspath(path)
        if "checkpoint-1" in os.path.basename(path) and not path.endswith(".tmp"):
            os.remove(os.path.join(path, "model.safetensors"))  # part of the folder is gone ...
            raise KeyboardInterrupt  # ... when the process is killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        main(MaskDiTRecipe(), tiny_args(tmp_path, checkpointing_steps=1, checkpoints_total_limit=1))
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    run = tmp_path / "run"
    named = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert named == ["checkpoint-2"]
    assert all((run / name / "model.safetensors").exists() for name in named)
    main(MaskDiTRecipe(), tiny_args(tmp_path, checkpointing_steps=1, checkpoints_total_limit=1,
                                    resume_from_checkpoint="latest"))
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]  # leftovers removed


# ----------------------------------------------------------------------------------------------------------------
# Output-folder lock
# ----------------------------------------------------------------------------------------------------------------
def _write_lock(folder, pid, host=None):
    from diffusers_masked.training.checkpointing import _process_start

    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "start": _process_start(pid), "since": "earlier"}
    (folder / LOCK_NAME).write_text(json.dumps(record))


def test_a_second_live_run_on_the_same_folder_is_refused(tmp_path, monkeypatch):
    import diffusers_masked.training.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("data loading started although the folder is locked")

    monkeypatch.setattr(trainer, "TrainingData", refuse)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "run", owner.pid)
        with pytest.raises(RuntimeError, match=rf"pid {owner.pid} on {socket.gethostname()}.*another --output_dir"):
            main(MaskDiTRecipe(), tiny_args(tmp_path))
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == owner.pid  # left alone
    finally:
        owner.kill()
        owner.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    lock = OutputDirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert "no longer alive" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_refused_with_the_fix(tmp_path):
    _write_lock(tmp_path, 12345, host="elsewhere")
    with pytest.raises(RuntimeError, match=r"host 'elsewhere'.*delete .*" + LOCK_NAME.replace(".", r"\.")):
        OutputDirLock(tmp_path).acquire()


@needs_fmnist
def test_a_finished_run_releases_its_lock(stopped_run):
    assert not (stopped_run / "run" / LOCK_NAME).exists()
