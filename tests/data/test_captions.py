"""Captions from labels and measured attributes: the measurements on synthetic strokes, the phrasing sets kept
apart, and each example's caption fixed."""
import pytest
import torch

from torchdiffusion.data.captions import (DIGIT_ATTRIBUTES, DIGIT_WORDS, GARMENT_ATTRIBUTES, PHRASINGS,
                                          all_captions, attribute_agreement, caption_choices, compose,
                                          make_captions, measure_attributes)


def bar(width: int, length: int = 20, shear: float = 0.0, size: int = 28) -> torch.Tensor:
    """A white bar (1, 1, size, size) uint8, `width` pixels wide and `length` tall, centred; row y is shifted
    right by shear * (centre - y) (shear > 0: the top leans right)."""
    img = torch.zeros(size, size, dtype=torch.uint8)
    top = (size - length) // 2
    for y in range(top, top + length):
        x0 = round(size / 2 - width / 2 + shear * ((size - 1) / 2 - y))
        img[y, x0:x0 + width] = 255
    return img[None, None]


def test_thickness_is_the_stroke_width():
    for w in (1, 2, 4):
        got = measure_attributes(bar(w))["thickness"].item()
        assert got == pytest.approx(w * 20 / (w + 20), rel=1e-6)  # 2A/P of a w x 20 rectangle
    levels = DIGIT_ATTRIBUTES["thickness"].level(measure_attributes(torch.cat([bar(1), bar(4)]))["thickness"])
    assert levels.tolist() == [0, 2]  # thin, thick


def test_slant_is_the_shear_of_the_second_moments():
    imgs = torch.cat([bar(3), bar(3, shear=0.5), bar(3, shear=-0.5)])
    slant = measure_attributes(imgs)["slant"]
    assert abs(slant[0]) < 0.02
    assert slant[1].item() == pytest.approx(0.5, abs=0.05) and slant[2].item() == pytest.approx(-0.5, abs=0.05)
    words = [c for c, _ in caption_choices(imgs, torch.full((3,), 1), "digits", seed=0)]
    named = [n for _, n in caption_choices(imgs, torch.full((3,), 1), "digits", seed=0)]
    # the levels behind the words: upright (3), slanted (2), left-leaning (0), whenever the slant is named
    for lv, n in zip((3, 2, 0), named):
        assert n.get("slant", lv) == lv
    assert all("one" in c or "1" in c for c in words)


def test_size_and_brightness():
    small, large = bar(4, length=10), bar(16, length=24)
    v = measure_attributes(torch.cat([small, large]))
    assert v["box_area"].tolist() == [40.0, 16 * 24]
    dim = (bar(16, length=24).float() * 0.6).to(torch.uint8)
    b = measure_attributes(torch.cat([large, dim]))["brightness"]
    assert b.tolist() == pytest.approx([1.0, 153 / 255], abs=1e-6)
    assert GARMENT_ATTRIBUTES["brightness"].level(b).tolist() == [2, 0]  # light, dark


@pytest.mark.parametrize("kind", ["digits", "garments"])
def test_heldout_phrasings_never_occur_in_training(kind):
    train, heldout = all_captions(kind, "train"), all_captions(kind, "heldout")
    assert len(heldout) > 100 and not train & heldout
    assert not set(PHRASINGS[kind]["train"]) & set(PHRASINGS[kind]["heldout"])


def test_captions_are_fixed_per_example_and_name_their_class():
    g = torch.Generator().manual_seed(0)
    imgs = torch.cat([bar(int(w), shear=float(s)) for w, s in zip(torch.randint(1, 5, (40,), generator=g),
                                                                    torch.rand(40, generator=g) - 0.5)])
    labels = torch.arange(40) % 10
    caps = make_captions(imgs, labels, "digits")
    assert caps == make_captions(imgs, labels, "digits")
    assert make_captions(imgs[10:20], labels[10:20], "digits", offset=10) == caps[10:20]
    assert make_captions(imgs, labels, "digits", seed=1) != caps
    assert set(caps) <= all_captions("digits", "train")
    assert set(make_captions(imgs, labels, "digits", "heldout")) <= all_captions("digits", "heldout")
    for c, y in zip(caps, labels.tolist()):
        words = c.replace(",", " ").split()
        assert DIGIT_WORDS[y] in words or str(y) in words, c
    # a caption names only what was measured: its attributes agree with the image they were measured on
    named = [n for _, n in caption_choices(imgs, labels, "digits")]
    agree, count = attribute_agreement(imgs, named, "digits")
    assert agree == 1.0 and count > 20


def test_grammar():
    assert compose("digits", 8, [], "a {attrs} {noun}") == "an eight"
    assert compose("digits", 1, ["upright"], "a {attrs} {noun}") == "an upright one"
    assert compose("digits", 1, [], "a {attrs} {noun}") == "a one"
    assert compose("digits", 7, ["thin", "slanted", "large"], "the digit {noun}, {attrs}") == \
        "the digit seven, thin, slanted and large"
    assert compose("digits", 7, [], "the digit {noun}, {attrs}") == "the digit seven"
    assert compose("garments", 9, ["dark"], "a {attrs} {noun}") == "a dark ankle boot"
