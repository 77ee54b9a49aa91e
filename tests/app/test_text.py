"""The text task end to end on a tiny text: train -> checkpoint -> exact resume -> generate-text -> evaluate, for the
masked diffusion model (mdlm), the uniform one (d3pm) and the autoregressive twin (ar); the tokeniser in the
checkpoint; infilling and prompting; the AR evaluation against the network's cross-entropy written out; the
refusals; the presets."""
import json
import math
import random

import pytest
import torch

from torchdiffusion.app.cli import main
from torchdiffusion.app.text import generate_text
from torchdiffusion.build import load_text_model, text_config
from torchdiffusion.checkpoint import load_checkpoint, read_meta
from torchdiffusion.config import ConfigError, load_config, to_dict
from torchdiffusion.data import prepare_text, read_split
from torchdiffusion.evaluate.text import evaluate_text_checkpoint
from torchdiffusion.training import Trainer

WORDS = "the king and queen of night shall speak to me now".split()
L = 24


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A prepared tiny text (about 15 kB, 20 characters), split 90/5/5 into train, valid and test."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)) + "\n")
    return prepare_text(path, root=path.parent / "cache", verbose=False)


def text_cfg(folder, out, objective, *over):
    extra = ["text.loss.steps=50"] if objective == "d3pm" else []
    return load_config(None, ["task=text", "model.kind=text_transformer", f"data.dataset={folder}",
                              f"data.seq_len={L}", "model.text_transformer.size=tiny", f"text.objective={objective}",
                              "train.batch_size=8", "train.steps=4", "train.ckpt_every=0", "text.valid_windows=8",
                              "text.eval_draws=2", "train.lr=3e-3", "train.warmup_steps=1", f"out_dir={out}",
                              f"name={objective}", *extra, *over])


@pytest.fixture(scope="module")
def runs(text_folder, tmp_path_factory):
    """A 4-step checkpoint of each objective."""
    out = tmp_path_factory.mktemp("runs")
    for objective in ("mdlm", "d3pm", "ar"):
        Trainer(text_cfg(text_folder, out, objective), progress=False).fit()
    return {o: out / o / "checkpoints" / "last.safetensors" for o in ("mdlm", "d3pm", "ar")}


@pytest.mark.parametrize("objective", ["mdlm", "ar"])
def test_train_resume_generate_evaluate(text_folder, tmp_path, capsys, objective):
    """An interrupted text run (time budget) continued ends bitwise equal to an uninterrupted one (weights, EMA,
    optimizer; with embedding dropout, so the random stream is resumed too); the checkpoint alone then generates
    (prompt kept) and evaluates (test and validation bits per character) from the command line."""
    over = ["train.steps=6", "model.text_transformer.dropout=0.1"]
    Trainer(text_cfg(text_folder, tmp_path / "a", objective, *over), progress=False).fit()
    first = Trainer(text_cfg(text_folder, tmp_path / "b", objective, *over, "train.max_minutes=0.0001"),
                    progress=False).fit()
    assert first["stopped_early"] and 0 < first["steps"] < 6
    second = Trainer(text_cfg(text_folder, tmp_path / "b", objective, *over), progress=False)
    assert second.step == first["steps"]
    second.fit()
    ckpt = tmp_path / "b" / objective / "checkpoints" / "last.safetensors"
    wa = load_checkpoint(tmp_path / "a" / objective / "checkpoints" / "last.safetensors")[1]
    wb = load_checkpoint(ckpt)[1]
    for group in ("model", "ema", "optim"):
        assert wa[group].keys() == wb[group].keys()
        assert all(torch.equal(wa[group][k], wb[group][k]) for k in wa[group]), group

    out = tmp_path / "gen"
    assert main(["generate-text", str(ckpt), "--n", "3", "--prompt", "the king", "--steps", "8",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "samples.json").read_text())
    assert len(written["samples"]) == 3 and written["model_calls"] >= 1 and written["settings"]["n"] == 3
    assert all(s.startswith("the king") and len(s) == L and s in printed for s in written["samples"])
    assert (out / "samples.txt").read_text().count("=== sample") == 3

    assert main(["evaluate", str(ckpt), "--draws", "2", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    for split in ("test", "valid"):
        r = result[split]
        assert r["windows"] == len(read_split(text_folder, split)) // L
        assert r["bits_per_character"] == pytest.approx(r["nats_per_token"] / math.log(2))
        assert 0 < r["bits_per_character"] < 1.2 * math.log2(20)  # at most a little above uniform
    assert result["test"]["draws_per_window"] == (1 if objective == "ar" else 2)


def test_the_tokeniser_round_trips_through_the_checkpoint(runs, text_folder):
    """The checkpoint's metadata holds the tokeniser as JSON; rebuilt, it is the training split's vocabulary,
    and the network's vocabulary, positions, mask token and causality were set from it and the objective."""
    train = read_split(text_folder, "train")
    for objective, ckpt in runs.items():
        meta = read_meta(ckpt)
        assert meta["tokenizer"] == {"kind": "char", "chars": sorted(set(train)), "unk": False}
        module, cfg, _, tok = load_text_model(ckpt)
        assert tok.decode(tok.encode(train[:200])) == train[:200]
        net = cfg.model.text_transformer
        assert (net.vocab_size, net.seq_len) == (tok.vocab_size, L) == (20, L)
        assert (net.mask_token, net.causal, net.time_cond) == {"mdlm": (True, False, False),
                                                               "d3pm": (False, False, True),
                                                               "ar": (False, True, False)}[objective]
        assert module.net.vocab_out == (21 if objective == "mdlm" else 20)


@pytest.mark.parametrize("objective,sampler", [("mdlm", "ancestral"), ("mdlm", "remask"), ("mdlm", "blocks"),
                                               ("d3pm", "ancestral")])
def test_infill_keeps_every_fixed_character(runs, objective, sampler):
    """--infill: the characters of the template other than the blank come back unchanged, blanks are
    generated (one position each), and sample i does not depend on how many are drawn."""
    template = "the ____ and ___ of _"
    r = generate_text(runs[objective], infill=template, n=3, sampler=sampler, steps=4, block_size=5, seed=7)
    for s in r["samples"]:
        assert len(s) == len(template)
        assert all(c == t for c, t in zip(s, template) if t != "_")
    assert r["fixed_positions"] == sum(c != "_" for c in template)
    one = generate_text(runs[objective], infill=template, n=1, sampler=sampler, steps=4, block_size=5, seed=7)
    assert one["samples"][0] == r["samples"][0]


@pytest.mark.parametrize("objective", ["mdlm", "d3pm", "ar"])
def test_prompt_keeps_its_prefix(runs, objective):
    r = generate_text(runs[objective], prompt="queen of ", n=4, steps=6, seed=3)
    assert all(s.startswith("queen of ") and len(s) == L for s in r["samples"])
    assert len(set(r["samples"])) > 1  # the rest is drawn per sample


def test_ar_evaluation_is_the_networks_next_token_cross_entropy(runs, text_folder):
    """The AR test figure equals the mean over the test split's windows 0, L, 2L, ... of -log softmax(net([BOS,
    x_<i]))_{x_i}, written out here with the network alone."""
    module, cfg, _, tok = load_text_model(runs["ar"])
    ids = tok.encode(read_split(text_folder, "test"))
    x = ids[: len(ids) // L * L].view(-1, L)  # (W, L)
    inputs = torch.cat([torch.full((len(x), 1), tok.vocab_size), x[:, :-1]], 1)
    with torch.no_grad():
        logp = module.net(inputs).log_softmax(-1)  # (W, L, K)
    nll = -logp.gather(-1, x[..., None]).mean().item()
    result = evaluate_text_checkpoint(runs["ar"], batch_size=5, splits=("test",))
    assert result["test"]["nats_per_token"] == pytest.approx(nll, rel=1e-5)
    assert result["test"]["bits_per_character"] == pytest.approx(nll / math.log(2), rel=1e-5)


def test_the_bound_does_not_depend_on_the_batch_size(runs):
    """The diffusion bound's draws are per window: another batching gives the same estimate."""
    a = evaluate_text_checkpoint(runs["mdlm"], draws=2, batch_size=3, splits=("valid",))["valid"]
    b = evaluate_text_checkpoint(runs["mdlm"], draws=2, batch_size=64, splits=("valid",))["valid"]
    assert a["nats_per_token"] == pytest.approx(b["nats_per_token"], rel=1e-6)


def test_validation_reads_the_validation_split(runs, text_folder, tmp_path):
    """The trainer's validation loss of an ar run is the exact bits per character of the first text.valid_windows
    windows of the validation split (with the EMA weights)."""
    tr = Trainer(text_cfg(text_folder, tmp_path, "ar"), progress=False)
    tok = tr.data.tokenizer
    x = tok.encode(read_split(text_folder, "valid"))[: 8 * L].view(8, L)
    inputs = torch.cat([torch.full((8, 1), tok.vocab_size), x[:, :-1]], 1)
    with torch.no_grad():
        nll = -tr.ema.model(inputs).log_softmax(-1).gather(-1, x[..., None]).mean().item()
    assert tr.validation_loss() == pytest.approx(nll / math.log(2), rel=1e-5)
    tr.close()


def test_an_ar_checkpoint_refuses_to_infill_and_other_samplers(runs, capsys):
    assert main(["generate-text", str(runs["ar"]), "--infill", "the __ of"]) == 2
    assert "autoregressive (ar) model generates left to right and cannot infill" in capsys.readouterr().err
    with pytest.raises(ValueError, match="samples with 'ancestral' only"):
        generate_text(runs["ar"], sampler="remask")
    with pytest.raises(ValueError, match="no blank"):
        generate_text(runs["mdlm"], infill="no blanks here")
    with pytest.raises(ValueError, match="prompt has 30 tokens; the model writes 24"):
        generate_text(runs["mdlm"], prompt="the king " * 3 + "and")


@pytest.mark.parametrize("over,message", [
    (["text.objective=gpt"], "unknown text.objective 'gpt'; allowed values: 'mdlm', 'd3pm', 'ar'"),
    (["text.objective=ar", "model.text_transformer.time_cond=true"],
     "time_cond=True contradicts text.objective='ar'"),
    (["model.text_transformer.mask_token=false"], "mask_token=False contradicts text.objective='mdlm'"),
    (["model.text_transformer.causal=true"], "causal=True contradicts text.objective='mdlm'"),
    (["data.seq_len=64", "model.text_transformer.seq_len=32"], "seq_len=32 contradicts data.seq_len"),
    (["text.objective=d3pm"], "set text.loss.steps to T"),
    (["text.loss.process=uniform"], "text.loss.process='uniform' contradicts text.objective='mdlm'"),
    (["data.tokenizer=word"], "unknown data.tokenizer 'word'; allowed values: 'char', 'byte'"),
    (["text.sample.sampler=greedy"], "unknown text.sample.sampler 'greedy'"),
])
def test_contradictory_text_configs_are_refused(over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["task=text", "model.kind=text_transformer", *over])


def test_a_vocabulary_set_by_hand_is_refused():
    cfg = load_config(None, ["task=text", "model.kind=text_transformer", "model.text_transformer.vocab_size=50"])
    with pytest.raises(ConfigError, match="vocab_size=50 contradicts the char tokeniser.*which has 83 tokens"):
        text_config(cfg, 83)
    assert text_config(cfg, 50).model.text_transformer.vocab_size == 50


def test_the_presets_differ_only_in_the_objective():
    """shakespeare-mdlm and shakespeare-ar load and validate, and once resolved with Shakespeare's 83 characters
    differ only in the name, text.objective and what follows from it (mask token, causal attention)."""
    a, b = (text_config(load_config(n), 83) for n in ("shakespeare-mdlm", "shakespeare-ar"))
    fa, fb = to_dict(a), to_dict(b)
    diff = {k for k in fa if fa[k] != fb[k]}
    assert diff == {"name", "text", "model"}
    assert {k for k in fa["text"] if fa["text"][k] != fb["text"][k]} == {"objective"}
    na, nb = fa["model"]["text_transformer"], fb["model"]["text_transformer"]
    assert {k for k in na if na[k] != nb[k]} == {"mask_token", "causal"}
    assert a.data.dataset == "shakespeare" and a.data.tokenizer == "char" and a.task == "text"


def test_prepare_data_splits_a_text_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHDIFFUSION_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "mine.txt"
    path.write_text("".join(f"line {i} of my text\n" for i in range(300)))
    assert main(["prepare-data", "--dataset", str(path)]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder.startswith(str(tmp_path / "cache" / "text" / "mine-"))
    assert sum(len(read_split(folder, s)) for s in ("train", "valid", "test")) == len(path.read_text())
    assert main(["prepare-data", "--dataset", str(tmp_path / "missing.txt")]) == 2
    assert "allowed values: fashion-mnist, mnist, shakespeare, or the path" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the Python API: load, score
def test_load_gives_a_text_model_that_generates_as_generate_text(runs):
    import torchdiffusion
    from torchdiffusion.app.api import TextModel

    for objective in ("mdlm", "ar"):
        lm = torchdiffusion.load(runs[objective])
        assert isinstance(lm, TextModel) and lm.objective == objective and lm.seq_len == L
        same = generate_text(runs[objective], prompt="queen of ", n=3, steps=6, seed=3)["samples"]
        assert lm.generate(3, prompt="queen of ", steps=6, seed=3) == same
    filled = torchdiffusion.load(runs["mdlm"]).generate(2, infill="the ____ and ___ of _")
    assert all(s[:4] == "the " and s[8:13] == " and " for s in filled)


def test_score_of_an_ar_model_is_the_chain_rule_written_out(runs):
    """score(text) of an ar model: consecutive windows of L characters (the last one shorter), each scored from its
    first character by -sum_i log p(x_i | x_<i), computed here one position at a time with the network."""
    import torchdiffusion

    lm = torchdiffusion.load(runs["ar"])
    text = " ".join(WORDS)[:2 * L + L // 2]  # 2.5 windows
    ids = lm.tokenizer.encode(text)
    total = 0.0
    with torch.no_grad():
        for w in ids.split(L):
            for i in range(len(w)):
                inputs = torch.cat([torch.tensor([lm.tokenizer.vocab_size]), w[:i]])[None]  # [BOS, x_<i]
                total -= lm.module.net(inputs)[0, -1].log_softmax(-1)[w[i]].item()
    r = lm.score(text)
    assert (r["windows"], r["tokens"], r["characters"], r["estimate"]) == (3, len(text), len(text), "exact")
    assert r["bits_per_character"] == pytest.approx(total / len(text) / math.log(2), rel=1e-5)


def test_the_score_of_a_bound_does_not_depend_on_the_batch_size(runs):
    """A diffusion model's score: window i draws from its own generators (seeded by its index), so the windows'
    batching does not change the estimate; more draws change it (it is Monte Carlo)."""
    from torchdiffusion.evaluate.text import score_text

    module, cfg, _, tok = load_text_model(runs["mdlm"])
    text = (" ".join(WORDS) + " ") * 4  # 5 windows and a tail
    a = score_text(module, cfg, tok, text, draws=2, batch_size=2)
    b = score_text(module, cfg, tok, text, draws=2, batch_size=64)
    assert a["windows"] == len(text) // L + 1 and a["estimate"] == "bound"
    assert a["bits_per_character"] == pytest.approx(b["bits_per_character"], rel=1e-9)
    assert score_text(module, cfg, tok, text, draws=3)["bits_per_character"] != a["bits_per_character"]


def test_score_refuses_empty_text_and_unknown_characters(runs):
    import torchdiffusion

    lm = torchdiffusion.load(runs["mdlm"])
    with pytest.raises(ValueError, match="non-empty str"):
        lm.score("")
    with pytest.raises(ValueError, match="characters not in the vocabulary: 'Z'"):
        lm.score("the Z")
    with pytest.raises(ValueError, match="draws must be at least 1"):
        lm.score("the king", draws=0)


def test_the_run_report_shows_text_samples_and_the_evaluation(runs, capsys):
    """`torchdiffusion report` on a text run: the samples of generate-text and every split's bits per character of
    `evaluate --out RUN_DIR/eval_text.json`."""
    run_dir = runs["mdlm"].parent.parent
    assert main(["generate-text", str(runs["mdlm"]), "--n", "2", "--prompt", "queen of ", "--steps", "4"]) == 0
    assert main(["evaluate", str(runs["mdlm"]), "--draws", "1", "--out", str(run_dir / "eval_text.json")]) == 0
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    samples = json.loads((run_dir / "text" / "samples.json").read_text())["samples"]
    assert "<h2>Text samples</h2>" in page and all(s.startswith("queen of ") for s in samples)
    assert all(f"<pre>{s}</pre>" in page for s in samples)
    result = json.loads((run_dir / "eval_text.json").read_text())
    for split in ("test", "valid"):
        assert f"<td>{split}.bits_per_character</td>" in page
        assert f"<td class='num'>{result[split]['bits_per_character']:.6g}</td>" in page
