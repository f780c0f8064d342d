"""README.md as a new user meets it: every ```python block runs as written, and every command of the ```bash blocks
uses only flags its script knows.

A snippet that needs a trained result names it in an HTML comment on the line before the block, which this test
reads (``<!-- readme-test: needs=trained_maskdit,lora,classifier reduce -->``):

- ``trained_maskdit``: a pipeline folder at ``./output/maskdit-fashion-mnist``, as the quickstart's main job writes
  it (MaskDiT, 1x28x28, the Fashion-MNIST class names, the EDM scheduler), but with a tiny random transformer;
- ``lora``: a LoRA folder at ``output/maskdit-lora-upside-down`` for that pipeline, as the LoRA example writes it;
- ``classifier``: a tiny FD-FMNIST classifier in a temporary cache instead of training the real one (~1 minute);
- ``reduce``: the snippet is heavy as written (e.g. 1000 samples x 40 steps); the test runs it with the
  substitutions in `REDUCTIONS` and says so. Everything else runs exactly as written.

Snippets run in a temporary working directory, each in a fresh namespace. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Set

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->")
KNOWN_NEEDS = {"trained_maskdit", "lora", "classifier"}
# Heavy snippets (marked ``reduce``) run with fewer samples / steps: same code path, seconds instead of minutes.
REDUCTIONS = {"num_samples=1000": "num_samples=16", "num_inference_steps=40": "num_inference_steps=2"}


class Block(NamedTuple):
    lang: str
    code: str
    line: int
    needs: Set[str]
    reduce: bool


def readme_blocks(lang: str) -> List[Block]:
    text = README.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        needs: Set[str] = set()
        reduce = False
        marker = MARKER.search(before)
        if marker:
            for word in marker.group(1).split():
                if word.startswith("needs="):
                    needs |= set(filter(None, word[len("needs="):].split(",")))
                elif word == "reduce":
                    reduce = True
                else:
                    raise AssertionError(f"README.md: unknown readme-test option {word!r}")
        unknown = needs - KNOWN_NEEDS
        assert not unknown, f"README.md: unknown readme-test needs {sorted(unknown)}; known: {sorted(KNOWN_NEEDS)}"
        blocks.append(Block(lang, m.group(2), text[: m.start()].count("\n") + 1, needs, reduce))
    return blocks


PYTHON_BLOCKS = readme_blocks("python")
BASH_BLOCKS = readme_blocks("bash")


def test_readme_has_snippets():
    assert len(PYTHON_BLOCKS) >= 5 and len(BASH_BLOCKS) >= 5


# ------------------------------------------------------------------------------------------------------------------
# Fixtures: what the README's commands would have written
# ------------------------------------------------------------------------------------------------------------------
def _tiny_maskdit():
    from testing_utils import randomize

    from diffusers_masked import MaskDiTTransformer2DModel

    torch.manual_seed(0)
    model = MaskDiTTransformer2DModel(sample_size=28, patch_size=4, in_channels=1, hidden_size=32, num_layers=2,
                                      num_attention_heads=4, decoder_hidden_size=16, num_decoder_layers=1,
                                      decoder_num_attention_heads=2, num_classes=10)
    return randomize(model).eval()


def make_trained_maskdit(root: Path) -> Path:
    """``output/maskdit-fashion-mnist`` like the quickstart's main job saves it, with a tiny transformer."""
    from diffusers_masked import MaskDiTPipeline
    from diffusers_masked.data import FASHION_MNIST_CLASSES
    from diffusers_masked.training.objectives import build_objective

    out = root / "output" / "maskdit-fashion-mnist"
    pipe = MaskDiTPipeline(transformer=_tiny_maskdit(), scheduler=build_objective("edm").inference_scheduler(),
                           id2label=dict(enumerate(FASHION_MNIST_CLASSES)))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_lora(root: Path) -> Path:
    """``output/maskdit-lora-upside-down`` like the LoRA example saves it (as `Trainer.save_lora`)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers_masked import MaskDiTPipeline, MaskDiTTransformer2DModel

    base = root / "output" / "maskdit-fashion-mnist"
    model = MaskDiTTransformer2DModel.from_pretrained(base, subfolder="transformer")
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    out = root / "output" / "maskdit-lora-upside-down"
    MaskDiTPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model),
                                      transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return out


def make_classifier(cache: Path) -> Path:
    """A tiny classifier where the evaluation looks for the cached default one (it would train it otherwise)."""
    from diffusers_masked.evaluation import FashionMNISTClassifier, save_classifier
    from diffusers_masked.evaluation.classifier import default_classifier_path

    torch.manual_seed(0)
    model = FashionMNISTClassifier(channels=(4, 8), hidden_size=16).eval()
    return save_classifier(model, {"test_accuracy": None, "note": "tiny test stand-in"}, default_classifier_path(cache))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFUSERS_MASKED_CACHE", str(tmp_path / "cache"))  # never the user's ~/.cache
    return tmp_path


def _needs_fashion_mnist() -> None:
    from diffusers_masked.data import FASHION_MNIST_DIR

    if not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"README.md:{b.line}" for b in PYTHON_BLOCKS])
def test_python_snippet_runs(block: Block, workdir: Path):
    if "trained_maskdit" in block.needs or "lora" in block.needs:
        make_trained_maskdit(workdir)
    if "lora" in block.needs:
        make_lora(workdir)
    if "classifier" in block.needs:
        _needs_fashion_mnist()  # the reference statistics are Fashion-MNIST's test split
        make_classifier(workdir / "cache")
    code = block.code
    if block.reduce:
        for old, new in REDUCTIONS.items():
            code = code.replace(old, new)
        assert code != block.code, f"README.md:{block.line} is marked `reduce` but none of {list(REDUCTIONS)} occurs"
    namespace: Dict[str, object] = {"__name__": "__readme__"}
    with torch.random.fork_rng(devices=[]):
        exec(compile(code, f"README.md:{block.line}", "exec"), namespace)


# ------------------------------------------------------------------------------------------------------------------
# Bash blocks: every flag of every `python ...` command exists in that script's --help
# ------------------------------------------------------------------------------------------------------------------
class Command(NamedTuple):
    target: str  # a script path relative to the repo, or "-m module"
    args: List[str]
    line: int


def bash_commands() -> List[Command]:
    commands = []
    for block in BASH_BLOCKS:
        joined = re.sub(r"\\\n\s*", " ", block.code)
        for offset, raw in enumerate(joined.splitlines()):
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"&&|;", line):
                words = shlex.split(part, comments=True)
                if words[:2] == ["accelerate", "launch"]:
                    words = words[2:]
                    while words and not words[0].endswith(".py"):  # accelerate's own options
                        words = words[1:]
                    words = ["python"] + words
                if not words or words[0] != "python" or len(words) < 2:
                    continue
                if words[1] == "-m":
                    if words[2] == "pytest":
                        continue
                    commands.append(Command(f"-m {words[2]}", words[3:], block.line + offset))
                else:
                    commands.append(Command(words[1], words[2:], block.line + offset))
    return commands


BASH_COMMANDS = bash_commands()
_HELP: Dict[str, str] = {}


def _run_main(target: str, argv: List[str]) -> str:
    """Run a script / module in-process with ``argv``; returns what it printed (argparse exits are expected)."""
    out = io.StringIO()
    old_argv = sys.argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if target.startswith("-m "):
                sys.argv = [target[3:], *argv]
                with pytest.raises(SystemExit):
                    runpy.run_module(target[3:], run_name="__main__", alter_sys=False)
            else:
                sys.argv = [str(REPO / target), *argv]
                with pytest.raises(SystemExit):
                    runpy.run_path(str(REPO / target), run_name="__main__")
    finally:
        sys.argv = old_argv
    return out.getvalue()


def script_help(target: str) -> str:
    if target not in _HELP:
        _HELP[target] = _run_main(target, ["--help"])
    return _HELP[target]


def _training_recipe(target: str):
    from diffusers_masked.training.recipe import TrainingRecipe

    found = [v for v in runpy.run_path(str(REPO / target), run_name="__readme__").values()
             if isinstance(v, type) and issubclass(v, TrainingRecipe) and v is not TrainingRecipe]
    return found[0]() if len(found) == 1 else None


@pytest.mark.parametrize("command", BASH_COMMANDS, ids=[f"README.md:{c.line}:{c.target}" for c in BASH_COMMANDS])
def test_bash_command_flags_exist(command: Command):
    if not command.target.startswith("-m "):
        assert (REPO / command.target).is_file(), f"README.md:{command.line}: {command.target} does not exist"
    help_text = script_help(command.target)
    assert "usage:" in help_text, help_text[-2000:]
    flags = [a.split("=", 1)[0] for a in command.args if a.startswith("--")]
    known = set(re.findall(r"(--[A-Za-z0-9][\w-]*)", help_text))
    missing = [f for f in flags if f not in known]
    assert not missing, f"README.md:{command.line}: {command.target} has no flag(s) {missing}"
    if command.target.startswith("train_examples/train_"):
        # The values parse too (types, choices); nothing loads, no file has to exist.
        from diffusers_masked.training.trainer import build_parser

        recipe: Optional[object] = _training_recipe(command.target)
        if recipe is not None:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    build_parser(recipe).parse_args(command.args)
            except SystemExit:
                pytest.fail(f"README.md:{command.line}: {command.target} {' '.join(command.args)}\n"
                            f"{err.getvalue().strip().splitlines()[-1]}")
