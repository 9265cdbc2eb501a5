"""Data: the toy world's ground truth and splits, control maps, image reading, manifest folders."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from PIL import Image

from data import (BACKGROUNDS, COLORS, EDITS, HELD_OUT, PLACES, PALETTE, RADII, SHAPES, UNNAMED, ControlDataset, DataError,
                  EditDataset, ToyControl, ToyEdits, canny, control_map, coverage, edit_mask, load_image, place_of, render,
                  to_tensor, toy_edit, toy_vocabulary)
from model import encode_words, words_of
from train import TEXT_LEN

EDIT_FOLDER, CONTROL_FOLDER = FIXTURES / "edit_folder", FIXTURES / "control_folder"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_ground_truth_is_exact(split):
    data = ToyEdits(150, split, size=64, seed=3)
    for i in range(len(data)):
        item, edit = data[i], toy_edit(i, split, seed=3)
        changed = (item["source"] != item["target"]).any(0)
        assert changed.any(), edit.text  # every edit is visible
        assert not (changed & (item["mask"][0] == 0)).any(), edit.text  # and stays inside its mask
        assert torch.equal(item["target"], to_tensor(Image.fromarray(render(edit.after, 64))))
        assert torch.equal(item["source"], to_tensor(Image.fromarray(render(edit.before, 64))))


def test_every_edit_kind_and_the_vocabulary_occur():
    edits = [toy_edit(i) for i in range(600)]
    assert {e.kind for e in edits} == set(EDITS)
    shapes = {s.kind for e in edits for s in e.before.shapes}
    colors = {s.color for e in edits for s in e.before.shapes}
    assert shapes == set(SHAPES) and colors == set(COLORS) and len(COLORS) >= 6
    assert {e.before.background for e in edits} == set(BACKGROUNDS) | set(UNNAMED)  # any paper, four of them named
    assert {len(e.before.shapes) for e in edits} == {1, 2, 3}
    assert {place_of(s) for e in edits for s in e.before.shapes} == set(PLACES)
    radii = [s.r for e in edits for s in e.before.shapes]
    assert RADII[0] <= min(radii) < 0.07 and 0.16 < max(radii) <= RADII[1]  # any size in the range
    assert len({e.text for e in edits if e.kind == "remove"}) > 10  # several phrasings


def test_held_out_combinations_never_occur_in_training():
    train = {toy_edit(i).triple for i in range(3000)}
    held = [toy_edit(i, "heldout").triple for i in range(300)]
    assert not train & HELD_OUT
    assert set(held) == HELD_OUT  # and the held-out split covers every one of them


def test_shapes_never_overlap_and_are_anti_aliased():
    for i in range(200):
        scene = toy_edit(i).after
        covers = [coverage(s, 64) for s in scene.shapes]
        assert sum(covers).max() <= 1  # no pixel is covered by two shapes
        img = render(scene, 64)
        for s, cover in zip(scene.shapes, covers):
            assert cover.sum() > 0 and s.r <= min(s.x, s.y, 1 - s.x, 1 - s.y) + 1e-9  # inside the image
            assert (img[cover == 1] == COLORS[s.color]).all()  # flat inside
        assert (img[sum(covers) == 0] == PALETTE[scene.background]).all()
        edge = (0 < sum(covers)) & (sum(covers) < 1)
        assert len({tuple(p) for p in img[edge]} - {tuple(c) for c in PALETTE.values()}) > 0  # edges blend colours


def test_add_and_move_go_to_the_named_region():
    edits = [e for e in (toy_edit(i) for i in range(400)) if e.kind in ("add", "move")]
    assert {e.kind for e in edits} == {"add", "move"}
    for e in edits:
        place = next(p for p in sorted(PLACES, key=len, reverse=True) if e.text.endswith(p))
        new = e.changed[-1]
        assert place_of(new) == place, e.text
        if e.kind == "add":
            assert (new.x, new.y) == PLACES[place]  # the region's centre: one exact target
        else:
            assert place_of(e.changed[0]) != place


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = ToyEdits(20, seed=1), ToyEdits(20, seed=1), ToyEdits(20, seed=2)
    for i in range(20):
        assert torch.equal(a[i]["target"], b[i]["target"]) and a[i]["text"] == b[i]["text"]
    assert any(a[i]["text"] != c[i]["text"] for i in range(20))


def test_varied_phrasings_keep_the_words():
    plain, varied, again = ToyEdits(300), ToyEdits(300, varied=True), ToyEdits(300, varied=True)
    texts = [varied[i]["text"] for i in range(300)]
    assert texts == [again[i]["text"] for i in range(300)]  # deterministic by index, so resumed runs match
    for text, item in zip(texts, (plain[i] for i in range(300))):
        core = text.removeprefix("please ").removeprefix("Please ").rstrip(".!")
        assert core.lower() == item["text"].lower() and core[1:] == item["text"][1:]
        assert words_of(core) == words_of(item["text"])
    assert {t[-1] for t in texts} >= {".", "!"} and any(t[0].isupper() for t in texts)
    assert sum(t.lower().startswith("please ") for t in texts) > 30
    assert sum(t == item for t, item in zip(texts, (plain[i]["text"] for i in range(300)))) > 30


def test_toy_vocabulary_holds_every_word_the_toy_world_writes():
    edits = [ToyEdits(500, split, varied=True)[i]["text"] for split in ("train", "heldout") for i in range(500)]
    captions = [ToyControl(200)[i]["text"] for i in range(200)]
    assert set(toy_vocabulary()) == {w for t in edits + captions for w in words_of(t)}  # none missing, none unused
    encode_words(edits, toy_vocabulary(), TEXT_LEN["edit"])  # raises on an unknown word or a text too long
    encode_words(captions, toy_vocabulary(), TEXT_LEN["control"])


def test_edit_mask_of_background_edits_excludes_the_shapes():
    edit = next(e for e in (toy_edit(i) for i in range(200)) if e.kind == "background")
    mask = edit_mask(edit, 64)
    for shape_pixel in np.argwhere(render(edit.before, 64) != render(edit.after, 64))[:, :2]:
        assert mask[tuple(shape_pixel)]


def test_canny_on_a_hand_made_image():
    """A bright 8x8 square on black: OpenCV's tie rule keeps, at each side, the pixel before the step."""
    img = torch.full((3, 16, 16), -1.0)
    img[:, 4:12, 4:12] = 1.0
    edges = canny(img)
    expected = torch.zeros(16, 16)
    expected[5:11, 3] = expected[5:11, 11] = 1  # left side: outside pixel; right side: inside pixel
    expected[3, 5:11] = expected[11, 5:11] = 1
    assert torch.equal(edges[5:11], expected[5:11]) and torch.equal(edges[:, 5:11], expected[:, 5:11])
    assert edges[:2].sum() == 0 and edges[14:].sum() == 0 and edges[6:10, 6:10].sum() == 0
    assert canny(torch.zeros(3, 16, 16)).sum() == 0


def test_canny_thresholds_and_hysteresis():
    """A weak step (between the thresholds) survives only where it connects to a strong one."""
    img = torch.full((3, 16, 16), -1.0)
    img[:, :, 8:] = -1.0 + 2 * 30 / 255  # L1 Sobel magnitude 120: above 100, below 200
    assert canny(img).sum() == 0
    img[:, :4, 8:] = 1.0  # a strong part at the top, touching the weak column
    edges = canny(img)
    assert edges[:3, 7].all()  # strong
    assert edges[6:, 7].all()  # weak, kept through its connection (the junction rows bend diagonally)


@pytest.mark.parametrize("kind", ["canny", "softedge", "depth"])
def test_control_maps_are_images(kind):
    x = ToyEdits(1)[0]["target"]
    c = control_map(x, kind)
    assert c.shape == (3, 64, 64) and c.min() >= -1 and c.max() <= 1 and c.std() > 0


def test_unknown_control_kind():
    with pytest.raises(ValueError, match="canny, softedge, depth"):
        control_map(torch.zeros(3, 8, 8), "sketch")


def test_toy_control_pairs():
    item = ToyControl(3)[1]
    assert item["source"].shape == item["target"].shape == (3, 64, 64)
    assert set(item["source"].unique().tolist()) <= {-1.0, 1.0} and " on a " in item["text"]


def test_edit_folder_reader():
    data = EditDataset(EDIT_FOLDER, size=32)
    assert len(data) == 3
    item = data[0]
    assert item["source"].shape == item["target"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["text"] == "make the purple square a triangle"
    assert 0 < item["mask"].mean() < 1 and data[2]["mask"].min() == 1  # no mask: the whole image


def test_flips_are_pair_consistent():
    data = EditDataset(EDIT_FOLDER, size=32, flip=True)
    plain = EditDataset(EDIT_FOLDER, size=32)[0]
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        item = data[0]
        flipped = torch.equal(item["source"], plain["source"].flip(-1))
        assert flipped != torch.equal(item["source"], plain["source"])
        assert torch.equal(item["target"], plain["target"].flip(-1) if flipped else plain["target"])
        assert torch.equal(item["mask"], plain["mask"].flip(-1) if flipped else plain["mask"])
        seen.add(flipped)
    assert seen == {True, False}


def test_control_folder_reader():
    data = ControlDataset(CONTROL_FOLDER, size=32, control="canny")
    computed, given = data[0], data[1]
    assert torch.equal(computed["source"], control_map(computed["target"], "canny"))
    assert given["label"] == 3 and "text" not in given and "on a" in computed["text"]


def copy_folder(tmp_path, lines):
    folder = tmp_path / "data"
    shutil.copytree(EDIT_FOLDER, folder)
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


GOOD = json.dumps({"source": "images/0_src.png", "target": "images/0_tgt.png", "instruction": "x"})


@pytest.mark.parametrize("line, message", [
    ("{not json", r"manifest.jsonl:2: not valid JSON"),
    ("[1, 2]", r"manifest.jsonl:2: a record must be a JSON object"),
    (json.dumps({"source": "images/0_src.png", "target": "images/0_tgt.png"}), r"manifest.jsonl:2: record lacks instruction"),
    (json.dumps({"source": "images/nope.png", "target": "images/0_tgt.png", "instruction": "x"}),
     r"manifest.jsonl:2: image .*images/nope.png is missing"),
])
def test_bad_records(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        EditDataset(copy_folder(tmp_path, [GOOD, line]))


def test_missing_manifest_and_empty_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest.jsonl"):
        EditDataset(tmp_path)
    with pytest.raises(DataError, match="no records"):
        EditDataset(copy_folder(tmp_path, [""]))


def test_unreadable_image_names_file_and_record(tmp_path):
    folder = copy_folder(tmp_path, [GOOD, GOOD.replace("0_src", "1_src")])
    (folder / "images" / "1_src.png").write_bytes(b"not a png at all")
    data = EditDataset(folder, size=32)
    with pytest.raises(DataError, match=r"manifest.jsonl:2: .*1_src.png: not a readable image"):
        data[1]


def test_skip_bad_counts_and_skips(tmp_path, capsys):
    missing = GOOD.replace("0_src", "gone")
    folder = copy_folder(tmp_path, [GOOD, missing, GOOD.replace("0_src", "1_src")])
    (folder / "images" / "1_src.png").write_bytes(b"broken")
    data = EditDataset(folder, size=32, skip_bad=True)
    assert len(data) == 2 and "skipped 1 records with missing images" in capsys.readouterr().err
    item = data[1]  # unreadable: the next record is returned instead, and the skip is logged
    assert torch.equal(item["source"], data[0]["source"]) and "skipped:" in capsys.readouterr().err


def image_bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_load_image_modes_and_orientation(tmp_path):
    base = Image.new("RGB", (6, 4), (200, 10, 10))
    base.putpixel((0, 0), (0, 255, 0))
    cases = {
        "rgba.png": Image.new("RGBA", (6, 4), (0, 0, 0, 0)),  # transparent -> white
        "gray.png": Image.new("L", (6, 4), 77),
        "pal.gif": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
        "deep.png": Image.new("I;16", (6, 4), 65535),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (6, 4), name
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    (tmp_path / "rot.jpg").write_bytes(image_bytes(base, "JPEG", exif=exif, quality=100))
    assert load_image(tmp_path / "rot.jpg").size == (4, 6)
    with pytest.raises(DataError, match="is a directory"):
        load_image(tmp_path)


def test_drawn_edits_are_drawn_outside_the_generator():
    """DrawnEdits: anti-aliased (colours between the palette's), off-palette backgrounds, the edit inside its mask."""
    from data import BACKGROUNDS, DrawnEdits
    data = DrawnEdits(12, size=64, seed=0)
    kinds, colours = set(), 0
    for i in range(len(data)):
        item = data[i]
        kinds.add(item["kind"])
        source, target, mask = item["source"], item["target"], item["mask"]
        assert source.shape == target.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
        assert torch.equal(source * (1 - mask), target * (1 - mask)) and not torch.equal(source, target)
        pixels = {tuple(p) for p in ((source + 1) * 127.5).round().int().flatten(1).t().tolist()}
        colours = max(colours, len(pixels))
        corner = tuple(((source[:, 0, 0] + 1) * 127.5).round().int().tolist())
        assert corner not in BACKGROUNDS.values() or i  # a drawing's white is not exactly the generator's
    assert {"recolor", "remove", "background"} <= kinds and colours > 20  # edge pixels mix colours: anti-aliased
    assert torch.equal(DrawnEdits(12, size=64, seed=0)[5]["source"], data[5]["source"])  # deterministic
