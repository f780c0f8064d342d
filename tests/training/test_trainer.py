import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusers_masked import MaskDiTPipeline
from diffusers_masked.training import main
from diffusers_masked.training.hub import HUB_IGNORE_PATTERNS, prepare_hub_upload
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe
from diffusers_masked.training.trainer import parse_args

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)
TINY = dict(patch_size=7, hidden_size=32, num_layers=2, num_attention_heads=2, decoder_hidden_size=16,
            num_decoder_layers=1, decoder_num_attention_heads=2)


def tiny_args(tmp_path, out="run", **extra):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    args = ["--output_dir", str(tmp_path / out), "--model_config", str(cfg), "--max_train_samples", "64",
            "--train_batch_size", "8", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--validation_steps", "0", "--validation_inference_steps", "2", "--validation_images_per_class", "1",
            "--report_to", "none", "--logging_steps", "1", "--learning_rate", "1e-3", "--use_ema"]
    for key, value in extra.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


@needs_fmnist
def test_tiny_run_writes_a_loadable_pipeline(tmp_path):
    result = main(MaskDiTRecipe(), tiny_args(tmp_path, unmasked_finetune_steps=1))
    out = tmp_path / "run"
    assert result["finished"] and result["global_step"] == 4 and np.isfinite(result["final_loss"])
    for name in ("model_index.json", "README.md", "sample_grid.png", "train_results.json", "checkpoint-4"):
        assert (out / name).exists(), name
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, MaskDiTPipeline)
    assert pipe.id2label[9] == "Ankle boot"
    img = pipe(["Sneaker", "Bag"], num_inference_steps=2, output_type="np").images
    assert img.shape == (2, 28, 28, 1)
    card = (out / "README.md").read_text()
    assert "MaskDiT" in card and "Fashion-MNIST" in card and "library_name: diffusers" in card
    assert Image.open(out / "sample_grid.png").size[0] >= 28


@needs_fmnist
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="straight"))
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="resumed", stop_after_steps=2))
    partial = tmp_path / "resumed"
    assert (partial / "checkpoint-2").exists() and not (partial / "model_index.json").exists()
    # a half-written checkpoint (killed mid-save) must not be picked as "latest"
    (partial / ".checkpoint-3.tmp").mkdir()
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="resumed", resume_from_checkpoint="latest"))
    a = load_file(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(partial / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((tmp_path / "straight" / "train_results.json").read_text())
    rb = json.loads((partial / "train_results.json").read_text())
    assert ra["final_loss"] == rb["final_loss"]


@needs_fmnist
def test_checkpoints_total_limit_and_corrupt_checkpoint(tmp_path):
    main(MaskDiTRecipe(), tiny_args(tmp_path, checkpoints_total_limit=1, checkpointing_steps=1))
    ckpts = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-4"]
    bad = tmp_path / "run" / "checkpoint-4"
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="Could not resume"):
        main(MaskDiTRecipe(), tiny_args(tmp_path, resume_from_checkpoint=str(bad), max_train_steps=6))


def test_unmasked_finetune_default_is_a_share_of_the_steps():
    assert parse_args(MaskDiTRecipe(), ["--max_train_steps", "200"]).model.unmasked_finetune_steps == 20
    assert parse_args(MaskDiTRecipe(), ["--max_train_steps", "200", "--unmasked_finetune_steps", "0"]).model.unmasked_finetune_steps == 0


def test_bad_flags_fail_early(tmp_path, capsys):
    # More cases, and that nothing loads first, in test_cli.py.
    with pytest.raises(SystemExit) as exit_info:
        parse_args(MaskDiTRecipe(), ["--mask_ratio", "1.0"])
    assert exit_info.value.code == 2 and "--mask_ratio 1" in capsys.readouterr().err


def test_fsdp_refuses_main_process_sampling():
    from diffusers_masked.training.cli import check_fsdp as check_fsdp_args

    args = parse_args(MaskDiTRecipe(), ["--no-use_ema", "--validation_steps", "0"])
    check_fsdp_args(args)  # what an FSDP run can do
    for flags, needle in ((["--use_ema", "--validation_steps", "0"], "--no-use_ema"),
                          (["--no-use_ema"], "--validation_steps 0"),
                          (["--no-use_ema", "--validation_steps", "0", "--eval_every_steps", "5"], "eval_every_steps")):
        with pytest.raises(ValueError, match=needle):
            check_fsdp_args(parse_args(MaskDiTRecipe(), flags))


@needs_fmnist
def test_bad_data_fails_early(tmp_path):
    with pytest.raises(ValueError, match="in_channels 3 does not match"):
        main(MaskDiTRecipe(), tiny_args(tmp_path, in_channels=3))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):  # a usage error now (test_cli.py)
        main(MaskDiTRecipe(), tiny_args(tmp_path, train_data_dir=str(empty)))
    with pytest.raises(SystemExit):
        main(MaskDiTRecipe(), tiny_args(tmp_path, resolution=30))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="ddp_comm_hook bf16 needs CUDA"):
            main(MaskDiTRecipe(), tiny_args(tmp_path, ddp_comm_hook="bf16"))


@needs_fmnist
def test_torch_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    seen = []

    def fake_compile(model, **kwargs):  # record only: inductor on CPU would dominate the suite's time
        seen.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    args = tiny_args(tmp_path, torch_compile_mode="reduce-overhead")
    args[args.index("--max_train_steps") + 1] = "1"
    assert main(MaskDiTRecipe(), args)["global_step"] == 1
    assert seen == [{"mode": "reduce-overhead"}]
    with pytest.raises(SystemExit):
        parse_args(MaskDiTRecipe(), ["--torch_compile_mode", "fast"])


@needs_fmnist
def test_compiled_run_trains_in_one_graph_and_samples_eagerly(tmp_path, monkeypatch):
    """A real dynamo trace (eager backend: no inductor on CPU): the training forward is one graph, and the
    validation and final sample grids run the eager module instead of compiling the model again for inference."""
    real_compile, grad_modes = torch.compile, []

    def eager_compile(model, **kwargs):
        compiled = real_compile(model, backend="eager", fullgraph=True)  # a graph break raises
        compiled.register_forward_pre_hook(lambda mod, inputs: grad_modes.append(torch.is_grad_enabled()))
        return compiled

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    result = main(MaskDiTRecipe(), tiny_args(tmp_path, torch_compile=True, validation_steps=2))
    torch._dynamo.reset()
    assert result["finished"] and (tmp_path / "run" / "samples" / "step_0000002.png").exists()
    assert grad_modes == [True] * 4  # the 4 training steps only


def test_image_folder_with_class_subfolders_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    args = tiny_args(tmp_path, train_data_dir=str(tmp_path / "data"), resolution=14, random_flip=True)
    args[args.index("--max_train_steps") + 1] = "2"
    main(MaskDiTRecipe(), args)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run")
    assert pipe.transformer.config.in_channels == 3 and pipe.id2label == {0: "cats", 1: "dogs"}
    assert pipe("dogs", num_inference_steps=2, output_type="np").images.shape == (1, 14, 14, 3)


def test_vae_latent_cache(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / f"{i}.png")
    cfg = tmp_path / "tiny.json"
    args = tiny_args(tmp_path, train_data_dir=str(tmp_path / "data"), vae_path=str(tmp_path / "vae"), cache_latents=True)
    TINY_LAT = {**TINY, "patch_size": 2}
    args[args.index("--model_config") + 1] = str(cfg)
    cfg.write_text(json.dumps(TINY_LAT))
    args[args.index("--max_train_steps") + 1] = "2"
    main(MaskDiTRecipe(), args)
    meta = json.loads((tmp_path / "run" / "latent_cache" / "meta.json").read_text())
    assert meta["shape"] == [16, 8, 8, 8] and meta["flip"]  # 8 images + 8 flips, mean+logvar of 4 channels
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run")
    assert pipe.vae is not None and pipe.transformer.config.in_channels == 4
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_hub_upload_is_prepared_without_network(tmp_path, monkeypatch):
    import huggingface_hub

    from diffusers_masked.training import hub

    args = parse_args(MaskDiTRecipe(), ["--push_to_hub", "--hub_model_id", "me/maskdit", "--hub_token", "tok"])
    upload = prepare_hub_upload(args.hub, tmp_path)
    assert upload["repo_id"] == "me/maskdit" and upload["folder_path"] == str(tmp_path)
    assert "checkpoint-*" in upload["ignore_patterns"] and upload["ignore_patterns"] == HUB_IGNORE_PATTERNS
    calls = {}

    class Repo:
        repo_id = "me/maskdit"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: calls.setdefault("create", (a, k)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.setdefault("upload", k))
    assert hub.push_to_hub(args.hub, tmp_path) == "me/maskdit"
    assert calls["upload"]["repo_id"] == "me/maskdit" and calls["create"][0] == ("me/maskdit",)
    with pytest.raises(ValueError, match="hub_model_id"):
        prepare_hub_upload(parse_args(MaskDiTRecipe(), ["--push_to_hub"]).hub, tmp_path)


@needs_fmnist
def test_two_process_cpu_run_resumes_exactly(tmp_path):
    """Real 2-process DDP (gloo) on CPU: an interrupted + resumed run ends with the uninterrupted run's weights.

    Each process draws its own noise; the checkpoint must restore every process's generator, not only rank 0's."""
    # `--cpu --num_processes 2` alone starts ONE process; ACCELERATE_USE_CPU + --multi_gpu gives 2 gloo workers.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(REPO / "train_examples" / "train_maskdit.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}

    def run(out, *extra):
        import socket

        with socket.socket() as sock:  # a free rendezvous port per launch (no clash with a lingering one)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        args = tiny_args(tmp_path, out=out, **{"max_train_steps": 4, "checkpointing_steps": 2})
        cmd = launch[:3] + ["--main_process_port", str(port)] + launch[3:] + args + list(extra)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    log = run("ref")
    assert "global batch 16" in log  # 2 processes x 8
    run("resumed", "--stop_after_steps", "2")
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    assert "Resumed" in run("resumed", "--resume_from_checkpoint", "latest")
    ref = load_file(tmp_path / "ref" / "transformer" / "diffusion_pytorch_model.safetensors")
    got = load_file(tmp_path / "resumed" / "transformer" / "diffusion_pytorch_model.safetensors")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=key)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "ref")
    assert pipe([1], num_inference_steps=2, output_type="np").images.shape == (1, 28, 28, 1)


@needs_fmnist
def test_eval_hook_and_wall_clock_budget(tmp_path, monkeypatch):
    import diffusers_masked.evaluation as evaluation

    calls = []

    def fake_evaluate(pipe, **kwargs):
        calls.append(kwargs)
        assert not pipe.transformer.training  # scored in eval mode (EMA weights)
        return {"metrics": {"fd": 10.0 / len(calls), "conditional_accuracy": 0.5}}

    monkeypatch.setattr(evaluation, "evaluate_pipeline", fake_evaluate)
    args = tiny_args(tmp_path, eval_every_steps=2, eval_num_samples=8, max_train_time_minutes=0.0)
    args[args.index("--max_train_steps") + 1] = "100"
    result = main(MaskDiTRecipe(), args)
    # the zero budget stops after the first step; the run still finishes with a pipeline and a final evaluation
    assert result["finished"] and result["global_step"] == 1
    assert (tmp_path / "run" / "model_index.json").exists()
    log = [json.loads(x) for x in (tmp_path / "run" / "eval_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 1 and log[-1]["eval/fd"] == 10.0 and "wall_clock_s" in log[-1]
    assert calls[0]["num_samples"] == 8 and result["eval/conditional_accuracy"] == 0.5


@needs_fmnist
@pytest.mark.parametrize("objective,flag,expected", [
    ("epsilon", None, "DPMSolverMultistepScheduler"),  # DDPM objectives sample validation with DPM-Solver++
    ("epsilon", "saved", "DDPMScheduler"),
    ("edm", None, "EDMEulerScheduler"),
    ("edm", "EDMDPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler"),
])
def test_validation_scheduler(tmp_path, monkeypatch, objective, flag, expected):
    import diffusers_masked.evaluation as evaluation

    seen = []

    def fake_evaluate(pipe, **kwargs):
        seen.append(type(pipe.scheduler).__name__)
        return {"metrics": {"fd": 1.0}, "settings": {"scheduler": type(pipe.scheduler).__name__}}

    monkeypatch.setattr(evaluation, "evaluate_pipeline", fake_evaluate)
    extra = {"objective": objective, "eval_every_steps": 2, "eval_num_samples": 8, "max_train_steps": 2}
    if flag:
        extra["validation_scheduler"] = flag
    main(MaskDiTRecipe(), tiny_args(tmp_path, **extra))
    assert seen and set(seen) == {expected}
    log = [json.loads(x) for x in (tmp_path / "run" / "eval_log.jsonl").read_text().splitlines()]
    assert log[-1]["scheduler"] == expected
    # The saved pipeline keeps the objective's own scheduler.
    saved = json.loads((tmp_path / "run" / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    assert saved == ("DDPMScheduler" if objective == "epsilon" else "EDMEulerScheduler")


@needs_fmnist
def test_data_kept_on_the_device_trains_and_resumes_as_the_loader(tmp_path):
    """--data_on_device always (the CPU stands in for the accelerator) feeds the same batches in the same order as
    the DataLoader, through a stop and resume: the weights come out identical."""
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="loader", data_on_device="never"))
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="device", data_on_device="always", stop_after_steps=2))
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="device", data_on_device="always", resume_from_checkpoint="latest"))
    a = load_file(tmp_path / "loader" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "device" / "transformer" / "diffusion_pytorch_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
