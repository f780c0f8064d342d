"""Fashion-MNIST scenes: a captioned data set, generated from the embedded Fashion-MNIST, that a model can only fit
by reading its captions (which item is where), plus the caption grammar and a parser back to the layout.

Geometry
    A scene is a 64x64 grey image cut into a 2x2 grid of 32x32 cells, numbered in reading order
    ``0 = top left, 1 = top right, 2 = bottom left, 3 = bottom right``. A cell holds one 28x28 Fashion-MNIST item or
    nothing. An item is pasted unchanged (no resampling) at the centre of its cell, i.e. with a 2-pixel black border
    on every side, so the central 28x28 crop of a cell is exactly the original item: the scene metric
    (`diffusers_masked.evaluation.scenes`) shows the classifier the very input it was trained on. Background is 0.

Layout
    4 class ids (``FASHION_MNIST_CLASSES`` order) in cell order, ``-1`` (`EMPTY`) for an empty cell. A scene holds
    1 to 4 items (the count uniform, then which cells uniform, each item's class uniform, the picture uniform among
    that class's pictures of the split).

Captions (several per image, first one canonical)
    Every named item is one clause "item + position"; empty cells are never mentioned. Templates::

        at       "a bag at top left and a sneaker at bottom right"
        colon    "bottom right: a sneaker and top left: a bag"
        corner   "a sneaker in the lower right corner and a bag in the upper left corner"
        there    "at the bottom right there is a sneaker, and at the top left there is a bag"

    Clauses are joined by ", " with " and " (or ", and " for "there") before the last one. The first caption of an
    image uses the "at" template in reading order; the others use every template once, each with the clauses in a
    random order (duplicates dropped, so a one-item scene has fewer distinct captions).

Grammar (what `parse_caption` accepts; case, hyphens and extra spaces do not matter)
    caption   := clause (separator clause)*     separator := "," | ";" | "." | "and"
    clause    := one ITEM phrase and one POSITION phrase, in either order, among FILLER words
    ITEM      := the class names of `ITEM_NAMES` and a few synonyms ("tshirt", "trousers", "pants", "sweater",
                 "jacket", "sandals", "sneakers", "trainer", "handbag", "boot", ...; all in `ITEM_PHRASES`)
    POSITION  := (top | upper | bottom | lower) (left | right), or the two words swapped
    FILLER    := a | an | the | at | in | on | is | there | corner | cell | ":"
    Each position may be named once per caption; an unknown word is an error that names it.

Held-out split
    The test split's items come from the Fashion-MNIST test split. Its captions are held out as well: a fixed
    ``holdout_fraction`` of all 14,640 possible layouts (chosen by a hash of the layout, independent of the seed) is
    reserved for the test split and never drawn for training, so the scene score measures composition of known
    words into unseen arrangements, not recall of training captions.

Written to disk (``write_scenes``, script ``train_examples/make_fashion_mnist_scenes.py``) as an image folder per
split with a ``metadata.jsonl`` in the format of diffusers' ``train_text_to_image.py`` / HF ``imagefolder``::

    {"file_name": "00000.png", "text": ["a bag at top left", ...], "layout": [8, -1, -1, -1],
     "fashion_mnist_index": [1234, -1, -1, -1]}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays

SCENE_SIZE = 64
GRID = 2
CELL_SIZE = SCENE_SIZE // GRID
ITEM_SIZE = 28
#: Black border around an item inside its cell: (32 - 28) / 2.
ITEM_OFFSET = (CELL_SIZE - ITEM_SIZE) // 2
NUM_CELLS = GRID * GRID
EMPTY = -1
#: Cell names in cell order (reading order), as the captions write them.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
#: Same cells, the wording of the "corner" template.
POSITIONS_UPPER_LOWER = ("upper left", "upper right", "lower left", "lower right")
#: How the captions name each Fashion-MNIST class (with its article), in class order.
ITEM_NAMES = (
    "a t-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)
TEMPLATES = ("at", "colon", "corner", "there")
METADATA_FILE = "metadata.jsonl"
INFO_FILE = "scenes_info.json"
#: Bump when the generator's output changes, so that a folder records which version wrote it.
GENERATOR_VERSION = 1
DEFAULT_HOLDOUT_FRACTION = 0.1

# Words the parser knows for each class (display form; tokenised like captions, so "t-shirt" == "t shirt").
ITEM_SYNONYMS: Tuple[Tuple[str, ...], ...] = (
    ("t-shirt", "tshirt", "t-shirt/top", "tee shirt", "tee"),  # "T-shirt/top": the Fashion-MNIST name
    ("pair of trousers", "trousers", "trouser", "pants", "pair of pants"),
    ("pullover", "sweater", "jumper"),
    ("dress",),
    ("coat", "jacket"),
    ("sandal", "sandals", "pair of sandals"),
    ("shirt",),
    ("sneaker", "sneakers", "pair of sneakers", "trainer"),
    ("bag", "handbag"),
    ("ankle boot", "ankle boots", "pair of ankle boots", "boot", "boots"),
)


def _tokens(caption: str) -> List[str]:
    # Hyphens and slashes join words ("t-shirt", "top-left", "t-shirt/top"): split them like spaces.
    return re.findall(r"[a-z]+|[,;:.]", caption.lower().replace("-", " ").replace("/", " "))


ITEM_PHRASES: Dict[Tuple[str, ...], int] = {
    tuple(_tokens(phrase)): cls for cls, phrases in enumerate(ITEM_SYNONYMS) for phrase in phrases
}
# "top left" / "upper left" and the swapped "left top" (rare but unambiguous) -> cell (reading order).
_ROW_WORDS = {"top": 0, "upper": 0, "bottom": 1, "lower": 1}
_COLUMN_WORDS = {"left": 0, "right": 1}
POSITION_PHRASES: Dict[Tuple[str, ...], int] = {
    phrase: GRID * row + col
    for row_word, row in _ROW_WORDS.items()
    for col_word, col in _COLUMN_WORDS.items()
    for phrase in ((row_word, col_word), (col_word, row_word))
}
FILLER_WORDS = frozenset({"a", "an", "the", "at", "in", "on", "is", "there", "corner", "cell", ":"})
SEPARATORS = frozenset({",", ";", ".", "and"})
CAPTION_GRAMMAR = (
    "caption = clause, clause, ... and clause; a clause names one item and one position, in either order "
    "(e.g. 'a bag at top left', 'top left: a bag', 'a bag in the upper left corner', 'at the top left there is a "
    "bag'). Items: " + "; ".join(", ".join(p) for p in ITEM_SYNONYMS) + ". Positions: top/upper left, "
    "top/upper right, bottom/lower left, bottom/lower right. Filler words: " + ", ".join(sorted(FILLER_WORDS)) + ". "
    "Clauses are separated by ',', ';', '.' or 'and'; each position at most once; empty cells are not mentioned."
)

PathLike = Union[str, os.PathLike]
Layout = Sequence[int]


# --------------------------------------------------------------------------------------------------------------------
# Captions


def check_layout(layout: Layout) -> List[int]:
    """``layout`` as a list of 4 ints, checked (class ids or -1, at least one item); a clear error otherwise."""
    values = [int(v) for v in layout]
    if len(values) != NUM_CELLS or any(v != EMPTY and not 0 <= v < len(FASHION_MNIST_CLASSES) for v in values):
        raise ValueError(
            f"A layout is {NUM_CELLS} class ids (0-{len(FASHION_MNIST_CLASSES) - 1}) or {EMPTY} (empty) in cell order "
            f"{', '.join(POSITIONS)}; got {list(layout)!r}."
        )
    if all(v == EMPTY for v in values):
        raise ValueError("A scene layout must name at least one item; all four cells are empty.")
    return values


def _clause(template: str, cls: int, cell: int) -> str:
    item = ITEM_NAMES[cls]
    if template == "at":
        return f"{item} at {POSITIONS[cell]}"
    if template == "colon":
        return f"{POSITIONS[cell]}: {item}"
    if template == "corner":
        return f"{item} in the {POSITIONS_UPPER_LOWER[cell]} corner"
    if template == "there":
        return f"at the {POSITIONS[cell]} there is {item}"
    raise ValueError(f"Unknown caption template {template!r}; choose one of {', '.join(TEMPLATES)}.")


def layout_caption(layout: Layout, template: str = "at", order: Optional[Sequence[int]] = None) -> str:
    """One caption of ``layout`` with ``template`` (one of `TEMPLATES`), naming the items in cell ``order``
    (default reading order; cells of ``order`` that are empty are skipped)."""
    return _join_clauses(check_layout(layout), template, order)


def _join_clauses(values: List[int], template: str, order: Optional[Sequence[int]]) -> str:
    cells = [c for c in (order if order is not None else range(NUM_CELLS)) if values[c] != EMPTY]
    clauses = [_clause(template, values[c], c) for c in cells]
    if len(clauses) == 1:
        return clauses[0]
    last_join = ", and " if template == "there" else " and "
    return ", ".join(clauses[:-1]) + last_join + clauses[-1]


def layout_captions(layout: Layout, rng: Optional[np.random.Generator] = None) -> List[str]:
    """The captions of one image: the canonical one ("at" template, reading order) first, then every template with
    the clauses in an order drawn from ``rng`` (reading order without one); duplicates dropped."""
    values = check_layout(layout)
    filled = [c for c in range(NUM_CELLS) if values[c] != EMPTY]
    captions = [_join_clauses(values, "at", None)]
    for template in TEMPLATES:
        order = [filled[i] for i in rng.permutation(len(filled))] if rng is not None else filled
        caption = _join_clauses(values, template, order)
        if caption not in captions:
            captions.append(caption)
    return captions


def _match(tokens: List[str], i: int, table: Dict[Tuple[str, ...], int]) -> Tuple[int, int]:
    """(value, length) of the longest phrase of ``table`` at ``tokens[i:]``, or (-1, 0)."""
    for length in (4, 3, 2, 1):
        phrase = tuple(tokens[i : i + length])
        if len(phrase) == length and phrase in table:
            return table[phrase], length
    return -1, 0


def parse_caption(caption: str) -> List[int]:
    """The layout (4 class ids or -1 per cell, cell order top left, top right, bottom left, bottom right) that a
    caption in the scene grammar describes. Raises `ValueError` naming the unknown words / the broken clause and the
    grammar, so any prompt written in this grammar (not only the generated ones) can be scored."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"Cannot parse an empty scene caption ({caption!r}). Grammar: {CAPTION_GRAMMAR}")
    tokens = _tokens(caption)
    layout = [EMPTY] * NUM_CELLS
    clause_items: List[int] = []
    clause_cells: List[int] = []
    clause_words: List[str] = []
    unknown: List[str] = []

    def close_clause() -> None:
        if not clause_words:
            return  # e.g. ", and": two separators in a row
        if len(clause_items) != 1 or len(clause_cells) != 1:
            raise ValueError(
                f"Each clause of a scene caption names exactly one item and one position; the clause "
                f"{' '.join(clause_words)!r} of {caption!r} names {len(clause_items)} item(s) and "
                f"{len(clause_cells)} position(s). Grammar: {CAPTION_GRAMMAR}"
            )
        cell = clause_cells[0]
        if layout[cell] != EMPTY:
            raise ValueError(f"{caption!r} names the {POSITIONS[cell]} cell twice. Grammar: {CAPTION_GRAMMAR}")
        layout[cell] = clause_items[0]
        reset_clause()

    def reset_clause() -> None:
        clause_items.clear()
        clause_cells.clear()
        clause_words.clear()

    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in SEPARATORS:
            # With an unknown word pending, that word is the better message: it is reported once all is read.
            if unknown:
                reset_clause()
            else:
                close_clause()
            i += 1
            continue
        # Positions first: "top" never starts an item phrase, and "left"/"right" never end one.
        cell, n = _match(tokens, i, POSITION_PHRASES)
        if n:
            clause_cells.append(cell)
        else:
            cls, n = _match(tokens, i, ITEM_PHRASES)
            if n:
                clause_items.append(cls)
            elif token not in FILLER_WORDS:
                unknown.append(token)
        clause_words.extend(tokens[i : i + max(n, 1)])
        i += max(n, 1)
    if unknown:
        raise ValueError(
            f"Unknown word(s) {', '.join(repr(w) for w in dict.fromkeys(unknown))} in scene caption {caption!r}. "
            f"Grammar: {CAPTION_GRAMMAR}"
        )
    close_clause()
    if all(v == EMPTY for v in layout):
        raise ValueError(f"Scene caption {caption!r} names no item. Grammar: {CAPTION_GRAMMAR}")
    return layout


# --------------------------------------------------------------------------------------------------------------------
# Layouts and images


def is_heldout_layout(layout: Layout, fraction: float = DEFAULT_HOLDOUT_FRACTION) -> bool:
    """Whether ``layout`` is reserved for the test split: a hash of the layout (not of the seed) below ``fraction``,
    so every seed and every size of data set agree on which arrangements are held out."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(",".join(str(int(v)) for v in layout).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def sample_layout(rng: np.random.Generator, count: Optional[int] = None) -> List[int]:
    """``count`` items (default: drawn uniformly from 1-4), in cells drawn without replacement, each of a uniformly
    drawn class."""
    if count is None:
        count = int(rng.integers(1, NUM_CELLS + 1))
    cells = rng.choice(NUM_CELLS, size=count, replace=False)
    classes = rng.integers(0, len(FASHION_MNIST_CLASSES), size=count)
    layout = [EMPTY] * NUM_CELLS
    for cell, cls in zip(cells.tolist(), classes.tolist()):
        layout[cell] = cls
    return layout


def compose_scene(items: Sequence[Optional[np.ndarray]]) -> np.ndarray:
    """uint8 (64, 64) scene from 4 uint8 (28, 28) items (None = empty cell) in cell order; each item pasted unchanged
    at the centre of its 32x32 cell."""
    if len(items) != NUM_CELLS:
        raise ValueError(f"A scene has {NUM_CELLS} cells, got {len(items)} items.")
    scene = np.zeros((SCENE_SIZE, SCENE_SIZE), dtype=np.uint8)
    for cell, item in enumerate(items):
        if item is None:
            continue
        if item.shape != (ITEM_SIZE, ITEM_SIZE):
            raise ValueError(f"Items must be {ITEM_SIZE}x{ITEM_SIZE} (Fashion-MNIST), got {item.shape}.")
        y, x = cell_origin(cell)
        scene[y + ITEM_OFFSET : y + ITEM_OFFSET + ITEM_SIZE, x + ITEM_OFFSET : x + ITEM_OFFSET + ITEM_SIZE] = item
    return scene


def cell_origin(cell: int) -> Tuple[int, int]:
    """(row, column) pixel of a cell's top-left corner in a 64x64 scene."""
    row, col = divmod(int(cell), GRID)
    return row * CELL_SIZE, col * CELL_SIZE


@dataclass
class SceneSet:
    """Scenes in memory.

    Attributes:
        images: uint8 (N, 64, 64).
        layouts: int64 (N, 4), class id or -1 per cell.
        captions: N lists of captions (the first canonical).
        sources: int64 (N, 4), index of each item in its Fashion-MNIST split, -1 for empty cells (-1 everywhere when
            unknown, e.g. loaded from a folder without that column).
        split: "train" or "test" (the Fashion-MNIST split the items come from), or None when unknown.
    """

    images: np.ndarray
    layouts: np.ndarray
    captions: List[List[str]]
    sources: np.ndarray
    split: Optional[str] = None

    def __len__(self) -> int:
        return len(self.images)

    def prompts(self, choice: str = "first") -> List[str]:
        """One prompt per scene: its canonical caption (``"first"``) or phrasing ``i % n`` of scene ``i``
        (``"cycle"``, every template in turn)."""
        if choice == "first":
            return [c[0] for c in self.captions]
        if choice == "cycle":
            return [c[i % len(c)] for i, c in enumerate(self.captions)]
        raise ValueError(f"Caption choice must be 'first' or 'cycle', got {choice!r}.")


def generate_scenes(
    num_scenes: int,
    split: str = "train",
    seed: int = 0,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    fashion_mnist_root: Optional[str] = None,
    fashion_mnist: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> SceneSet:
    """``num_scenes`` scenes with items from Fashion-MNIST split ``split``. Deterministic in (``seed``, ``split``):
    the two splits draw from separate random streams, so the test scenes do not change with the number of training
    scenes. ``split="train"`` never draws a held-out layout, ``"test"`` only draws held-out ones (any layout when
    ``holdout_fraction`` is 0). ``fashion_mnist`` = (images, labels) replaces the split's arrays (tests)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if num_scenes < 0:
        raise ValueError(f"The number of scenes must be >= 0, got {num_scenes}.")
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}.")
    if fashion_mnist is None:
        fashion_mnist = load_fashion_mnist_arrays(split, fashion_mnist_root)
    images, labels = fashion_mnist
    by_class = [np.flatnonzero(labels == c) for c in range(len(FASHION_MNIST_CLASSES))]
    missing = [FASHION_MNIST_CLASSES[c] for c, idx in enumerate(by_class) if len(idx) == 0]
    if missing:
        raise ValueError(f"The Fashion-MNIST {split} split has no pictures of {', '.join(missing)}.")
    rng = np.random.default_rng([int(seed), 0 if split == "train" else 1])
    want_heldout = split == "test" and holdout_fraction > 0
    out = np.zeros((num_scenes, SCENE_SIZE, SCENE_SIZE), dtype=np.uint8)
    layouts = np.full((num_scenes, NUM_CELLS), EMPTY, dtype=np.int64)
    sources = np.full((num_scenes, NUM_CELLS), EMPTY, dtype=np.int64)
    captions: List[List[str]] = []
    for n in range(num_scenes):
        # The item count first, then layouts of that count until one falls on the wanted side of the split: both
        # splits keep the uniform 1-4 item count (a plain rejection would over-weight counts whose few layouts
        # happen to be held out more often, e.g. the 40 one-item layouts).
        count = int(rng.integers(1, NUM_CELLS + 1))
        while True:
            layout = sample_layout(rng, count)
            if holdout_fraction <= 0 or is_heldout_layout(layout, holdout_fraction) == want_heldout:
                break
        items: List[Optional[np.ndarray]] = [None] * NUM_CELLS
        for cell, cls in enumerate(layout):
            if cls != EMPTY:
                index = int(by_class[cls][rng.integers(len(by_class[cls]))])
                items[cell] = images[index]
                sources[n, cell] = index
        out[n] = compose_scene(items)
        layouts[n] = layout
        captions.append(layout_captions(layout, rng))
    return SceneSet(out, layouts, captions, sources, split)


# --------------------------------------------------------------------------------------------------------------------
# Folders


def _metadata_rows(scenes: SceneSet) -> Iterable[str]:
    for n in range(len(scenes)):
        row = {
            "file_name": f"{n:05d}.png",
            "text": scenes.captions[n],
            "layout": scenes.layouts[n].tolist(),
            "fashion_mnist_index": scenes.sources[n].tolist(),
        }
        yield json.dumps(row, ensure_ascii=False)


def write_scene_split(scenes: SceneSet, folder: PathLike) -> Path:
    """Write ``scenes`` as PNGs ``00000.png`` ... plus ``metadata.jsonl`` into ``folder`` (created)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n, image in enumerate(scenes.images):
        # PNG of a fixed array with fixed settings is byte-identical across runs (no timestamp chunk).
        Image.fromarray(image).save(folder / f"{n:05d}.png", optimize=False, compress_level=6)
    # The metadata file last: a folder with metadata.jsonl is a complete one.
    tmp = folder / (METADATA_FILE + ".tmp")
    tmp.write_text("".join(line + "\n" for line in _metadata_rows(scenes)), encoding="utf-8")
    os.replace(tmp, folder / METADATA_FILE)
    return folder


def _clear_split(folder: Path) -> None:
    """Remove what an earlier `write_scenes` wrote here (its PNG names and metadata only, nothing else)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name in (METADATA_FILE, METADATA_FILE + ".tmp") or re.fullmatch(r"\d{5,}\.png", path.name):
            path.unlink()


def write_scenes(
    output_dir: PathLike,
    num_train: int = 20000,
    num_test: int = 1000,
    seed: int = 0,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    fashion_mnist_root: Optional[str] = None,
    overwrite: bool = False,
) -> Dict[str, object]:
    """Generate and write the data set: ``output_dir/train`` and ``output_dir/test`` image folders (each with a
    ``metadata.jsonl``, loadable with ``datasets.load_dataset("imagefolder", data_dir=output_dir)``) and
    ``scenes_info.json`` with the settings. Same arguments -> byte-identical files. An existing data set is only
    replaced with ``overwrite=True``. Returns the info dict."""
    output_dir = Path(output_dir)
    if num_train < 1 and num_test < 1:
        raise ValueError("Nothing to write: num_train and num_test are both 0.")
    # A metadata file, or PNGs of an interrupted run (or of someone else), are never replaced without asking.
    existing = [
        p
        for split in ("train", "test")
        for p in sorted((output_dir / split).glob("*"))
        if p.name == METADATA_FILE or p.suffix.lower() == ".png"
    ]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise FileExistsError(
            f"{output_dir} already holds scene files ({shown}). Pass --overwrite (overwrite=True) to replace the "
            "scene data set there, or choose another --output_dir."
        )
    info: Dict[str, object] = {
        "name": "fashion-mnist-scenes",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_test": int(num_test),
        "holdout_fraction": float(holdout_fraction),
        "image_size": SCENE_SIZE,
        "cell_size": CELL_SIZE,
        "item_offset": ITEM_OFFSET,
        "positions": list(POSITIONS),
        "classes": list(FASHION_MNIST_CLASSES),
        "templates": list(TEMPLATES),
        "caption_column": "text",
        "layout_column": "layout",
    }
    for split, count in (("train", num_train), ("test", num_test)):
        folder = output_dir / split
        _clear_split(folder)
        if count > 0:
            scenes = generate_scenes(count, split, seed, holdout_fraction, fashion_mnist_root)
            write_scene_split(scenes, folder)
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def ensure_scenes(
    output_dir: PathLike,
    num_train: int = 20000,
    num_test: int = 1000,
    seed: int = 0,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    fashion_mnist_root: Optional[str] = None,
) -> Path:
    """``output_dir`` holding the scene data set of these settings: reused when its ``scenes_info.json`` says it was
    written with them (e.g. a trainer's default data, built once in a cache folder), written when the folder has
    none. A data set of other settings there is an error, never replaced (call `write_scenes` with ``overwrite``)."""
    output_dir = Path(output_dir)
    info_path = output_dir / INFO_FILE
    wanted = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_test": int(num_test),
        "holdout_fraction": float(holdout_fraction),
    }
    same_settings = False
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        differs = {k: (info.get(k), v) for k, v in wanted.items() if info.get(k) != v}
        if differs:
            raise FileExistsError(
                f"{output_dir} holds scenes written with other settings "
                f"({', '.join(f'{k}: {a} there, {b} asked' for k, (a, b) in differs.items())}). Use another folder, "
                "or rewrite it with make_fashion_mnist_scenes.py --overwrite."
            )
        splits = [s for s, n in (("train", num_train), ("test", num_test)) if n > 0]
        if all((output_dir / s / METADATA_FILE).is_file() for s in splits):
            return output_dir
        same_settings = True  # our own data set, partly deleted: writing it again gives the same files
    write_scenes(output_dir, num_train, num_test, seed, holdout_fraction, fashion_mnist_root, overwrite=same_settings)
    return output_dir


def scene_split_dir(path: PathLike, split: str = "test") -> Path:
    """The folder holding ``metadata.jsonl``: ``path`` itself, or ``path/split`` for a data set root."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    if (path / split / METADATA_FILE).is_file():
        return path / split
    if path.is_file() and path.name == METADATA_FILE:
        return path.parent
    raise FileNotFoundError(
        f"No {METADATA_FILE} in {path} or {path / split}. Write the scene data set first with "
        f"`python train_examples/make_fashion_mnist_scenes.py --output_dir {path}`, or pass the folder that holds "
        f"{METADATA_FILE} (an image folder with 'file_name' and a caption column)."
    )


def load_scenes(
    path: PathLike,
    split: str = "test",
    limit: Optional[int] = None,
    caption_column: str = "text",
    layout_column: str = "layout",
    load_images: bool = True,
) -> SceneSet:
    """Read a scene folder: ``path`` (with ``metadata.jsonl``) or ``path/split`` of a data set root. A row without
    the layout column gets the layout parsed from its first caption; a caption may be a string or a list."""
    from PIL import Image

    folder = scene_split_dir(path, split)
    rows = []
    with open(folder / METADATA_FILE, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{folder / METADATA_FILE} line {line_no} is not JSON: {err}.") from None
            for key in ("file_name", caption_column):
                if key not in row:
                    raise ValueError(
                        f"{folder / METADATA_FILE} line {line_no} has no {key!r} column (columns: "
                        f"{', '.join(sorted(row))}); pass caption_column= for another caption column."
                    )
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{folder / METADATA_FILE} lists no images.")
    captions, layouts, sources, images = [], [], [], []
    for row in rows:
        caps = row[caption_column]
        caps = [caps] if isinstance(caps, str) else list(caps)
        if not caps or any(not isinstance(c, str) or not c.strip() for c in caps):
            raise ValueError(f"{folder / METADATA_FILE}: {row['file_name']} has an empty caption.")
        captions.append(caps)
        layouts.append(check_layout(row[layout_column]) if layout_column in row else parse_caption(caps[0]))
        sources.append(row.get("fashion_mnist_index", [EMPTY] * NUM_CELLS))
        if load_images:
            file = folder / row["file_name"]
            if not file.is_file():
                raise FileNotFoundError(f"{folder / METADATA_FILE} lists {row['file_name']}, which is missing.")
            with Image.open(file) as img:
                images.append(np.asarray(img.convert("L")))
    if load_images:
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise ValueError(f"Scene images in {folder} have different sizes {sorted(shapes)}.")
        image_array = np.stack(images)
    else:
        image_array = np.zeros((len(rows), 0, 0), dtype=np.uint8)
    split_name = folder.name if folder.name in ("train", "test") else None
    return SceneSet(
        image_array, np.asarray(layouts, dtype=np.int64), captions, np.asarray(sources, dtype=np.int64), split_name
    )
