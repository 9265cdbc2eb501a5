"""Writes the example sources (examples/*.png, examples.json, control.json), the README's grids
(assets/examples.png, assets/control.png) and the pictures of the toy world in docs/toy.md
(assets/toy_pairs.png, assets/toy_control.png).

    python examples/make.py

Sources: held-out toy edits, whose (edit, shape, colour) triples the models never saw, rendered by the
generator at 256 px; and drawings made here with PIL's ImageDraw at other sizes and aspect ratios, on
papers and in colours off the toy's palette. Each shipped editor (checkpoints/toy/edit_*) edits every
source as `python sample.py --image examples/<image> --prompt "<prompt>"` would, at the default seed. The
shipped control model (checkpoints/toy/control) draws a scene from each control source's map of every kind it
was trained on, as `python sample.py --image examples/<image> --control <kind> --prompt "<caption>"` would.
"""
import json
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from data import EDITS, ToyControl, control_map, render, to_image, to_tensor, toy_edit  # noqa: E402
from model import load_scar  # noqa: E402

HELD_OUT = (0, 1, 2, 4, 5, 9, 20)  # the first held-out edit of each kind (recolor, reshape, move, resize, add, remove, background)
# (file, size, paper, [(kind, fill, centre x, centre y, radius) in fractions of the shorter side], prompt)
DRAWINGS = [
    ("drawing_recolor.png", (360, 240), (236, 178, 200), [("triangle", (200, 50, 45), 0.45, 0.4, 0.22),
                                                          ("circle", (60, 90, 200), 1.05, 0.6, 0.16)],
     "make the triangle yellow"),
    ("drawing_remove.png", (240, 320), (250, 250, 250), [("square", (235, 140, 40), 0.35, 0.3, 0.14),
                                                         ("circle", (130, 70, 170), 0.6, 0.95, 0.2)],
     "remove the square"),
    ("drawing_reshape.png", (300, 300), (140, 195, 230), [("circle", (50, 160, 70), 0.3, 0.65, 0.12),
                                                          ("square", (230, 200, 50), 0.7, 0.3, 0.1)],
     "turn the circle into a triangle"),
    ("drawing_background.png", (400, 260), (235, 235, 228), [("circle", (210, 45, 50), 0.4, 0.45, 0.17),
                                                             ("triangle", (45, 75, 210), 1.15, 0.5, 0.18)],
     "make the background black"),
]
# Control sources: a drawing (its caption says what the map cannot: colours, background) and held-out scenes.
CONTROL_DRAWING = ("control_drawing.png", (320, 240), (240, 240, 240),
                   [("circle", (220, 40, 40), 0.45, 0.55, 0.2), ("square", (40, 80, 220), 0.95, 0.4, 0.15)],
                   "a red circle and a blue square on a white background")
CONTROL_HELD_OUT = (0, 1, 2)
CELL = 160  # grid cell height in pixels


def draw(size, paper, shapes) -> Image.Image:
    """A drawing as a user makes it: PIL shapes, anti-aliased by drawing at 4x and reducing."""
    w, h = size
    big = Image.new("RGB", (4 * w, 4 * h), paper)
    pen, unit = ImageDraw.Draw(big), 4 * min(w, h)
    for kind, fill, x, y, r in shapes:
        x, y, r = x * unit, y * unit, r * unit
        if kind == "circle":
            pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif kind == "square":
            pen.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
        else:
            pen.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=fill)
    return big.resize(size, Image.BOX)


def sources() -> list[dict]:
    examples = []
    for name, size, paper, shapes, prompt in DRAWINGS:
        draw(size, paper, shapes).save(ROOT / "examples" / name)
        examples.append({"image": name, "prompt": prompt, "split": "drawn with PIL"})
    for i in HELD_OUT:
        e = toy_edit(i, "heldout")
        name = f"heldout_{i}_{e.kind}.png"
        Image.fromarray(render(e.before, 256)).save(ROOT / "examples" / name)
        examples.append({"image": name, "prompt": e.text, "split": "heldout", "index": i})
    return examples


def fit(img: Image.Image) -> Image.Image:
    return img.resize((round(img.width * CELL / img.height), CELL), Image.BICUBIC)


def grid(examples: list[dict], models: dict) -> Image.Image:
    """One row per example: the instruction, the source, each model's output."""
    rows = []
    for ex in examples:
        source = Image.open(ROOT / "examples" / ex["image"]).convert("RGB")
        outputs = [sample.edit(*m, source, ex["prompt"])[0] for m in models.values()]
        rows.append((ex, [fit(source), *map(fit, outputs)]))
    label_w, gap = 230, 8
    widths = [max(cells[c].width for _, cells in rows) for c in range(len(rows[0][1]))]
    canvas = Image.new("RGB", (label_w + sum(w + gap for w in widths), 20 + len(rows) * (CELL + gap)), "white")
    pen = ImageDraw.Draw(canvas)
    x = label_w
    for title, w in zip(["source", *(f"output ({arch})" for arch in models)], widths):
        pen.text((x, 4), title, fill="black")
        x += w + gap
    for r, (ex, cells) in enumerate(rows):
        y = 20 + r * (CELL + gap)
        pen.text((8, y + CELL // 2 - 8), f'"{ex["prompt"]}"', fill="black")
        pen.text((8, y + CELL // 2 + 4), f'({ex["split"]})', fill="gray")
        x = label_w
        for cell, w in zip(cells, widths):
            canvas.paste(cell, (x, y))
            x += w + gap
    return canvas


def captioned(images: list[Image.Image], text: str, side=128) -> Image.Image:
    """Images side by side at `side` px (nearest: the 64 px pixels as they are), the text below."""
    lines = textwrap.wrap(text, 6 * len(images) * side // 40)
    tile = Image.new("RGB", (len(images) * (side + 8), side + 4 + 12 * len(lines)), "white")
    for i, img in enumerate(images):
        tile.paste(img.resize((side, side), Image.NEAREST), (i * (side + 8), 0))
    for j, line in enumerate(lines):
        ImageDraw.Draw(tile).text((0, side + 3 + 12 * j), line, fill="black")
    return tile


def toy_pictures():
    """Seven training edits (one of each kind) and a held-out one; a control pair."""
    edits = [next(e for e in map(toy_edit, range(200)) if e.kind == kind) for kind in EDITS]
    edits.append(toy_edit(0, "heldout"))
    tiles = [captioned([Image.fromarray(render(e.before)), Image.fromarray(render(e.after))],
                       ("[held-out] " if e is edits[-1] else "") + e.text) for e in edits]
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (4 * (w + 16), 2 * (h + 8)), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % 4) * (w + 16) + 8, (i // 4) * (h + 8) + 8))
    sheet.save(ROOT / "assets" / "toy_pairs.png")
    pair = ToyControl(1)[0]
    captioned([to_image(pair["source"]), to_image(pair["target"])], pair["text"]).save(ROOT / "assets" / "toy_control.png")


def control_sources() -> list[dict]:
    name, size, paper, shapes, prompt = CONTROL_DRAWING
    draw(size, paper, shapes).save(ROOT / "examples" / name)
    examples = [{"image": name, "prompt": prompt, "split": "drawn with PIL"}]
    for i in CONTROL_HELD_OUT:
        scene = ToyControl(i + 1, "heldout", size=256)[i]
        to_image(scene["target"]).save(ROOT / "examples" / f"control_heldout_{i}.png")
        examples.append({"image": f"control_heldout_{i}.png", "prompt": scene["text"], "split": "heldout", "index": i})
    return examples


def control_grid(examples: list[dict], ckpt: Path) -> Image.Image:
    """One row per source: the caption, the picture, then each kind's map (at the model's resolution, as the
    model reads it) and the scene drawn from it."""
    model, meta = load_scar(ckpt)
    parts = (model, meta, *sample.frozen_parts(meta, ckpt, "cpu")[:2])
    kinds, side, gap = meta["control"], CELL * 3 // 4, 8
    canvas = Image.new("RGB", (gap + (1 + 2 * len(kinds)) * (side + gap), 20 + len(examples) * (side + 28)), "white")
    pen = ImageDraw.Draw(canvas)
    for c, title in enumerate(["picture", *(f"{t} {k}" for k in kinds for t in ("map:", "output:"))]):
        pen.text((gap + c * (side + gap), 4), title, fill="black")
    for r, ex in enumerate(examples):
        picture = Image.open(ROOT / "examples" / ex["image"]).convert("RGB")
        square = sample.fit_square(picture, meta["image_size"])[0]
        cells = [square]
        for kind in kinds:
            cells.append(to_image(control_map(to_tensor(square), kind)))
            cells.append(sample.fit_square(sample.edit(*parts, picture, ex["prompt"], control=kind)[0], meta["image_size"])[0])
        y = 20 + r * (side + 28)
        for c, cell in enumerate(cells):
            canvas.paste(cell.resize((side, side), Image.NEAREST), (gap + c * (side + gap), y))
        pen.text((gap, y + side + 4), f'"{ex["prompt"]}" ({ex["split"]})', fill="black")
    return canvas


def main():
    toy_pictures()
    controls = control_sources()
    (ROOT / "examples" / "control.json").write_text(json.dumps(controls, indent=1) + "\n")
    control_grid(controls, ROOT / "checkpoints" / "toy" / "control" / "control.safetensors").save(ROOT / "assets" / "control.png")
    examples = sources()
    (ROOT / "examples" / "examples.json").write_text(json.dumps(examples, indent=1) + "\n")
    models = {}
    for ckpt in sorted((ROOT / "checkpoints" / "toy").glob("edit_*/edit.safetensors")):
        model, meta = load_scar(ckpt)
        models[meta["arch"]] = (model, meta, *sample.frozen_parts(meta, ckpt, "cpu")[:2])
    grid(examples, models).save(ROOT / "assets" / "examples.png")


if __name__ == "__main__":
    main()
