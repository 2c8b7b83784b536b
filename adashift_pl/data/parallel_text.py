"""Parallel text for the NMT task: files, vocabularies, the synthetic toy language pair, batches.

Conventions follow tensorflow/nmt (the model of the paper's Figure 7b):
whitespace tokens in and out, vocabulary files with one token a line whose first
three entries are `<unk>`, `<s>`, `</s>`, IWSLT'15 En-Vi in the layout of the
Stanford NMT release (train / tst2012 = dev / tst2013 = test / vocab, `.en` `.vi`).

Every mistake in an input file is a `UserError` naming the file and the line.
"""

from __future__ import annotations

import json
import random
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from adashift_pl.errors import UserError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"

# ----------------------------------------------------------------------------- IWSLT'15 (Stanford layout)
STANFORD_URL = "https://nlp.stanford.edu/projects/nmt/data/iwslt15.en-vi/"
STANFORD_SPLITS = {"train": "train", "valid": "tst2012", "test": "tst2013"}
# sha256 of the Stanford files. train/tst2012/tst2013: the values huggingface/datasets
# records for these URLs (datasets/mt_eng_vietnamese/dataset_infos.json, download_checksums;
# byte sizes there: train.en 13603614, train.vi 18074646, tst2012.en 140250, tst2012.vi 188396,
# tst2013.en 132264, tst2013.vi 183855). The two vocabulary files have no published digest:
# they download unverified with a warning, and the digest of every file fetched is written to
# <dir>/MANIFEST.json -- paste a vocab digest from there into this table to pin it.
STANFORD_SHA256: dict[str, str | None] = {
    "train.en": "c26dfeed74b6bf3752f5ca552f2412456f0de153f7c804df8717931fb3a5c78a",
    "train.vi": "707206edf2dc0280273952c7b70544ea8a1363aa69aaeb9d70514b888dc3067d",
    "tst2012.en": "b8fbcd0d4199d41276421d1f7228298df67dd9e2c5c134c2ee8cdf3ec27801e2",
    "tst2012.vi": "01004078b3f36b0c46e81b65fc6851230b3c823405c76d1d82ef3b786b512ff0",
    "tst2013.en": "3860ce60bc5b85d96cc2d3d580cf1bc9d62440e939c1b964676d3607c4e8f1df",
    "tst2013.vi": "29af16842808da2812b8fd4d47fc05d082ba870e60ab7755090ad04b380994cd",
    "vocab.en": None,
    "vocab.vi": None,
}


def stanford_files(directory: str | Path, src_lang: str, tgt_lang: str) -> dict[str, Path]:
    """Paths of the Stanford-layout files for one direction (keys train_src, ..., vocab_tgt)."""
    d = Path(directory)
    out = {}
    for split, stem in STANFORD_SPLITS.items():
        out[f"{split}_src"] = d / f"{stem}.{src_lang}"
        out[f"{split}_tgt"] = d / f"{stem}.{tgt_lang}"
    out["vocab_src"] = d / f"vocab.{src_lang}"
    out["vocab_tgt"] = d / f"vocab.{tgt_lang}"
    return out


def download_stanford(directory: str | Path, base_url: str = STANFORD_URL,
                      sha256: dict[str, str | None] | None = None, progress: bool = True) -> Path:
    """Fetch the eight Stanford IWSLT'15 En-Vi files into `directory` (each checksummed, atomic).

    Files already there are verified, not fetched again. `<directory>/MANIFEST.json`
    records url, sha256 and size of every file, so an unpinned digest can be checked later.
    """
    from adashift_pl.data.download import download_url, file_digest  # the shared plumbing

    directory = Path(directory)
    table = STANFORD_SHA256 if sha256 is None else sha256
    manifest = {}
    for name, digest in table.items():
        url = base_url.rstrip("/") + "/" + name
        if digest is None:
            warnings.warn(f"{name}: no published sha256, downloading it UNVERIFIED; its digest is recorded in "
                          f"{directory / 'MANIFEST.json'}", stacklevel=2)
        path = download_url(url, directory / name, digest, progress=progress)
        manifest[name] = {"url": url, "sha256": file_digest(path), "pinned": digest is not None,
                          "bytes": path.stat().st_size}
    tmp = directory / "MANIFEST.json.part"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(directory / "MANIFEST.json")
    return directory


# ----------------------------------------------------------------------------- reading files
def read_lines(path: str | Path, *, empty_lines: str = "error") -> list[list[str] | None]:
    """Whitespace-tokenised lines of a UTF-8 file; an empty line is an error or None ("skip")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    out: list[list[str] | None] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{n}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                                f"the NMT reader takes UTF-8 text only") from None
            tokens = line.split()
            if not tokens:
                if empty_lines == "error":
                    raise UserError(f"{path}:{n}: empty line; every line must hold one sentence "
                                    f"(or set --data.empty_lines skip)")
                out.append(None)
            else:
                out.append(tokens)
    return out


def read_parallel(src_path: str | Path, tgt_path: str | Path, *, empty_lines: str = "error"
                  ) -> tuple[list[list[str]], list[list[str]], int]:
    """Sentence pairs of two line-aligned files; returns (src, tgt, number of pairs skipped as empty)."""
    if empty_lines not in ("error", "skip"):
        raise UserError(f"invalid data.empty_lines {empty_lines!r}: allowed are error, skip")
    src = read_lines(src_path, empty_lines=empty_lines)
    tgt = read_lines(tgt_path, empty_lines=empty_lines)
    if len(src) != len(tgt):
        raise UserError(f"line counts differ: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}; "
                        f"source and target must be line-aligned")
    keep = [(s, t) for s, t in zip(src, tgt) if s is not None and t is not None]
    if not keep:
        raise UserError(f"{src_path}: no sentence pairs")
    return [s for s, _ in keep], [t for _, t in keep], len(src) - len(keep)


# ----------------------------------------------------------------------------- vocabulary
class Vocab:
    """Token <-> id. Ids 0..3 are <pad>, <unk>, <s>, </s>; then the tokens in file / frequency order."""

    def __init__(self, tokens: list[str]):
        self.itos = [PAD, UNK, BOS, EOS] + [t for t in tokens if t not in (PAD, UNK, BOS, EOS)]
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.pad, self.unk, self.bos, self.eos = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, self.unk) for t in tokens]

    def decode(self, ids: list[int]) -> list[str]:
        """Tokens up to (not including) the first </s>; <pad>/<s> dropped."""
        out = []
        for i in ids:
            if i == self.eos:
                break
            if i not in (self.pad, self.bos):
                out.append(self.itos[i])
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocab":
        """tensorflow/nmt format: one token a line (an optional integer count after it is ignored).

        The first three tokens must be <unk>, <s>, </s> -- or none of them, in which case
        they are prepended, as tensorflow/nmt's check_vocab does.
        """
        path = Path(path)
        tokens: list[str] = []
        seen: dict[str, int] = {}
        for n, fields in enumerate(read_lines(path, empty_lines="error"), start=1):
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
                raise UserError(f"{path}:{n}: unknown vocab format {' '.join(fields)!r}; expected one token a "
                                f"line (optionally 'token count'), first lines <unk>, <s>, </s>")
            if fields[0] in seen:
                raise UserError(f"{path}:{n}: token {fields[0]!r} repeats line {seen[fields[0]]}")
            seen[fields[0]] = n
            tokens.append(fields[0])
        specials = [UNK, BOS, EOS]
        if tokens[:3] != specials and any(s in seen for s in specials):
            raise UserError(f"{path}: unknown vocab format: the first three tokens must be <unk>, <s>, </s> "
                            f"(found {tokens[:3]})")
        return cls(tokens)

    @classmethod
    def build(cls, sentences: list[list[str]], *, min_freq: int = 1, max_size: int | None = None) -> "Vocab":
        """From training sentences: tokens seen >= min_freq times, most frequent first (ties by token)."""
        counts = Counter(t for s in sentences for t in s)
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls(ranked[:max_size] if max_size else ranked)


# ----------------------------------------------------------------------------- the synthetic language pair
# A toy English-like source and an invented target language with the phenomena a real
# pair has, so that attention and the decoder have something to learn:
#   lexical mapping   every source lemma has one target lemma;
#   agreement         target nouns have a gender (not visible in the source): the
#                     determiner and adjective agree with it and with number; the
#                     verb agrees with the subject's number, also in the past tense,
#                     where the source does not show it;
#   local reordering  adjective after noun; "does not V" -> "ne V pas";
#                     the adverb moves from the end of the sentence to after the verb.
# The lexicon is small on purpose (~60 source / ~80 target types): the default run must
# learn it in 3k steps on a CPU, and max-AdaShift's per-tensor step size (one v for a
# whole embedding matrix) makes rare rows learn slowly -- a Zipfian real vocabulary needs
# the paper's 10k+ steps.
_NOUNS = {  # source singular, plural, target lemma, gender
    "dog": ("dogs", "kano", "m"), "cat": ("cats", "mira", "f"), "bird": ("birds", "pazo", "m"),
    "horse": ("horses", "kaba", "f"), "teacher": ("teachers", "lerno", "m"), "farmer": ("farmers", "bura", "f"),
    "child": ("children", "nino", "m"), "king": ("kings", "rego", "m"), "queen": ("queens", "rega", "f"),
    "doctor": ("doctors", "meda", "f"),
}
_ADJS = {"big": "grand", "small": "pik", "red": "rud", "old": "antik", "young": "jun"}
_VERBS = {  # base, 3rd singular, past, target stem
    "see": ("sees", "saw", "vid"), "like": ("likes", "liked", "am"), "find": ("finds", "found", "trov"),
    "carry": ("carries", "carried", "port"), "follow": ("follows", "followed", "sekv"),
}
_PREPS = {"in": "en", "near": "apud", "with": "kun"}
_ADVS = {"today": "hodie", "often": "ofte", "again": "denove"}
# source determiner -> target form by (gender, number); number restricts which source word fits
_DETS = {"the": ({"m": "lo", "f": "la", "pl": "los"}, ("sg", "pl")), "a": ({"m": "un", "f": "una"}, ("sg",)),
         "some": ({"pl": "kelk"}, ("pl",)), "this": ({"m": "ci", "f": "cia"}, ("sg",)),
         "these": ({"pl": "cios"}, ("pl",)), "my": ({"m": "mio", "f": "mia", "pl": "mios"}, ("sg", "pl"))}


def _noun_phrase(rng: random.Random) -> tuple[list[str], list[str], str]:
    """(source tokens, target tokens, number) of a determiner (adjective) noun phrase."""
    noun = rng.choice(sorted(_NOUNS))
    plural_src, lemma, gender = _NOUNS[noun]
    number = rng.choice(("sg", "pl"))
    det = rng.choice([d for d, (_, nums) in _DETS.items() if number in nums])
    forms = _DETS[det][0]
    t_det = forms["pl"] if number == "pl" else forms[gender]
    src = [det]
    tgt = [t_det, lemma + ("j" if number == "pl" else "")]
    if rng.random() < 0.5:
        adj = rng.choice(sorted(_ADJS))
        src.append(adj)
        tgt.append(_ADJS[adj] + ("i" if number == "pl" else "o" if gender == "m" else "a"))
    src.append(plural_src if number == "pl" else noun)
    return src, tgt, number


def synthetic_pair(rng: random.Random) -> tuple[list[str], list[str]]:
    """One sentence pair: S V O [PP] [ADV] . with negation / tense / number / gender."""
    s_src, s_tgt, number = _noun_phrase(rng)
    o_src, o_tgt, _ = _noun_phrase(rng)
    verb = rng.choice(sorted(_VERBS))
    third, past, stem = _VERBS[verb]
    tense = rng.choice(("pres", "past"))
    negate = rng.random() < 0.3
    t_verb = stem + {("pres", "sg"): "as", ("pres", "pl"): "an", ("past", "sg"): "is", ("past", "pl"): "in"}[
        (tense, number)]
    if negate:
        aux = ("does" if number == "sg" else "do") if tense == "pres" else "did"
        v_src, v_tgt = [aux, "not", verb], ["ne", t_verb, "pas"]
    else:
        v_src = [(third if number == "sg" else verb) if tense == "pres" else past]
        v_tgt = [t_verb]
    src, tgt = s_src + v_src + o_src, s_tgt + v_tgt
    adv = rng.choice(sorted(_ADVS)) if rng.random() < 0.4 else None
    if adv:
        tgt.append(_ADVS[adv])
    tgt += o_tgt
    if rng.random() < 0.4:
        prep = rng.choice(sorted(_PREPS))
        p_src, p_tgt, _ = _noun_phrase(rng)
        src += [prep] + p_src
        tgt += [_PREPS[prep]] + p_tgt
    if adv:
        src.append(adv)
    return src + ["."], tgt + ["."]


def synthetic_corpus(n: int, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """n deterministic sentence pairs (same seed, same corpus, on every machine)."""
    rng = random.Random(seed)
    pairs = [synthetic_pair(rng) for _ in range(n)]
    return [s for s, _ in pairs], [t for _, t in pairs]


# ----------------------------------------------------------------------------- examples and batches
@dataclass
class Split:
    """One split in ids, plus the reference text (untruncated) for BLEU."""
    src: list[list[int]]
    tgt: list[list[int]]
    src_text: list[str]
    ref_text: list[str]


def make_split(src: list[list[str]], tgt: list[list[str]], src_vocab: Vocab, tgt_vocab: Vocab, *,
               max_src_len: int | None, max_tgt_len: int | None, train: bool, name: str) -> tuple[Split, int]:
    """Encode a split. Training: pairs over the length limits are dropped. Evaluation: the
    source is truncated to max_src_len (the reference is kept whole, for BLEU); no pair is lost.
    Returns the split and how many pairs were filtered (train) or truncated (eval)."""
    out = Split([], [], [], [])
    affected = 0
    for s, t in zip(src, tgt):
        too_long = (max_src_len and len(s) > max_src_len) or (train and max_tgt_len and len(t) > max_tgt_len)
        if too_long:
            affected += 1
            if train:
                continue
            s = s[:max_src_len]
        out.src.append(src_vocab.encode(s))
        out.tgt.append(tgt_vocab.encode(t[:max_tgt_len] if (train and max_tgt_len) else t))
        out.src_text.append(" ".join(s))
        out.ref_text.append(" ".join(t))
    if affected:
        what = "filtered out (longer than the training limit)" if train else "truncated to data.max_src_len_eval"
        print(f"nmt data: {affected} of {len(src)} {name} pairs {what}", file=sys.stderr, flush=True)
    if not out.src:
        raise UserError(f"no {name} pairs left after the length filter (max_src_len={max_src_len}, "
                        f"max_tgt_len={max_tgt_len}); raise the limits")
    return out, affected


def collate(split: Split, indices: list[int], pad: int, bos: int, eos: int) -> dict[str, torch.Tensor]:
    """Pad one batch: src (B,S), src_len (B,), tgt_in = <s> y (B,T), tgt_out = y </s> (B,T), index (B,)."""
    src = [split.src[i] for i in indices]
    tgt = [split.tgt[i] for i in indices]
    b, s_max, t_max = len(indices), max(map(len, src)), max(map(len, tgt)) + 1
    src_t = torch.full((b, s_max), pad, dtype=torch.long)
    tin = torch.full((b, t_max), pad, dtype=torch.long)
    tout = torch.full((b, t_max), pad, dtype=torch.long)
    for k, (s, t) in enumerate(zip(src, tgt)):
        src_t[k, : len(s)] = torch.tensor(s, dtype=torch.long)
        tin[k, : len(t) + 1] = torch.tensor([bos] + t, dtype=torch.long)
        tout[k, : len(t) + 1] = torch.tensor(t + [eos], dtype=torch.long)
    return {"src": src_t, "src_len": torch.tensor([len(s) for s in src]), "tgt_in": tin, "tgt_out": tout,
            "index": torch.tensor(indices)}


class LengthGroupedBatches(Dataset):
    """A data set whose items are whole batches of similar-length pairs (low padding).

    Pairs are sorted by (source, target) length -- for training after a seeded shuffle
    so equal lengths mix -- and cut into batches of `batch_size`; the batches are the
    same in every epoch. The training DataLoader (batch_size=None, a ResumableSampler)
    shuffles their *order* per epoch, resumes mid-epoch, and under DDP hands each rank
    different batches, as DistributedSampler would single items.
    """

    def __init__(self, split: Split, batch_size: int, vocab: Vocab, *, seed: int = 0, shuffle: bool = True):
        order = list(range(len(split.src)))
        if shuffle:
            random.Random(seed).shuffle(order)
        order.sort(key=lambda i: (len(split.src[i]), len(split.tgt[i])))
        self.batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        self.split, self.vocab = split, vocab

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        v = self.vocab
        return collate(self.split, self.batches[k], v.pad, v.bos, v.eos)
