"""Write ``.t2i_carry/`` for ``bash benchmarks/run_gpu.sh text_to_image`` on a lent GPU machine.

The default Fashion-MNIST scenes and the MiniLM text encoder do not fit the device's 64 MiB carry together (scenes
from the raw idx files 30 MB, MiniLM 91 MB in fp32, 45 MB in fp16). This writes, xz-compressed:

- ``scenes.tar.xz``: the default scenes (``make_fashion_mnist_scenes.py`` with its defaults), folder ``scenes_test``;
- ``minilm_scenes.tar.xz``: an fp16 copy of the pip package's MiniLM whose word-embedding rows are zeroed for every
  token id that no scene caption uses (a block of zeros compresses to almost nothing). On the scene captions its
  last hidden states equal the fp16 copy's exactly; this script checks that before it writes anything. It is a
  benchmark artifact for these captions only, not a text encoder to ship.

    python benchmarks/make_t2i_carry.py --out .t2i_carry      # ~45 MB, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

import torch


def scene_captions(scenes: Path) -> List[str]:
    """Every caption of the train and test splits (a list field means several captions per image)."""
    captions: List[str] = []
    for split in ("train", "test"):
        for line in open(scenes / split / "metadata.jsonl"):
            for key, value in json.loads(line).items():
                if key == "file_name":
                    continue
                captions.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    return captions


def trimmed_encoder(captions: List[str], out: Path) -> None:
    """The fp16 MiniLM with the word-embedding rows that no caption uses set to zero, checked against the copy."""
    from safetensors.torch import save_file

    from diffusers_masked.utils.text_encoders import load_text_encoder

    full, tokenizer = load_text_encoder(None, dtype=torch.float16)
    full.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    used = set(tokenizer.all_special_ids)
    for i in range(0, len(captions), 4096):
        for ids in tokenizer(captions[i:i + 4096])["input_ids"]:
            used.update(ids)
    state = {k: v.clone() for k, v in full.state_dict().items()}
    (key,) = [k for k in state if k.endswith("word_embeddings.weight")]
    unused = torch.ones(state[key].shape[0], dtype=torch.bool)
    unused[sorted(used)] = False
    state[key][unused] = 0
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float32"  # loads upcast unless the trainer asks for bf16
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "kept_token_ids.json").write_text(json.dumps(sorted(used)))

    trimmed, _ = load_text_encoder(out, dtype=torch.float16)
    batch = tokenizer(captions[:256] + captions[-256:], padding="max_length", max_length=48, truncation=True,
                      return_tensors="pt")
    with torch.no_grad():
        diff = (full(**batch).last_hidden_state.float() - trimmed(**batch).last_hidden_state.float()).abs().max()
    if diff != 0:
        sys.exit(f"the trimmed encoder differs from the fp16 copy on scene captions (max {diff.item():g}); not written")
    print(f"MiniLM: {len(used)} of {state[key].shape[0]} token ids kept; identical on 512 scene captions")


def xz(source: Path, archive: Path) -> None:
    with open(archive, "wb") as f:
        tar = subprocess.Popen(["tar", "cf", "-", "-C", str(source.parent), source.name], stdout=subprocess.PIPE)
        subprocess.run(["xz", "-T2", "-6"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait():
            sys.exit(f"tar of {source} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".t2i_carry")
    parser.add_argument("--fashion_mnist_dir", default=None, help="Raw Fashion-MNIST idx folder (default: system).")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        scenes = Path(tmp) / "scenes_test"
        cmd = [sys.executable, "train_examples/make_fashion_mnist_scenes.py", "--output_dir", str(scenes)]
        if args.fashion_mnist_dir:
            cmd += ["--fashion_mnist_dir", args.fashion_mnist_dir]
        subprocess.run(cmd, check=True)
        encoder = Path(tmp) / "minilm_scenes"
        encoder.mkdir()
        trimmed_encoder(scene_captions(scenes), encoder)
        xz(scenes, out / "scenes.tar.xz")
        xz(encoder, out / "minilm_scenes.tar.xz")
    for f in sorted(out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
