"""NMT task: loader, download, masking, decoding, BLEU, and a short real training run."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import lightning as L
import pytest
import sacrebleu
import torch

from adashift_pl.data import parallel_text as pt
from adashift_pl.errors import UserError
from adashift_pl.tasks import nmt

TRAIN = [("the cat sat", "con mèo ngồi"), ("the dog ran", "con chó chạy"), ("a cat ran", "một con mèo chạy")]
DEV = [("the cat ran", "con mèo chạy")]
TEST = [("a dog sat", "một con chó ngồi"), ("the cat", "con mèo")]


def write_stanford(d: Path, vocab: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for stem, pairs in (("train", TRAIN), ("tst2012", DEV), ("tst2013", TEST)):
        (d / f"{stem}.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        (d / f"{stem}.vi").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    if vocab:
        (d / "vocab.en").write_text("<unk>\n<s>\n</s>\nthe\ncat\n", encoding="utf-8")
        (d / "vocab.vi").write_text("<unk>\n<s>\n</s>\ncon\nmèo\nchó\n", encoding="utf-8")
    return d


def tiny_model(src_vocab=20, tgt_vocab=24, **kw) -> nmt.Seq2Seq:
    args = dict(embed_dim=8, hidden=16, num_layers=2, encoder="bi", attention="scaled_luong", dropout=0.0,
                input_feeding=True, tie_embeddings="none", init_weight=0.3)
    args.update(kw)
    torch.manual_seed(0)
    return nmt.Seq2Seq(src_vocab, tgt_vocab, **args).eval()


# ---------------------------------------------------------------------------- loading
def test_stanford_layout_with_vocab_files(tmp_path):
    write_stanford(tmp_path / "iwslt15.en-vi")
    dm = nmt.NMTDataModule(source="real", dir=str(tmp_path), batch_size=2, eval_batch_size=2)
    assert dm.data_source == "real"
    dm.setup("fit")
    assert dm.src_vocab.itos[:6] == ["<pad>", "<unk>", "<s>", "</s>", "the", "cat"]
    assert dm.tgt_vocab.encode(["con", "mèo", "ngồi"]) == [4, 5, 1]  # "ngồi" is not in vocab.vi -> <unk>
    assert dm.stats["train_pairs"] == 3 and dm.stats["test_pairs"] == 2
    batches = list(dm.train_dataloader())
    assert sorted(b["src"].shape[0] for b in batches) == [1, 2]
    batch = max(batches, key=lambda b: b["src"].shape[0])
    assert (batch["tgt_in"][:, 0] == dm.tgt_vocab.bos).all()
    # tgt_out is tgt_in shifted left with </s> at each sentence's end
    for k in range(2):
        n = int((batch["tgt_out"][k] != 0).sum())
        assert batch["tgt_out"][k, n - 1] == dm.tgt_vocab.eos
        assert torch.equal(batch["tgt_out"][k, : n - 1], batch["tgt_in"][k, 1:n])
    assert sum(b["src"].shape[0] for b in dm.test_dataloader()) == 2


def test_custom_files_build_vocab(tmp_path):
    d = write_stanford(tmp_path, vocab=False)
    files = {f"{s}_{side}": str(d / f"{stem}.{lang}") for s, stem in (("train", "train"), ("valid", "tst2012"),
             ("test", "tst2013")) for side, lang in (("src", "en"), ("tgt", "vi"))}
    dm = nmt.NMTDataModule(min_freq=2, **files)
    dm.setup()
    assert dm.data_source == "real"
    # min_freq 2 on the training side: "the", "cat", "ran" kept (twice each), "sat"/"dog"/"a" are <unk>
    assert dm.src_vocab.itos[4:] == ["cat", "ran", "the"]
    # train: every source has 3 tokens > max_src_len 2 -> all filtered -> a clear error
    dm2 = nmt.NMTDataModule(max_src_len=3, max_tgt_len=3, max_src_len_eval=2, **files)
    dm2.setup()
    assert dm2.stats["train_filtered"] == 1  # "một con mèo chạy" has 4 target tokens
    assert dm2.stats["test_truncated"] == 1 and dm2.test.src_text[0] == "a dog"
    assert dm2.test.ref_text[0] == "một con chó ngồi"  # references are never truncated
    with pytest.raises(UserError, match="no train pairs left"):
        nmt.NMTDataModule(max_src_len=2, **files).setup()
    with pytest.raises(UserError, match="missing: test_src, test_tgt"):
        nmt.NMTDataModule(**{k: v for k, v in files.items() if not k.startswith("test")})


@pytest.mark.parametrize("case", ["missing", "counts", "empty", "utf8", "vocab_format", "vocab_specials"])
def test_loader_errors_name_file_and_line(tmp_path, case):
    d = write_stanford(tmp_path / "iwslt15.en-vi")
    where = {"missing": "tst2013.vi", "counts": "train.vi", "empty": "train.en:2", "utf8": "tst2012.en:1",
             "vocab_format": "vocab.vi:4", "vocab_specials": "vocab.en"}[case]
    if case == "missing":
        (d / "tst2013.vi").unlink()
    elif case == "counts":
        (d / "train.vi").write_text("a\nb\n", encoding="utf-8")
    elif case == "empty":
        (d / "train.en").write_text("the cat sat\n  \na cat ran\n", encoding="utf-8")
    elif case == "utf8":
        (d / "tst2012.en").write_bytes(b"the \xff cat\n")
    elif case == "vocab_format":
        (d / "vocab.vi").write_text("<unk>\n<s>\n</s>\ncon 12 x\n", encoding="utf-8")
    else:
        (d / "vocab.en").write_text("the\n<unk>\n<s>\n</s>\n", encoding="utf-8")
    dm = nmt.NMTDataModule(source="real" if case != "missing" else "auto", dir=str(tmp_path))
    with pytest.raises(UserError, match=where.replace(".", r"\.")):
        if case == "missing":  # source auto: a partial data set is not "on disk" -> real demanded explicitly
            nmt.NMTDataModule(source="real", dir=str(tmp_path))
        dm.setup()


@pytest.mark.parametrize("bad", [{"max_src_len_eval": 0}, {"batch_size": 0}, {"synthetic_sizes": [10, 0, 5]},
                                 {"empty_lines": "maybe"}, {"source": "somewhere"}])
def test_bad_data_settings_are_user_errors(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        dm = nmt.NMTDataModule(**{"source": "synthetic", **bad})
        dm.setup()


def test_empty_lines_can_be_skipped(tmp_path):
    d = write_stanford(tmp_path / "iwslt15.en-vi")
    (d / "train.en").write_text("the cat sat\n\na cat ran\n", encoding="utf-8")
    dm = nmt.NMTDataModule(source="real", dir=str(tmp_path), empty_lines="skip")
    dm.setup()
    assert dm.stats["train_pairs"] == 2 and dm.stats["empty_skipped"] == 1


# ---------------------------------------------------------------------------- download
@pytest.fixture
def http_dir(tmp_path, serve):
    root = tmp_path / "served"
    write_stanford(root)
    return root, serve({f"/{p.name}": p.read_bytes() for p in root.iterdir()}) + "/"


def test_download_stanford_good_and_bad_checksum(http_dir, tmp_path):
    root, url = http_dir
    table = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in pt.STANFORD_SHA256}
    table["vocab.vi"] = None  # unpinned: downloaded with a warning, digest recorded
    dest = tmp_path / "data" / "iwslt15.en-vi"
    with pytest.warns(UserWarning, match="vocab.vi: no published sha256"):
        pt.download_stanford(dest, base_url=url, sha256=table, progress=False)
    manifest = (dest / "MANIFEST.json").read_text()
    assert hashlib.sha256((root / "vocab.vi").read_bytes()).hexdigest() in manifest
    dm = nmt.NMTDataModule(source="auto", dir=str(tmp_path / "data"))
    assert dm.data_source == "real"
    dm.setup()
    assert dm.stats["train_pairs"] == 3

    bad = dict(table, **{"tst2012.en": "0" * 64})
    dest2 = tmp_path / "other"
    with pytest.raises(UserError, match="checksum mismatch.*tst2012.en"):
        pt.download_stanford(dest2, base_url=url, sha256=bad, progress=False)
    assert not (dest2 / "tst2012.en").exists() and not list(dest2.glob("*.part"))


def test_stanford_table_is_complete():
    assert set(pt.STANFORD_SHA256) == {f"{s}.{l}" for s in ("train", "tst2012", "tst2013", "vocab")
                                       for l in ("en", "vi")}


# ---------------------------------------------------------------------------- model
def _sentence_nll(model, src, src_len, tgt_in, tgt_out):
    logits = model(src, src_len, tgt_in)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt_out, ignore_index=0, reduction="none")
    return nll.sum(1)


def test_padding_does_not_change_the_loss():
    model = tiny_model()
    a_src, a_tgt = [5, 6, 7], [4, 5, 6, 7]
    b_src, b_tgt = [8, 9, 10, 11, 12, 13], [8, 9, 10, 11, 12, 13, 14]
    alone = _sentence_nll(model, torch.tensor([a_src]), torch.tensor([3]), torch.tensor([[2] + a_tgt]),
                          torch.tensor([a_tgt + [3]]))
    split = pt.Split([a_src, b_src], [a_tgt, b_tgt], ["", ""], ["", ""])
    batch = pt.collate(split, [0, 1], pad=0, bos=2, eos=3)
    assert (batch["src"][0, 3:] == 0).all() and (batch["tgt_in"][0, 5:] == 0).all()
    padded = _sentence_nll(model, batch["src"], batch["src_len"], batch["tgt_in"], batch["tgt_out"])
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention,encoder,tie", [("scaled_luong", "bi", "none"), ("general", "uni", "output"),
                                                   ("dot", "uni", "none")])
def test_beam_width_one_is_greedy(attention, encoder, tie):
    model = tiny_model(attention=attention, encoder=encoder, tie_embeddings=tie)
    torch.manual_seed(1)
    src = torch.randint(4, 20, (5, 7))
    src_len = torch.tensor([7, 3, 5, 1, 6])
    src[torch.arange(7) >= src_len.unsqueeze(1)] = 0
    greedy = model.greedy(src, src_len, 12, bos=2, eos=3)
    beam = model.beam_search(src, src_len, 12, bos=2, eos=3, width=1, length_penalty=1.0)
    assert torch.equal(greedy, beam)
    wide = model.beam_search(src, src_len, 12, bos=2, eos=3, width=4, length_penalty=0.0)
    assert wide.shape[0] == 5


def test_beam_search_finds_the_more_likely_sequence():
    """Beam search's best hypothesis is at least as likely as greedy's under the model (length penalty 0)."""
    model = tiny_model()
    torch.manual_seed(2)
    src = torch.randint(4, 20, (6, 5))
    src_len = torch.full((6,), 5)

    def logprob(ids):
        eos_at = [(row == 3).nonzero()[0, 0].item() if (row == 3).any() else len(row) - 1 for row in ids]
        tgt = [row[: n + 1].tolist() for row, n in zip(ids, eos_at)]
        width = max(map(len, tgt))
        out = torch.tensor([t + [0] * (width - len(t)) for t in tgt])
        tin = torch.cat([torch.full((6, 1), 2), out[:, :-1]], 1)
        return -_sentence_nll(model, src, src_len, tin, out)

    greedy = model.greedy(src, src_len, 10, bos=2, eos=3)
    beam = model.beam_search(src, src_len, 10, bos=2, eos=3, width=5, length_penalty=0.0)
    assert (logprob(beam) >= logprob(greedy) - 1e-4).all()


def test_bleu_of_known_strings_matches_sacrebleu():
    hyps = ["the cat sat on the mat", "a dog ran in the big park today", "hello there my friend"]
    refs = ["the cat sat on the red mat", "a dog ran in the park today", "hello there my good friend"]
    score, signature = nmt.corpus_bleu(hyps, refs, tokenize="13a")
    ref_score = sacrebleu.metrics.BLEU().corpus_score(hyps, [refs])
    assert score == pytest.approx(ref_score.score) and "tok:13a" in signature and "nrefs:1" in signature
    # the validation curve (torchmetrics, 0-1) agrees when every n-gram order has a match
    from torchmetrics.text import SacreBLEUScore
    assert 100 * float(SacreBLEUScore(tokenize="13a")(hyps, [[r] for r in refs])) == pytest.approx(score, abs=1e-3)


# IWSLT'15-like text: Moses-tokenized, apostrophes escaped as the &apos; token
APOS_REFS = ["it &apos;s a small world , isn &apos;t it ?", "we don &apos;t know what they &apos;re doing .",
             "that &apos;s the point of the talk ."]
APOS_HYPS = ["it &apos;s a big world , is it ?", "we do not know what they &apos;re making .",
             "this is the point of that talk ."]


def whitespace_bleu(hyps: list[str], refs: list[str], order: int = 4) -> float:
    """Corpus BLEU on whitespace tokens (tensorflow/nmt's scorer), written out from Papineni et al."""
    from collections import Counter

    matches, totals, hyp_len, ref_len = [0] * order, [0] * order, 0, 0
    for h, r in zip(hyps, refs):
        h, r = h.split(), r.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, order + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / order
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_p)


def test_bleu_tokenizer_is_chosen_from_the_data():
    assert nmt.bleu_tokenizer_for("real", False, APOS_REFS)[0] == "none"  # IWSLT'15, Stanford files
    assert nmt.bleu_tokenizer_for("synthetic", False, [])[0] == "none"
    assert nmt.bleu_tokenizer_for("real", True, APOS_REFS)[0] == "none"  # own files, tokenized
    assert nmt.bleu_tokenizer_for("real", True, ["It's a small world, isn't it?"])[0] == "13a"  # detokenized
    # why it matters: 13a splits &apos; into & apos ; and inflates BLEU; none is tensorflow/nmt's number
    none, signature = nmt.corpus_bleu(APOS_HYPS, APOS_REFS, tokenize="none")
    assert none == pytest.approx(whitespace_bleu(APOS_HYPS, APOS_REFS), abs=1e-9) and "tok:none" in signature
    assert nmt.corpus_bleu(APOS_HYPS, APOS_REFS, tokenize="13a")[0] > none + 10  # 34.7 against 23.8
    # on the synthetic pair (punctuation is its own token) the two agree
    src, tgt = pt.synthetic_corpus(50, seed=1)
    refs, hyps = [" ".join(t) for t in tgt], [" ".join(t[:-2] + t[-1:]) for t in tgt]
    assert nmt.corpus_bleu(hyps, refs, "none")[0] == pytest.approx(nmt.corpus_bleu(hyps, refs, "13a")[0])


@pytest.mark.parametrize("setting, expected", [("auto", "none"), ("13a", "13a")])
def test_iwslt_text_is_scored_on_its_own_tokens(tmp_path, one_thread, setting, expected):
    """Stanford-layout files with &apos; tokens: the validation curve (torchmetrics) and the test
    BLEU (sacreBLEU) both use `none`, unless model.bleu_tokenize names a tokenizer."""
    d = write_stanford(tmp_path / "iwslt15.en-vi")
    for stem, refs in (("tst2012", APOS_REFS), ("tst2013", APOS_REFS)):
        (d / f"{stem}.en").write_text("".join("the cat\n" for _ in refs), encoding="utf-8")
        (d / f"{stem}.vi").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    model = dict(embed_dim=8, hidden=8, num_layers=2, encoder="bi", beam_width=2, bleu_tokenize=setting)
    module, dm = nmt.build(model, dict(source="real", dir=str(tmp_path), batch_size=2, eval_batch_size=4),
                           {"name": "adam"}, seed=0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    extra = module.summary_extra()
    assert extra["bleu_tokenize"] == expected and f"tok:{expected}" in extra["bleu_signature"]
    module.val_bleu.reset()
    curve = 100 * float(module.val_bleu(APOS_HYPS, [[r] for r in APOS_REFS]))
    assert curve == pytest.approx(nmt.corpus_bleu(APOS_HYPS, APOS_REFS, expected)[0], abs=1e-3)


def test_vocab_round_trips_through_a_checkpoint():
    module = nmt.NMTModule(optimizer={"name": "adam"}, embed_dim=8, hidden=8, num_layers=1, beam_width=2)
    src_v, tgt_v = pt.Vocab(["a", "b"]), pt.Vocab(["x", "y", "z"])
    module.build_model(src_v, tgt_v)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    again = nmt.NMTModule(**module.hparams)
    again.on_load_checkpoint(ckpt)
    again.load_state_dict(ckpt["state_dict"])
    assert again.tgt_vocab.itos == tgt_v.itos
    module.eval(), again.eval()
    src = torch.tensor([[4, 5, 1]])
    assert again.translate(src, torch.tensor([3]), 2) == module.translate(src, torch.tensor([3]), 2)


# ---------------------------------------------------------------------------- synthetic corpus + training
def test_synthetic_corpus_is_deterministic_and_structured():
    s1, t1 = pt.synthetic_corpus(200, seed=3)
    s2, t2 = pt.synthetic_corpus(200, seed=3)
    assert (s1, t1) == (s2, t2) and pt.synthetic_corpus(200, seed=4)[0] != s1
    pairs = {" ".join(s): " ".join(t) for s, t in zip(s1, t1)}
    # hand-checked facts of the grammar, on sentences built directly
    import random
    rng = random.Random(0)
    for _ in range(50):
        src, tgt = pt.synthetic_pair(rng)
        assert src[-1] == tgt[-1] == "."
        if "not" in src:
            assert "ne" in tgt and "pas" in tgt and tgt.index("pas") == tgt.index("ne") + 2
    assert len(pairs) > 190  # hardly any duplicates


def test_short_training_run_lowers_loss_and_raises_bleu(tmp_path, one_thread):
    torch.manual_seed(0)
    L.seed_everything(0, verbose=False)
    model_cfg = dict(embed_dim=32, hidden=64, num_layers=2, encoder="bi", dropout=0.0, beam_width=2)
    data_cfg = dict(source="synthetic", batch_size=32, eval_batch_size=100, synthetic_sizes=[3000, 100, 100])
    module, dm = nmt.build(model_cfg, data_cfg, {"name": "adam", "lr": 1e-2}, seed=0)
    assert dm.data_source == "synthetic"
    history = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    trainer = L.Trainer(max_steps=240, val_check_interval=80, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=1, gradient_clip_val=5.0, callbacks=[Record()],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    first, last = history[0], history[-1]  # history[0]: the sanity check, before any step
    assert last["val/loss"] < 0.5 * first["val/loss"]
    assert last["val/bleu"] > first["val/bleu"] + 20
    assert module.test_bleu > 20 and module.test_bleu_signature.startswith("nrefs:1")
    extra = module.summary_extra()
    assert extra["test_bleu"] == module.test_bleu and extra["data"]["source"] == "synthetic"


@pytest.mark.parametrize("name", ["nmt.yaml", "nmt_iwslt15.yaml", "nmt_released.yaml"])
def test_configs_build(name):
    """Every NMT config's model/data keys are accepted and every optimizer block builds."""
    import yaml

    from adashift_pl.optim import build_optimizer
    cfg = yaml.safe_load((Path(__file__).parent.parent / "configs" / name).read_text())
    assert cfg["task"] == "nmt"
    for opt_name, block in cfg["optimizer"].items():
        module, dm = nmt.build(cfg["model"], {**cfg["data"], "source": "synthetic"}, {"name": opt_name, **block}, 0)
        module.build_model(pt.Vocab(["a"]), pt.Vocab(["b"]))
        assert isinstance(module.configure_optimizers(), torch.optim.Optimizer)
