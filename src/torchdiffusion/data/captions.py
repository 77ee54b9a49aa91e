"""Captions of MNIST and Fashion-MNIST images, made from the label and from attributes measured on the image.

A caption names the class and some of the attributes of its own image, in one of several phrasings, e.g. "a thick
slanted seven" or "a handwritten 7, thin and upright". The attributes are measured on the uint8 image, with no
learned model (:func:`measure_attributes`):

* stroke **thickness**, skeleton-free: twice the ink area over the ink perimeter, 2A/P. A bar of width w and length
  l >> w has A = w l and P = 2(w + l), so 2A/P = w l / (w + l) -> w: the stroke width in pixels;
* **slant** from the second moments of the ink: the shear -mu11 / mu02 (x shift per row going up; positive: the top
  leans right), the moment deskewing of MNIST digits uses (LeCun et al. 1998);
* **size**, the area of the bounding box of the ink;
* **brightness**, the mean intensity of the ink pixels (garments).

Each attribute has three levels cut at named thresholds (about the terciles of the training set); the words of an
attribute are in :data:`DIGIT_ATTRIBUTES` / :data:`GARMENT_ATTRIBUTES` ('' : the level is never named). Which
attributes a caption mentions and its phrasing are drawn per example from ``hash_seed(seed, index)``, so the caption
of an example is fixed. The phrasings come in two disjoint sets (:data:`PHRASINGS`): ``train`` for training and
``heldout`` for evaluation only (no held-out caption is ever a training caption: tests/data/test_captions.py). The
empty caption :data:`NULL_CAPTION` is the null condition of classifier-free guidance.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..utils import check_choice, hash_seed

NULL_CAPTION = ""               # the null condition (caption dropout, the unconditional half of guidance)
INK_THRESHOLD = 128             # a pixel is ink when its uint8 value is at least this
CAPTION_SETS = ("digits", "garments")
PHRASING_SETS = ("train", "heldout")
MENTION_PROB = 0.5              # each attribute of an example is named in its caption with this probability
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GARMENT_WORDS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")


@dataclass(frozen=True)
class Attribute:
    """A measured quantity cut into three levels: below `low` -> words[0], above `high` -> words[2], else words[1]."""

    measure: str                # key of measure_attributes
    low: float                  # upper end of the first level
    high: float                 # lower end of the third level
    words: tuple                # the word of each level ('' : not named)

    def level(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) int64 level 0, 1 or 2 of each value."""
        return (values >= self.low).long() + (values > self.high).long()


# thresholds near the terciles of the 60 000 training images (thickness in pixels, slant in x pixels per row, box
# area in pixels, brightness in [0, 1]); the middle slant level is named only within +-UPRIGHT_SLANT
DIGIT_ATTRIBUTES = {
    "thickness": Attribute("thickness", 1.75, 2.25, ("thin", "", "thick")),
    "slant": Attribute("slant", -0.1, 0.25, ("left-leaning", "", "slanted")),
    "size": Attribute("box_area", 240.0, 340.0, ("small", "", "large")),
}
UPRIGHT_SLANT = 0.1             # |slant| below this: the digit is named "upright"
GARMENT_ATTRIBUTES = {
    "size": Attribute("box_area", 330.0, 560.0, ("small", "", "large")),
    "brightness": Attribute("brightness", 0.67, 0.82, ("dark", "", "light")),
}

# {noun}: the class word, {attrs}: the named attributes ('' when none); a/an is fixed after formatting
PHRASINGS = {
    "digits": {
        "train": ("a {attrs} {noun}", "the digit {noun}, {attrs}", "a handwritten {attrs} {noun}",
                  "{attrs} {noun}", "an image of a {attrs} {noun}", "a {attrs} number {noun}"),
        "heldout": ("someone wrote a {attrs} {noun}", "a picture showing the {attrs} numeral {noun}",
                    "a {attrs} {noun} drawn by hand"),
    },
    "garments": {
        "train": ("a {attrs} {noun}", "a photo of a {attrs} {noun}", "a {attrs} {noun}, product shot",
                  "{attrs} {noun}", "an image of a {attrs} {noun}"),
        "heldout": ("a catalogue picture of a {attrs} {noun}", "here is a {attrs} {noun}",
                    "a {attrs} {noun} on display"),
    },
}


def caption_set_of(dataset: str) -> str:
    """'digits' for MNIST, 'garments' for Fashion-MNIST (train or test split names)."""
    key = str(dataset).lower()
    if key.startswith("fashion-mnist"):
        return "garments"
    if key.startswith("mnist"):
        return "digits"
    raise ValueError(f"captions are made for mnist and fashion-mnist only, not {dataset!r}")


def _moments(ink: torch.Tensor) -> torch.Tensor:
    """(N,) slant -mu11 / mu02 of the intensity-weighted ink (N, H, W) (y grows downwards)."""
    h, w = ink.shape[-2:]
    ys = torch.arange(h, dtype=ink.dtype)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=ink.dtype)[None, :].expand(h, w)
    mass = ink.flatten(1).sum(1).clamp_min(1e-6)  # (N,)
    my = (ink * ys).flatten(1).sum(1) / mass
    mx = (ink * xs).flatten(1).sum(1) / mass
    dy, dx = ys - my[:, None, None], xs - mx[:, None, None]  # (N, H, W)
    mu11 = (ink * dx * dy).flatten(1).sum(1) / mass
    mu02 = (ink * dy * dy).flatten(1).sum(1) / mass
    return -mu11 / mu02.clamp_min(1e-6)


def _extent(any_ink: torch.Tensor) -> torch.Tensor:
    """(N,) number of rows (or columns) from the first to the last one with ink, of (N, L) bool."""
    idx = torch.arange(any_ink.shape[1], dtype=torch.float32)
    first = torch.where(any_ink, idx, torch.inf).amin(1)
    last = torch.where(any_ink, idx, -torch.inf).amax(1)
    return (last - first + 1).clamp_min(0)


def measure_attributes(images: torch.Tensor) -> dict:
    """thickness, slant, box_area, brightness (N,) float32 each of grey uint8 images (N, 1, H, W) (module docstring)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"attributes are measured on grey uint8 images (N, 1, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = images[:, 0].float() / 255  # (N, H, W)
    b = (images[:, 0] >= INK_THRESHOLD).float()
    area = b.flatten(1).sum(1)
    padded = torch.nn.functional.pad(b, (1, 1, 1, 1))  # ink on the border counts its edge
    perimeter = ((padded[:, :, 1:] - padded[:, :, :-1]).abs().flatten(1).sum(1)
                 + (padded[:, 1:, :] - padded[:, :-1, :]).abs().flatten(1).sum(1))
    box = _extent(b.amax(2) > 0) * _extent(b.amax(1) > 0)
    return {"thickness": 2 * area / perimeter.clamp_min(1), "slant": _moments(x), "box_area": box,
            "brightness": (x * b).flatten(1).sum(1) / area.clamp_min(1)}


def _levels(images: torch.Tensor, kind: str) -> dict:
    """{attribute: (N,) word index} of each image; the digits' middle slant level is 'upright' when near 0."""
    values = measure_attributes(images)
    table = DIGIT_ATTRIBUTES if kind == "digits" else GARMENT_ATTRIBUTES
    levels = {name: a.level(values[a.measure]) for name, a in table.items()}
    if kind == "digits":
        upright = (levels["slant"] == 1) & (values["slant"].abs() < UPRIGHT_SLANT)
        levels["slant"] = torch.where(upright, torch.full_like(levels["slant"], 3), levels["slant"])
    return levels


def _words(kind: str, name: str) -> tuple:
    """The word of each level of attribute `name` (the digits' slant has a fourth: upright)."""
    table = DIGIT_ATTRIBUTES if kind == "digits" else GARMENT_ATTRIBUTES
    words = table[name].words
    return words + ("upright",) if (kind, name) == ("digits", "slant") else words


def _tidy(text: str) -> str:
    """Spaces and commas left by an empty {attrs} removed, and 'a' before a vowel sound made 'an'."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+,", ",", text).strip(" ,")
    text = re.sub(r",\s*$", "", text)
    return re.sub(r"\b(a) (?=(?!one\b)[aeiou8])", "an ", text)


def compose(kind: str, label: int, attrs: list, phrasing: str, *, digit_as_word: bool = True) -> str:
    """One caption: the class word (a digit as a word or as a numeral), the attribute words `attrs` and the
    phrasing template (a string with {noun} and {attrs})."""
    check_choice("caption set", kind, CAPTION_SETS)
    noun = (DIGIT_WORDS[label] if digit_as_word else str(label)) if kind == "digits" else GARMENT_WORDS[label]
    trailing = phrasing.endswith("{attrs}")  # "the digit seven, thin and slanted"; else "a thin slanted seven"
    joined = ", ".join(attrs[:-1]) + " and " + attrs[-1] if trailing and len(attrs) > 1 else " ".join(attrs)
    return _tidy(phrasing.format(noun=noun, attrs=joined))


def _draw(kind: str, levels: dict, h: int) -> dict:
    """{attribute: level} of the attributes an example with hash h names (each with probability MENTION_PROB)."""
    return {n: int(levels[n]) for j, n in enumerate(levels) if (h >> (8 + 8 * j)) % 256 < MENTION_PROB * 256
            and _words(kind, n)[int(levels[n])]}


def caption_choices(images: torch.Tensor, labels: torch.Tensor, kind: str, phrasings: str = "train", *,
                    seed: int = 0, offset: int = 0) -> list[tuple[str, dict]]:
    """(caption, {attribute: level named}) of every example (images (N, 1, H, W) uint8, labels (N,)): example i
    (global index offset + i) draws its phrasing, whether each attribute is named (probability MENTION_PROB) and
    whether a digit is a word or a numeral from hash_seed(seed, offset + i). Levels index _words(kind, name)."""
    check_choice("caption set", kind, CAPTION_SETS)
    check_choice("phrasings", phrasings, PHRASING_SETS)
    templates = PHRASINGS[kind][phrasings]
    levels = _levels(images, kind)
    out = []
    for i, label in enumerate(labels.tolist()):
        h = hash_seed(seed, offset + i)
        named = _draw(kind, {n: v[i] for n, v in levels.items()}, h)
        words = [_words(kind, n)[lv] for n, lv in named.items()]
        out.append((compose(kind, int(label), words, templates[h % len(templates)],
                            digit_as_word=(h >> 40) % 2 == 0), named))
    return out


def make_captions(images: torch.Tensor, labels: torch.Tensor, kind: str, phrasings: str = "train", *,
                  seed: int = 0, offset: int = 0) -> list[str]:
    """The caption of every example (see :func:`caption_choices`)."""
    return [c for c, _ in caption_choices(images, labels, kind, phrasings, seed=seed, offset=offset)]


def attribute_agreement(images: torch.Tensor, named: list, kind: str) -> tuple[float, int]:
    """(share of the named attributes whose level measured on `images` is the named one, how many were named):
    how well generated images follow the attributes of their prompts."""
    levels = _levels(images, kind)
    pairs = [(int(levels[n][i]) == lv) for i, d in enumerate(named) for n, lv in d.items()]
    return (sum(pairs) / len(pairs) if pairs else float("nan")), len(pairs)


def all_captions(kind: str, phrasings: str) -> set:
    """Every caption the phrasing set can produce (every class, numeral form and combination of attribute words)."""
    names = list(DIGIT_ATTRIBUTES if kind == "digits" else GARMENT_ATTRIBUTES)
    combos = [[]]
    for n in names:
        combos = [c + ([w] if w else []) for c in combos for w in ("",) + tuple(_words(kind, n))]
    forms = (True, False) if kind == "digits" else (True,)
    return {compose(kind, label, c, p, digit_as_word=f) for label in range(10) for c in combos
            for p in PHRASINGS[kind][phrasings] for f in forms}
