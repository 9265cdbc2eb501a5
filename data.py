"""Data: instruction-editing and controllable-generation folders, control maps, and the toy world.

Every dataset yields dicts of tensors in [-1, 1]:
    source (3, H, W)   the condition image I_s (the source photo, or a control map drawn as an image)
    target (3, H, W)   the image to generate I_t
    mask   (1, H, W)   where the edit happens (all ones when a record has no mask)
    text   str         the instruction or caption (control data may give `label`, a class id, instead)
"""
import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from model import vocabulary

MAX_PIXELS = 100_000_000  # larger images are refused: a 625-megapixel PNG of 111 kB took 7.5 GB and 72 s to edit
Image.MAX_IMAGE_PIXELS = None  # load_image checks MAX_PIXELS itself, before decoding (Pillow's check would warn first)


class DataError(ValueError):
    """A record or file that cannot be used; the message is one line naming it."""


# ---------------------------------------------------------------- images


def load_image(path) -> Image.Image:
    """Any image Pillow reads, of at most MAX_PIXELS pixels, as 8-bit RGB: EXIF orientation applied,
    transparency composited on white, 16-bit and CMYK converted."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:  # every image the project reads is opened here
        with Image.open(path) as img:
            w, h = img.size  # read from the header: the pixels are not decoded yet
            if w * h > MAX_PIXELS:
                raise DataError(f"{path}: {w} x {h} pixels is more than the limit of {MAX_PIXELS // 10 ** 6} megapixels")
            img.load()
            img = ImageOps.exif_transpose(img)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        scale = 255 / 65535 if img.mode.startswith("I;16") else 255 / max(int(np.asarray(img).max()), 1)
        img = Image.fromarray((np.asarray(img, dtype=np.float64) * scale).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba)
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:  # PIL RGB -> (3, H, W) in [-1, 1]
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


def to_image(x: torch.Tensor) -> Image.Image:  # (3, H, W) in [-1, 1] -> PIL RGB
    return Image.fromarray(((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def resize_crop(img: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """Shorter side to `size` (antialiased), then the centre size x size crop."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------- control maps


def grayscale(x: torch.Tensor) -> torch.Tensor:  # (3, H, W) in [-1, 1] -> (H, W) in [0, 255]
    r, g, b = (x + 1) * 127.5
    return 0.299 * r + 0.587 * g + 0.114 * b


def sobel(gray: torch.Tensor):  # (H, W) -> gx, gy with 3x3 Sobel kernels, replicated borders
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    x = F.pad(gray[None, None], (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(x, k[None, None])[0, 0]
    gy = F.conv2d(x, k.t()[None, None])[0, 0]
    return gx, gy


def gaussian_blur(gray: torch.Tensor, sigma: float) -> torch.Tensor:  # (H, W) -> (H, W)
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad(gray[None, None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))[0, 0]


def canny(x: torch.Tensor, low: float = 100, high: float = 200) -> torch.Tensor:
    """Canny edges (H, W) in {0, 1} of an image (3, H, W) in [-1, 1], as OpenCV's `Canny(img, 100, 200)`
    that ControlNet-style papers use: 3x3 Sobel on 0..255 grey levels (no blur), L1 magnitude
    |gx| + |gy|, non-maximum suppression along the gradient direction quantised to 0/45/90/135
    degrees (horizontal and vertical ties kept on the first side, diagonal ties dropped), then hysteresis: pixels above `high`, plus pixels above
    `low` connected to them through 8-neighbours."""
    gx, gy = sobel(grayscale(x).round())  # integer grey levels: ties must be exact, as in OpenCV's integer maths
    mag = gx.abs() + gy.abs()
    H, W = mag.shape
    m = F.pad(mag, (1, 1, 1, 1))

    def at(dy, dx):  # neighbour magnitudes shifted by (dy, dx)
        return m[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    horizontal = (angle < 22.5) | (angle >= 157.5)  # gradient along x: compare left / right
    diag_down = (angle >= 22.5) & (angle < 67.5)  # gradient along x = y (y down)
    vertical = (angle >= 67.5) & (angle < 112.5)
    diag_up = (angle >= 112.5) & (angle < 157.5)
    peak = ((horizontal & (mag > at(0, -1)) & (mag >= at(0, 1)))
            | (vertical & (mag > at(-1, 0)) & (mag >= at(1, 0)))
            | (diag_down & (mag > at(-1, -1)) & (mag > at(1, 1)))
            | (diag_up & (mag > at(-1, 1)) & (mag > at(1, -1))))
    strong, weak = peak & (mag > high), peak & (mag > low)
    edges = strong
    while True:  # grow the strong edges through connected weak ones
        grown = weak & (F.max_pool2d(edges[None, None].float(), 3, 1, 1)[0, 0] > 0)
        if torch.equal(grown | edges, edges):
            return edges.float()
        edges = grown | edges


def soft_edges(x: torch.Tensor) -> torch.Tensor:
    """An HED-like soft edge map (H, W) in [0, 1]: blurred Sobel magnitude, normalised."""
    gx, gy = sobel(gaussian_blur(grayscale(x), 1.0))
    mag = (gx ** 2 + gy ** 2).sqrt()
    return mag / mag.max().clamp(min=1e-6)


def depth_like(x: torch.Tensor) -> torch.Tensor:
    """A cheap "depth-like" map (H, W) in [0, 1]: heavily blurred brightness, stretched to [0, 1]."""
    g = gaussian_blur(grayscale(x), max(x.shape[-1] / 32, 1.0))
    return (g - g.min()) / (g.max() - g.min()).clamp(min=1e-6)


CONTROLS = {"canny": canny, "softedge": soft_edges, "depth": depth_like}


def control_kinds(control: str) -> tuple[str, ...]:
    """"canny" -> ("canny",); "canny,softedge,depth" -> a SCAR-Uni mix, one kind drawn uniformly per item."""
    kinds = tuple(k.strip() for k in control.split(","))
    bad = [k for k in kinds if k not in CONTROLS]
    if bad or len(set(kinds)) != len(kinds):
        raise ValueError(f"control kinds must be distinct, from {', '.join(CONTROLS)}; got {control!r}")
    return kinds


def pick_control(kinds: tuple[str, ...], key: list[int]) -> str:
    """An item's control kind, seeded by `key`: SCAR-Uni samples the kinds uniformly and does not tell the
    model which one (the map itself shows it; the paper's SCAR-Uni takes "any control input at inference")."""
    return kinds[np.random.default_rng([7, *key]).integers(len(kinds))] if len(kinds) > 1 else kinds[0]


def control_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Control image (3, H, W) in [-1, 1] computed from an image (3, H, W) in [-1, 1]."""
    if kind not in CONTROLS:
        raise ValueError(f"control kind must be one of {', '.join(CONTROLS)}, got {kind!r}")
    return (CONTROLS[kind](x) * 2 - 1).expand(3, -1, -1).contiguous()


# ---------------------------------------------------------------- folders on disk


def read_manifest(folder, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, record) of `folder/manifest.jsonl`; a clear error for every malformed line."""
    path = Path(folder) / "manifest.jsonl"
    if not path.is_file():
        raise DataError(f"{folder}: no manifest.jsonl (one JSON record per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the manifest as UTF-8") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: a record must be a JSON object, got {type(record).__name__}")
        missing = [k for k in required if k not in record]
        if missing:
            raise DataError(f"{path}:{n}: record lacks {', '.join(missing)}")
        records.append((n, record))
    if not records:
        raise DataError(f"{path}: no records")
    return records


T5_DIR = "t5"  # precomputed T5 features of a folder: t5/<manifest line>.npy
T5_SLOTS = 120  # caption slots of LlamaGen's t2i models


def read_text_features(path, slots: int = T5_SLOTS):
    """One record's T5 features as LlamaGen's feature extraction saves them, (1, L, D) float32, placed in
    the last L of `slots` zero rows -> (emb (slots, D), mask (slots,) bool, zeros first): the t2i GPT's
    left padding, equal to `T5Encoder.caption_features`."""
    try:
        valid = torch.from_numpy(np.load(path)).float()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read text features ({e}); write them with `python data.py t5-features`") from None
    if valid.ndim != 3 or valid.shape[0] != 1 or not 0 < valid.shape[1] <= slots:
        raise DataError(f"{path}: text features must be (1, L, D) with 1 <= L <= {slots}, got {tuple(valid.shape)}")
    emb, mask = torch.zeros(slots, valid.shape[2]), torch.zeros(slots, dtype=torch.bool)
    emb[slots - valid.shape[1]:], mask[slots - valid.shape[1]:] = valid[0], True
    return emb, mask


def write_text_features(folder, t5_folder, batch: int = 16) -> int:
    """Encode every record's instruction (or caption) of a manifest folder with T5 into FOLDER/t5/<line>.npy,
    each file written atomically; returns the number written."""
    from encoder import load_t5  # only this command needs the text encoder
    if batch < 1:
        raise DataError(f"--batch must be at least 1, got {batch}")
    folder = Path(folder)
    records = [(n, r.get("instruction", r.get("caption"))) for n, r in read_manifest(folder, ())]
    out = folder / T5_DIR
    try:  # before the encoder loads: a folder that cannot take the features is known at once
        with tempfile.TemporaryFile(dir=out if out.is_dir() else folder):
            pass
    except OSError as e:
        raise DataError(f"{out}: cannot write the features there ({e.strerror})") from None
    t5 = load_t5(t5_folder).to("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(exist_ok=True)  # only now: train.py reads the features of any DATA/t5/ there is
    records = [(n, str(text)) for n, text in records if text is not None]
    for first in tqdm(range(0, len(records), batch), desc="T5 features", unit="batch"):
        chunk = records[first:first + batch]
        embs, mask = t5.caption_features([text for _, text in chunk])
        for (n, _), emb, valid in zip(chunk, embs, mask):
            tmp = out / f".{n}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, emb[-int(valid.sum()):][None].float().cpu().numpy())
            os.replace(tmp, out / f"{n}.npy")
    return len(records)


class FolderDataset(torch.utils.data.Dataset):
    """Shared reading of a manifest folder: resolved paths, missing files, skipping, transforms."""

    image_keys: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    def __init__(self, folder, size: int = 256, flip: bool = False, skip_bad: bool = False, text_features: bool = False):
        self.folder, self.size, self.flip, self.skip_bad = Path(folder), size, flip, skip_bad
        self.manifest = self.folder / "manifest.jsonl"
        self.text_features = text_features  # read FOLDER/t5/<line>.npy (written by `python data.py t5-features`)
        self.records, skipped = [], 0
        for n, record in read_manifest(folder, self.required):
            for key in self.image_keys:  # required paths are strings; optional ones strings, null or absent
                if not isinstance(record.get(key, ""), str) or (key in self.required and not record[key]):
                    raise DataError(f"{self.manifest}:{n}: {key!r} must be a path (a non-empty string), "
                                    f"got {json.dumps(record[key])}")
            missing = [record[k] for k in self.image_keys if record.get(k) and not (self.folder / record[k]).is_file()]
            if missing and not skip_bad:
                raise DataError(f"{self.manifest}:{n}: image {self.folder / missing[0]} is missing")
            if missing:
                skipped += 1
                continue
            self.records.append((n, record))
        if skipped:
            print(f"{self.manifest}: skipped {skipped} records with missing images", file=sys.stderr)
        if not self.records:
            raise DataError(f"{self.manifest}: no usable records")

    def __len__(self):
        return len(self.records)

    def image(self, n: int, name: str, resample=Image.BICUBIC) -> torch.Tensor:
        try:
            return to_tensor(resize_crop(load_image(self.folder / name), self.size, resample))
        except DataError as e:
            raise DataError(f"{self.manifest}:{n}: {e}") from None

    def __getitem__(self, i):
        for j in range(len(self)):  # with skip_bad, an unreadable record yields the next one
            n, record = self.records[(i + j) % len(self)]
            try:
                item = self.read(n, record)
                if self.text_features:
                    item["text_emb"], item["text_mask"] = read_text_features(self.folder / T5_DIR / f"{n}.npy")
            except DataError as e:
                if not self.skip_bad:
                    raise
                print(f"skipped: {e}", file=sys.stderr)
                continue
            if self.flip and torch.rand(()) < 0.5:  # the same flip for every image of the pair
                item = {k: v.flip(-1) if torch.is_tensor(v) and v.ndim == 3 else v for k, v in item.items()}
            return item
        raise DataError(f"{self.manifest}: no readable record")


class EditDataset(FolderDataset):
    """Instruction editing: `manifest.jsonl` records {"source", "target", "instruction", optional "mask"},
    image paths relative to the folder. The mask (white = edited) defaults to the whole image."""

    image_keys, required = ("source", "target", "mask"), ("source", "target", "instruction")

    def read(self, n, record):
        source, target = self.image(n, record["source"]), self.image(n, record["target"])
        if record.get("mask"):
            mask = (self.image(n, record["mask"], Image.NEAREST)[:1] > 0).float()
        else:
            mask = torch.ones(1, self.size, self.size)
        return {"source": source, "target": target, "mask": mask, "text": str(record["instruction"])}

    def texts(self) -> list[str]:  # what a word-reading model trained on this folder reads
        return [str(record["instruction"]) for _, record in self.records]


class ControlDataset(FolderDataset):
    """Controllable generation: records {"image", optional control map files, "caption" or "label"}. The
    map of a kind is the record's file under that kind's name ("canny", "softedge", "depth"; "control"
    for the kind when there is only one), else computed from the image. `control` "canny,softedge,depth"
    gives each record one kind, drawn uniformly and anew each `epoch` (SCAR-Uni)."""

    image_keys, required = ("image", "control", *CONTROLS), ("image",)

    def __init__(self, folder, size: int = 256, control: str = "canny", flip: bool = False, skip_bad: bool = False,
                 text_features: bool = False, seed: int = 0):
        self.kinds, self.seed, self.epoch = control_kinds(control), seed, 0  # train.py sets the epoch
        super().__init__(folder, size, flip, skip_bad, text_features)
        for n, record in self.records:
            if "caption" not in record and "label" not in record:
                raise DataError(f"{self.manifest}:{n}: record needs a caption or a label")
            label = record.get("label", 0)
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise DataError(f"{self.manifest}:{n}: 'label' must be a class id (an integer >= 0), got {json.dumps(label)}")
        if len(self.kinds) > 1 and any(record.get("control") for _, record in self.records):
            raise DataError(f"{self.manifest}: with several control kinds a record's maps go under the kinds' names "
                            f"({', '.join(self.kinds)}), not 'control'")

    @property
    def num_classes(self) -> int:
        labels = [record["label"] for _, record in self.records if "label" in record]
        if len(labels) != len(self.records):
            raise DataError(f"{self.manifest}: a class-conditional model needs a 'label' in every record")
        return max(labels) + 1

    def read(self, n, record):
        target = self.image(n, record["image"])
        kind = pick_control(self.kinds, [self.seed, self.epoch, n])
        given = record.get(kind) or (record.get("control") if len(self.kinds) == 1 else None)
        source = self.image(n, given) if given else control_map(target, kind)
        item = {"source": source, "target": target, "control": kind, "mask": torch.ones(1, self.size, self.size)}
        if "caption" in record:
            item["text"] = str(record["caption"])
        if "label" in record:
            item["label"] = int(record["label"])
        return item

    def texts(self) -> list[str]:
        return [str(record["caption"]) for _, record in self.records if "caption" in record]


# ---------------------------------------------------------------- the toy world

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 130, 30)}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (140, 140, 140), "black": (30, 30, 30), "beige": (225, 205, 165)}
# Backgrounds a scene may have but no instruction names (not in the vocabulary): a user's paper is any colour.
UNNAMED = {"pink": (240, 175, 195), "sky": (150, 200, 235), "mint": (175, 225, 190), "lavender": (200, 185, 230),
           "navy": (30, 40, 95), "brown": (110, 70, 40), "olive": (125, 125, 55), "teal": (30, 120, 120)}
PALETTE = {**COLORS, **BACKGROUNDS, **UNNAMED}
RADII = (0.05, 0.18)  # a shape's radius, as a fraction of the image side
REACH = {"circle": 1.0, "square": 1.21, "triangle": 1.29}  # farthest point of a shape from its centre, in radii
GAP = 0.02  # shapes never overlap: their reaches stay this far apart
GROW = 1.35  # "bigger" multiplies the radius by this, "smaller" divides it
ADDED = 0.1  # the radius of an added shape
SUPERSAMPLE = 4  # drawn at 4x and box-filtered: anti-aliased edges, as a paint program draws them
# Named places are the nine regions of a 3 x 3 grid; a shape added or moved to one goes to its centre (moved
# shapes as near as they fit), so every edit has one exact target.
PLACES = {f"{v}{' ' if v and h else ''}{h}" or "center": (x, y)
          for v, y in (("top", 1 / 6), ("", 1 / 2), ("bottom", 5 / 6))
          for h, x in (("left", 1 / 6), ("", 1 / 2), ("right", 5 / 6))}
EDITS = ("recolor", "background", "remove", "add", "move", "reshape", "resize")

PHRASES = {
    "recolor": ["make the {ref} {color}", "turn the {ref} {color}", "paint the {ref} {color}",
                "change the color of the {ref} to {color}"],
    "background": ["make the background {color}", "change the background to {color}",
                   "paint the background {color}", "turn the background {color}"],
    "remove": ["remove the {ref}", "delete the {ref}", "take away the {ref}", "erase the {ref}"],
    "add": ["add a {color} {shape} at the {place}", "put a {color} {shape} at the {place}",
            "draw a {color} {shape} at the {place}"],
    "move": ["move the {ref} to the {place}", "put the {ref} at the {place}", "shift the {ref} to the {place}"],
    "reshape": ["turn the {ref} into a {shape}", "make the {ref} a {shape}", "replace the {ref} with a {color} {shape}"],
    "resize": ["make the {ref} {bigger}", "make the {ref} a bit {bigger}", "{grow} the {ref}"],
}

# (edit, shape, colour) triples that only the held-out split contains: the kind and colour of the edited
# object after the edit, or for background edits ("background", old colour, new colour).
HELD_OUT = {("recolor", "triangle", "green"), ("recolor", "circle", "orange"), ("add", "square", "purple"),
            ("add", "triangle", "yellow"), ("remove", "circle", "blue"), ("move", "square", "red"),
            ("reshape", "triangle", "blue"), ("resize", "circle", "yellow"), ("background", "white", "black")}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: float  # centre and radius, as fractions of the image side
    y: float
    r: float


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # never overlapping


def coverage(shape: Shape, n: int) -> np.ndarray:
    """(n, n) share of each pixel the shape covers, in [0, 1] (SUPERSAMPLE^2 samples per pixel)."""
    c = (np.arange(n * SUPERSAMPLE) + 0.5) / (n * SUPERSAMPLE)
    x, y, r = c[None, :] - shape.x, c[:, None] - shape.y, shape.r
    if shape.kind == "circle":
        inside = x ** 2 + y ** 2 <= r ** 2
    elif shape.kind == "square":
        inside = (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    else:  # triangle: apex at -r, base 2r wide at 0.8r
        inside = (y <= 0.8 * r) & (np.abs(x) <= (y + r) / 1.8)
    return inside.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean((1, 3))


def render(scene: Scene, n: int = 64) -> np.ndarray:
    """The scene as (n, n, 3) uint8: a plain background and the shapes, anti-aliased."""
    rgb = {name: np.array(c, dtype=np.float64) for name, c in PALETTE.items()}
    img, bare = np.zeros((n, n, 3)), np.ones((n, n, 1))
    for shape in scene.shapes:
        cover = coverage(shape, n)[..., None]
        img, bare = img + cover * rgb[shape.color], bare - cover
    return (img + bare * rgb[scene.background]).round().clip(0, 255).astype(np.uint8)


def fits(shape: Shape, others) -> bool:
    """Inside the image and clear of every other shape."""
    inside = shape.r <= shape.x <= 1 - shape.r and shape.r <= shape.y <= 1 - shape.r
    return inside and all(math.hypot(shape.x - o.x, shape.y - o.y) >= REACH[shape.kind] * shape.r + REACH[o.kind] * o.r + GAP
                          for o in others)


def place_of(shape: Shape) -> str:  # the named region the shape's centre is in
    return next(name for name, (x, y) in PLACES.items() if abs(shape.x - x) <= 1 / 6 and abs(shape.y - y) <= 1 / 6)


def reference(scene: Scene, shape: Shape, rng) -> str:
    """The shortest unambiguous name of a shape in its scene, sometimes with its colour anyway."""
    same_kind = [s for s in scene.shapes if s.kind == shape.kind]
    return f"{shape.color} {shape.kind}" if len(same_kind) > 1 or rng.random() < 0.5 else shape.kind


def random_scene(rng, named: bool = False) -> Scene:
    """1-3 shapes anywhere, of any radius in RADII; the background one of the named ones, or (unless `named`)
    as often an unnamed one."""
    backgrounds = list(BACKGROUNDS) if named or rng.random() < 0.5 else list(UNNAMED)
    background = str(rng.choice(backgrounds))
    shapes, wanted = [], int(rng.integers(1, 4))
    for _ in range(20 * wanted):  # tries: a large shape may leave no room for the next
        if len(shapes) == wanted:
            break
        kind, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
        r = float(rng.uniform(*RADII))
        x, y = (float(v) for v in rng.uniform(r, 1 - r, 2))
        shape = Shape(kind, color, x, y, r)
        if fits(shape, shapes) and not any((s.kind, s.color) == (kind, color) for s in shapes):  # objects stay nameable
            shapes.append(shape)
    return Scene(background, tuple(shapes))


@dataclass(frozen=True)
class Edit:
    kind: str
    before: Scene
    after: Scene
    text: str
    changed: tuple[Shape, ...]  # footprints the edit touches (before and after); empty for background

    @property
    def triple(self) -> tuple[str, str, str]:
        if self.kind == "background":
            return "background", self.before.background, self.after.background
        shape = self.changed[-1]
        return self.kind, shape.kind, shape.color


def random_edit(scene: Scene, rng) -> Edit | None:
    """One random edit of the scene, or None when the drawn edit does not apply to it."""
    kind = str(rng.choice(EDITS))
    shapes = list(scene.shapes)
    i = int(rng.integers(len(shapes)))
    old, others = shapes[i], shapes[:i] + shapes[i + 1:]
    ref = reference(scene, old, rng)
    template = str(rng.choice(PHRASES[kind]))
    if kind == "background":
        color = str(rng.choice([c for c in BACKGROUNDS if c != scene.background]))
        return Edit(kind, scene, replace(scene, background=color), template.format(color=color), ())
    if kind == "add":
        place = str(rng.choice(list(PLACES)))
        new = Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), *PLACES[place], ADDED)
        if len(shapes) == 3 or not fits(new, shapes) or any((s.kind, s.color) == (new.kind, new.color) for s in shapes):
            return None
        text = template.format(color=new.color, shape=new.kind, place=place)
        return Edit(kind, scene, replace(scene, shapes=(*shapes, new)), text, (new,))
    if kind == "remove":
        if not others:
            return None
        return Edit(kind, scene, replace(scene, shapes=tuple(others)), template.format(ref=ref), (old,))
    if kind == "recolor":
        new = replace(old, color=str(rng.choice([c for c in COLORS if c != old.color])))
        text = template.format(ref=ref, color=new.color)
    elif kind == "move":
        place = str(rng.choice([p for p in PLACES if p != place_of(old)]))
        x, y = (min(max(v, old.r), 1 - old.r) for v in PLACES[place])
        new = replace(old, x=x, y=y)
        text = template.format(ref=ref, place=place)
    elif kind == "reshape":
        new = replace(old, kind=str(rng.choice([k for k in SHAPES if k != old.kind])))
        text = template.format(ref=ref, shape=new.kind, color=new.color)
    else:  # resize
        grow = bool(rng.random() < 0.5)
        if not RADII[0] <= old.r * GROW ** (1 if grow else -1) <= RADII[1]:
            grow = not grow
        new = replace(old, r=old.r * GROW ** (1 if grow else -1))
        text = template.format(ref=ref, bigger="bigger" if grow else "smaller", grow="enlarge" if grow else "shrink")
    if not fits(new, others) or any((s.kind, s.color) == (new.kind, new.color) for s in others):
        return None
    shapes[i] = new
    return Edit(kind, scene, replace(scene, shapes=tuple(shapes)), text, (old, new))


def edit_mask(edit: Edit, n: int) -> np.ndarray:
    """(n, n) bool: where the edit may change pixels (what the touched shapes cover, or where background shows)."""
    if edit.kind == "background":
        return sum((coverage(s, n) for s in edit.before.shapes), np.zeros((n, n))) < 1
    return sum((coverage(s, n) for s in edit.changed), np.zeros((n, n))) > 0


SPLITS = {"train": 0, "heldout": 1}


def toy_edit(index: int, split: str = "train", seed: int = 0) -> Edit:
    """Edit number `index` of a split: the same (index, split, seed) always gives the same edit; the
    held-out split holds exactly the HELD_OUT triples, the training split never does."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    while True:
        edit = random_edit(random_scene(rng), rng)
        if edit is not None and (edit.triple in HELD_OUT) == (split == "heldout"):
            return edit


def caption(scene: Scene) -> str:
    """A scene description for control pairs: "a red circle and a blue square on a gray background"."""
    names = [f"a {s.color} {s.kind}" for s in scene.shapes]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on a {scene.background} background"


PLEASE = "please "


def vary(text: str, rng) -> str:
    """The instruction as a user might type it: a leading "please ", a capital first letter, a closing "." or
    "!", each at random. The toy models read words (model.words_of drops case and
    punctuation), so what training learns from this is to ignore "please"; `eval.py --varied` checks the
    whole path from typed text to edit."""
    if rng.random() < 0.3:
        text = PLEASE + text
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + str(rng.choice(["", "", ".", "!"]))


def toy_texts() -> list[str]:
    """Texts holding every word the toy world writes (instructions, captions, vary's "please")."""
    fill = dict(color=" ".join([*COLORS, *BACKGROUNDS]), ref=" ".join(SHAPES), shape="", place=" ".join(PLACES),
                bigger="bigger smaller", grow="enlarge shrink")
    texts = [template.format(**fill) for templates in PHRASES.values() for template in templates]
    shapes = tuple(Shape(kind, "red", 0.5, 0.5, 0.1) for kind in SHAPES)
    return [*texts, caption(Scene("white", shapes)), PLEASE]


def toy_vocabulary() -> tuple[str, ...]:
    """Every word the toy world writes: the toy models' vocabulary."""
    return vocabulary(toy_texts())


class ToyEdits(torch.utils.data.Dataset):
    """`n` toy editing examples of a split, generated on the fly (deterministic by index and seed);
    `varied` phrases each instruction as `vary` does (training), else as the templates give it."""

    def __init__(self, n: int, split: str = "train", size: int = 64, seed: int = 0, varied: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.n, self.split, self.size, self.seed, self.varied = n, split, size, seed, varied

    def __len__(self):
        return self.n

    def texts(self) -> list[str]:  # every word the generator writes, in one text per template (not the edits)
        return toy_texts()

    def __getitem__(self, i):
        edit = toy_edit(i, self.split, self.seed)
        text = vary(edit.text, np.random.default_rng([self.seed, SPLITS[self.split], i, 1])) if self.varied else edit.text
        image = lambda scene: to_tensor(Image.fromarray(render(scene, self.size)))
        return {"source": image(edit.before), "target": image(edit.after), "text": text, "kind": edit.kind,
                "mask": torch.from_numpy(edit_mask(edit, self.size)).float()[None]}


class ToyControl(torch.utils.data.Dataset):
    """Toy controllable generation: the control map of a random scene + its caption, or its class (the
    background, which no control map shows: 0 white, 1 gray, 2 black, 3 beige) -> the scene."""

    num_classes = len(BACKGROUNDS)

    def __init__(self, n: int, split: str = "train", size: int = 64, seed: int = 0, control: str = "canny"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.n, self.split, self.size, self.seed, self.kinds = n, split, size, seed, control_kinds(control)

    def __len__(self):
        return self.n

    def texts(self) -> list[str]:
        return toy_texts()

    def __getitem__(self, i):
        scene = random_scene(np.random.default_rng([self.seed, 2 + SPLITS[self.split], i]), named=True)  # captions name it
        target = to_tensor(Image.fromarray(render(scene, self.size)))
        kind = pick_control(self.kinds, [self.seed, SPLITS[self.split], i])
        return {"source": control_map(target, kind), "target": target, "text": caption(scene), "control": kind,
                "label": list(BACKGROUNDS).index(scene.background), "mask": torch.ones(1, self.size, self.size)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Data set tools. t5-features: precompute the T5 caption features of a "
                                "manifest folder, e.g.  python data.py t5-features --data /data/seed_edit --t5 flan-t5-xl")
    p.add_argument("command", choices=["t5-features"], help="t5-features: write DATA/t5/<manifest line>.npy for every record")
    p.add_argument("--data", type=Path, required=True, help="folder with manifest.jsonl")
    p.add_argument("--t5", type=Path, required=True, help="Hugging Face google/flan-t5-* folder (with spiece.model)")
    p.add_argument("--batch", type=int, default=16, help="captions encoded together")
    p.error = lambda message: p.exit(2, f"error: {message} (data.py --help lists the flags)\n")  # one line, no usage
    return p.parse_args(argv)


# ---------------------------------------------------------------- drawings made outside the generator

DRAWN_EDITS = ("recolor", "remove", "reshape", "background")
DRAWN_SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges, as a paint program draws them


def jitter(rgb, rng, amount: int = 24) -> tuple[int, ...]:
    """A drawing's version of a palette colour: each channel off by up to `amount` levels."""
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def draw_shape(draw, kind: str, cx: float, cy: float, r: float, fill):
    """One shape with PIL's ImageDraw, in the generator's proportions (square half-side 0.85 r; triangle apex
    at -r, base 2 r wide at 0.8 r) but with none of its code; coordinates in pixels."""
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
    else:
        half = (0.8 * r + r) / 1.8
        draw.polygon([(cx, cy - r), (cx - half, cy + 0.8 * r), (cx + half, cy + 0.8 * r)], fill=fill)


def drawn_scene(rng, n_shapes: int):
    """Shapes anywhere, radius 5-18 % of the side, not overlapping, (kind, colour) pairs distinct."""
    shapes = []
    while len(shapes) < n_shapes:
        kind, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
        r = float(rng.uniform(0.05, 0.18))
        cx, cy = (float(v) for v in rng.uniform(r, 1 - r, size=2))
        apart = all(math.hypot(cx - s[2], cy - s[3]) > r + s[4] + 0.02 for s in shapes)
        if apart and all((kind, color) != s[:2] for s in shapes):
            shapes.append((kind, color, cx, cy, r))
    return shapes


def render_drawing(background, shapes, size: int, colors: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    """The picture (size, size, 3) uint8 and each shape's coverage (size, size) in [0, 1]: drawn at 4x and
    area-averaged down, so a pixel outside every shape keeps the background exactly."""
    big = size * DRAWN_SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    footprints = []
    for kind, color, cx, cy, r in shapes:
        draw_shape(draw, kind, cx * big, cy * big, r * big, colors[color])
        mask = Image.new("L", (big, big), 0)
        draw_shape(ImageDraw.Draw(mask), kind, cx * big, cy * big, r * big, 255)
        footprints.append(np.asarray(mask.resize((size, size), Image.BOX)) / 255)
    return np.asarray(canvas.resize((size, size), Image.BOX)), footprints


class DrawnEdits(torch.utils.data.Dataset):
    """A held-out check made with drawing code that is not the generator's: PIL's ImageDraw, anti-aliased,
    shapes anywhere at any radius of 5-18 % of the side, every colour (background included) off the palette by
    up to 24 levels per channel, one recolor, remove, reshape or background edit each, phrased by the toy's
    templates. Items as ToyEdits' (source, target, mask, text, kind); the mask covers every pixel the edited
    shapes touch before or after (for background edits: every pixel no shape touches)."""

    def __init__(self, n: int, size: int = 64, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, 7, i])
        shapes = drawn_scene(rng, int(rng.integers(1, 4)))
        colors = {c: jitter(rgb, rng) for c, rgb in {**COLORS, **BACKGROUNDS}.items()}
        background = str(rng.choice(list(BACKGROUNDS)))
        j = int(rng.integers(len(shapes)))
        old, taken = shapes[j], [s[:2] for s in shapes]
        reshapes = [k for k in SHAPES if k != old[0] and (k, old[1]) not in taken]
        kind = str(rng.choice([k for k in DRAWN_EDITS if (k != "remove" or len(shapes) > 1) and (k != "reshape" or reshapes)]))
        same_kind = sum(s[0] == old[0] for s in shapes) > 1
        ref = f"{old[1]} {old[0]}" if same_kind or rng.random() < 0.5 else old[0]
        template = str(rng.choice(PHRASES[kind]))
        after, new_background, changed = list(shapes), background, [j]
        if kind == "background":
            new_background = str(rng.choice([c for c in BACKGROUNDS if c != background]))
            text, changed = template.format(color=new_background), []
        elif kind == "remove":
            del after[j]
            text = template.format(ref=ref)
        elif kind == "recolor":
            color = str(rng.choice([c for c in COLORS if (old[0], c) not in taken]))
            after[j] = (old[0], color, *old[2:])
            text = template.format(ref=ref, color=color)
        else:  # reshape
            new = str(rng.choice(reshapes))
            after[j] = (new, *old[1:])
            text = template.format(ref=ref, shape=new, color=old[1])
        source, before_marks = render_drawing(colors[background], shapes, self.size, colors)
        target, after_marks = render_drawing(colors[new_background], after, self.size, colors)
        if kind == "background":  # every pixel where some background shows
            mask = sum(before_marks, np.zeros((self.size, self.size))) < 1
        else:
            mask = (before_marks[j] > 0) | (after_marks[j] > 0 if kind != "remove" else False)
        image = lambda pixels: to_tensor(Image.fromarray(pixels))
        return {"source": image(source), "target": image(target), "text": text, "kind": kind,
                "mask": torch.from_numpy(mask).float()[None]}


def main(argv=None):
    args = parse_args(argv)
    from checkpoint import CheckpointError
    try:
        n = write_text_features(args.data, args.t5, args.batch)
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {n} feature files to {args.data / T5_DIR}")


if __name__ == "__main__":
    main()
