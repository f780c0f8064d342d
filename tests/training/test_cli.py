"""Every command-line tool: `--help` works and its help states defaults that agree with the parser; bad flags are
usage errors (exit code 2, the flag and the value named) raised before anything loads."""

import argparse
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_masked.training import main
from diffusers_masked.training.recipe_deferred_maskdit import DeferredMaskDiTRecipe
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe
from diffusers_masked.training.recipe_mdt import MDTv2Recipe

REPO = Path(__file__).resolve().parents[2]


def _clis():
    scripts = sorted(REPO.glob("train_examples/*.py")) + sorted(REPO.glob("scripts/convert_*.py"))
    scripts += [p for p in sorted(REPO.glob("benchmarks/*.py"))
                if "argparse" in p.read_text() and "__main__" in p.read_text()]
    return [str(p.relative_to(REPO)) for p in scripts] + ["-m diffusers_masked.evaluate"]


CLIS = _clis()


def _help_and_parsers(cli, monkeypatch, capsys):
    """Run ``cli --help`` in this process (imports are shared, so it is fast); return its output and every parser
    that parsed."""
    parsers = []
    real = argparse.ArgumentParser.parse_known_args

    def spy(self, *args, **kwargs):
        parsers.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", spy)
    monkeypatch.setattr(sys, "argv", [cli, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        if cli.startswith("-m "):
            runpy.run_module(cli[3:], run_name="__main__")
        else:
            monkeypatch.syspath_prepend(str(REPO / Path(cli).parent))
            runpy.run_path(str(REPO / cli), run_name="__main__")
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out, parsers


_STATED = re.compile(r"\(default:?\s*([^\s,;)]+)|default:\s*([^\s,;)]+)", re.IGNORECASE)


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _default_problems(parser):
    """Flags whose help states "(default" twice, or states a default that the parser does not have."""
    problems = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        rendered = formatter._expand_help(action)
        name = "/".join(action.option_strings) or action.dest
        if rendered.lower().count("(default") > 1:
            problems.append(f"{name}: {rendered!r}")
        # What the help text itself claims (the formatter's own "%(default)s" is right by construction).
        own = re.sub(r"%\(\w+\)s", "", action.help).replace("%%", "%")
        for match in _STATED.finditer(own):
            stated = (match.group(1) or match.group(2)).rstrip(".").strip("'\"")
            default = action.default
            if default is None:
                if _is_number(stated):
                    problems.append(f"{name}: help says default {stated}, the parser's default is None")
            elif isinstance(default, (int, float, str)) and not isinstance(default, bool):
                same = (float(stated) == float(default)) if _is_number(stated) and _is_number(str(default)) \
                    else stated == str(default)
                if not same:
                    problems.append(f"{name}: help says default {stated}, the parser's default is {default!r}")
    return problems


@pytest.mark.parametrize("cli", CLIS)
def test_help_works_and_states_defaults_that_match_the_parser(cli, monkeypatch, capsys):
    out, parsers = _help_and_parsers(cli, monkeypatch, capsys)
    assert "usage:" in out and "--help" in out
    assert parsers, "no argparse parser ran"
    problems = [p for parser in parsers for p in _default_problems(parser)]
    assert not problems, "\n".join(problems)


def test_every_training_script_is_covered():
    names = {Path(c).name for c in CLIS}
    assert {"train_maskdit.py", "train_mdt.py", "train_deferred_maskdit.py", "make_upside_down_sneakers.py"} <= names


def test_mdt_mask_ratio_help_describes_the_range_default(capsys):
    from diffusers_masked.training.trainer import build_parser

    parser = build_parser(MDTv2Recipe())
    action = next(a for a in parser._actions if a.dest == "mask_ratio")
    text = parser._get_formatter()._expand_help(action)
    assert action.default is None and "--mask_ratio_range" in text and "0.3" not in text


# ----------------------------------------------------------------------------------------------------------------
# Usage errors
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the trainer starts (data, model): usage errors must come first."""
    import diffusers_masked.training.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer started before the flags were checked")

    monkeypatch.setattr(trainer.Trainer, "__init__", refuse)


def _usage_error(recipe, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(recipe, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _no_images_folder(tmp_path):
    folder = tmp_path / "no_images" / "Sneaker"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    return str(folder.parent)


@pytest.mark.parametrize("recipe,flags,needles", [
    (MaskDiTRecipe, ["--resolution", "30"], ["--resolution 30", "multiple of 4", "--resolution 32"]),
    (MaskDiTRecipe, ["--model_config", "/missing/config.json"],
     ["--model_config /missing/config.json", "does not exist", "XL/2"]),
    (MaskDiTRecipe, ["--model_config", "XXL/2"], ["--model_config XXL/2", "unknown preset", "XL/2"]),
    (MaskDiTRecipe, ["--mask_ratio", "1.5"], ["--mask_ratio 1.5", "[0, 1)"]),
    (MDTv2Recipe, ["--mask_ratio_range", "0.5", "1.2"], ["--mask_ratio_range 0.5 1.2", "HIGH < 1"]),
    (DeferredMaskDiTRecipe, ["--max_train_steps", "0"], ["--max_train_steps 0", ">= 1"]),
    (MaskDiTRecipe, ["--max_train_steps", "5", "--unmasked_finetune_steps", "6"], ["--unmasked_finetune_steps 6"]),
    (MaskDiTRecipe, ["--cache_latents"], ["--cache_latents needs --vae_path"]),
    (MaskDiTRecipe, ["--validation_scheduler", "NoSuchScheduler"], ["--validation_scheduler NoSuchScheduler"]),
    (MaskDiTRecipe, ["--lora_rank", "4"], ["--lora_rank needs --pretrained_model_name_or_path"]),
    (MaskDiTRecipe, ["--train_data_dir", "NO_IMAGES"], ["--train_data_dir", "no image files"]),
    (MaskDiTRecipe, ["--resume_from_checkpoint", "/missing/checkpoint-3"], ["--resume_from_checkpoint /missing"]),
])
def test_bad_flags_are_usage_errors_before_anything_loads(recipe, flags, needles, tmp_path, capsys, nothing_loads):
    flags = [_no_images_folder(tmp_path) if f == "NO_IMAGES" else f for f in flags]
    out = tmp_path / "out"
    err = _usage_error(recipe(), ["--output_dir", str(out), *flags], capsys)
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


def test_resolution_is_checked_against_the_model_config_file(tmp_path, capsys, nothing_loads):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_attention_heads": 2}))
    err = _usage_error(MaskDiTRecipe(), ["--model_config", str(cfg)], capsys)  # Fashion-MNIST is 28 px
    assert "28" in err and "multiple of 8" in err and "--resolution 32" in err


def test_usage_error_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train_examples" / "train_maskdit.py"), "--mask_ratio", "1.5",
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--mask_ratio 1.5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
