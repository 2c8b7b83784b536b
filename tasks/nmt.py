"""Neural machine translation: LSTM encoder-decoder with Luong attention, BLEU (paper Figure 7b / 15).

The model of tensorflow/nmt's IWSLT'15 En-Vi recipe (Luong et al., 2017), which the
paper trains with Adam, AMSGrad and AdaShift (Table 8): embeddings, an LSTM encoder
(uni- or bi-directional), an LSTM decoder with Luong attention and input feeding,
teacher forcing with padding masked out of the loss, greedy decoding for validation
BLEU and beam search for the test BLEU.

The layers are created in `setup()`, once the DataModule has read the vocabularies
(which may only be downloaded in `prepare_data`); the vocabularies are stored in
every checkpoint so a checkpoint can translate on its own.
"""

from __future__ import annotations

import math
import re
import sys

import lightning as L
import sacrebleu
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.text import SacreBLEUScore

from adashift_pl.data import parallel_text as pt
from adashift_pl.data.resumable import ResumableDataModule, keyed_seed
from adashift_pl.data.source import resolve_source
from adashift_pl.errors import UserError
from adashift_pl.optim import build_optimizer

DESCRIPTION = "LSTM encoder-decoder + Luong attention, IWSLT'15 En-Vi (or synthetic pair), BLEU (Fig. 7b, Table 8)"
MONITOR = ("val/bleu", "max")
ATTENTIONS = ("general", "scaled_luong", "dot")


# ============================================================================ model
class Encoder(nn.Module):
    """Embedding + LSTM. "bi" follows tensorflow/nmt: layers/2 bi-directional layers of `hidden`
    units per direction, whose final states (fw0, bw0, fw1, bw1, ...) start the decoder's `layers` layers."""

    def __init__(self, embed: nn.Embedding, hidden: int, layers: int, bidirectional: bool, dropout: float):
        super().__init__()
        if bidirectional and layers % 2:
            raise UserError(f"invalid model.num_layers {layers} with a bi-directional encoder: must be even "
                            f"(layers/2 bi-directional layers, as in tensorflow/nmt)")
        n = layers // 2 if bidirectional else layers
        self.embed, self.drop = embed, nn.Dropout(dropout)
        self.rnn = nn.LSTM(embed.embedding_dim, hidden, n, batch_first=True, bidirectional=bidirectional,
                           dropout=dropout if n > 1 else 0.0)
        self.out_dim = hidden * (2 if bidirectional else 1)

    def forward(self, src, src_len):
        x = self.drop(self.embed(src))
        packed = pack_padded_sequence(x, src_len.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        return out, state  # state: (layers, B, hidden) each


class LuongAttention(nn.Module):
    """score(h_t, h_s) = h_t . W h_s ("general"), g * h_t . W h_s ("scaled_luong", g learned, init 1),
    h_t . h_s ("dot"). Padding positions get zero weight."""

    def __init__(self, query_dim: int, memory_dim: int, kind: str):
        super().__init__()
        if kind not in ATTENTIONS:
            raise UserError(f"invalid model.attention {kind!r}: allowed are {', '.join(ATTENTIONS)}")
        if kind == "dot" and query_dim != memory_dim:
            raise UserError(f"model.attention 'dot' needs equal decoder and encoder output sizes "
                            f"({query_dim} != {memory_dim}); use 'general'")
        self.kind = kind
        self.memory_layer = nn.Identity() if kind == "dot" else nn.Linear(memory_dim, query_dim, bias=False)
        self.scale = nn.Parameter(torch.ones(())) if kind == "scaled_luong" else None

    def forward(self, query, keys, memory, mask):
        scores = torch.bmm(keys, query.unsqueeze(2)).squeeze(2)  # (B, S)
        if self.scale is not None:
            scores = self.scale * scores
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return torch.bmm(weights.unsqueeze(1), memory).squeeze(1), weights


class Seq2Seq(nn.Module):
    def __init__(self, src_vocab: int, tgt_vocab: int, *, embed_dim: int, hidden: int, num_layers: int,
                 encoder: str, attention: str, dropout: float, input_feeding: bool, tie_embeddings: str,
                 init_weight: float):
        super().__init__()
        if encoder not in ("uni", "bi"):
            raise UserError(f"invalid model.encoder {encoder!r}: allowed are uni, bi")
        if tie_embeddings not in ("none", "output", "all"):
            raise UserError(f"invalid model.tie_embeddings {tie_embeddings!r}: allowed are none, output "
                            f"(target embedding = softmax weights), all (also shared with the source; "
                            f"needs data.share_vocab true)")
        if tie_embeddings == "all" and src_vocab != tgt_vocab:
            raise UserError("model.tie_embeddings 'all' shares one embedding between source and target: "
                            "set data.share_vocab true")
        self.tgt_embed = nn.Embedding(tgt_vocab, embed_dim, padding_idx=0)
        src_embed = self.tgt_embed if tie_embeddings == "all" else nn.Embedding(src_vocab, embed_dim, padding_idx=0)
        self.encoder = Encoder(src_embed, hidden, num_layers, encoder == "bi", dropout)
        self.input_feeding, self.hidden = input_feeding, hidden
        self.rnn = nn.LSTM(embed_dim + (hidden if input_feeding else 0), hidden, num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.attention = LuongAttention(hidden, self.encoder.out_dim, attention)
        self.attention_layer = nn.Linear(hidden + self.encoder.out_dim, hidden, bias=False)  # h~ = tanh(W[h;c])
        self.drop = nn.Dropout(dropout)
        self.bridge = nn.Linear(hidden, embed_dim, bias=False) if tie_embeddings != "none" else nn.Identity()
        self.output = nn.Linear(embed_dim if tie_embeddings != "none" else hidden, tgt_vocab, bias=False)
        if init_weight > 0:  # tensorflow/nmt: uniform(-0.1, 0.1) for every variable
            for p in self.parameters():
                nn.init.uniform_(p, -init_weight, init_weight)
        for rnn in (self.encoder.rnn, self.rnn):  # forget-gate bias 1.0, as tf's BasicLSTMCell
            for name, p in rnn.named_parameters():
                if name.startswith("bias_ih"):
                    with torch.no_grad():
                        p[rnn.hidden_size: 2 * rnn.hidden_size].fill_(1.0)
        if tie_embeddings != "none":
            self.output.weight = self.tgt_embed.weight
        with torch.no_grad():
            self.tgt_embed.weight[0].zero_()
            self.encoder.embed.weight[0].zero_()

    def encode(self, src, src_len):
        memory, state = self.encoder(src, src_len)
        return {"memory": memory, "keys": self.attention.memory_layer(memory),
                "mask": src != 0, "state": state}

    def step(self, y_prev, state, feed, enc):
        """One decoder step: previous token (B,) -> attentional hidden h~ (B, hidden)."""
        x = self.drop(self.tgt_embed(y_prev))
        if self.input_feeding:
            x = torch.cat([x, feed], dim=-1)
        out, state = self.rnn(x.unsqueeze(1), state)
        out = out.squeeze(1)
        context, _ = self.attention(out, enc["keys"], enc["memory"], enc["mask"])
        return torch.tanh(self.attention_layer(torch.cat([out, context], dim=-1))), state

    def logits(self, attn_h):
        return self.output(self.bridge(self.drop(attn_h)))

    def forward(self, src, src_len, tgt_in):
        """Teacher forcing: logits (B, T, V) for every target position."""
        enc = self.encode(src, src_len)
        state, feed = enc["state"], src.new_zeros(src.size(0), self.hidden, dtype=enc["memory"].dtype)
        outs = []
        for t in range(tgt_in.size(1)):
            feed, state = self.step(tgt_in[:, t], state, feed, enc)
            outs.append(feed)
        return self.logits(torch.stack(outs, dim=1))

    @torch.no_grad()
    def greedy(self, src, src_len, max_len: int, bos: int, eos: int):
        enc = self.encode(src, src_len)
        state, feed = enc["state"], enc["memory"].new_zeros(src.size(0), self.hidden)
        y = src.new_full((src.size(0),), bos)
        done = torch.zeros_like(y, dtype=torch.bool)
        out = []
        for _ in range(max_len):
            feed, state = self.step(y, state, feed, enc)
            y = self.logits(feed).argmax(-1).masked_fill(done, eos)
            out.append(y)
            done |= y == eos
            if done.all():
                break
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def beam_search(self, src, src_len, max_len: int, bos: int, eos: int, width: int, length_penalty: float):
        """Batched beam search; hypotheses ranked by log p / ((5 + len) / 6) ** length_penalty (GNMT,
        as tensorflow/nmt). A finished hypothesis keeps its score and length. Width 1 is greedy."""
        b, k = src.size(0), width
        enc = self.encode(src, src_len)
        rep = lambda x, dim=0: x.repeat_interleave(k, dim=dim)  # noqa: E731
        enc = {"memory": rep(enc["memory"]), "keys": rep(enc["keys"]), "mask": rep(enc["mask"]),
               "state": tuple(rep(s, 1) for s in enc["state"])}
        state, feed = enc["state"], enc["memory"].new_zeros(b * k, self.hidden)
        y = src.new_full((b * k,), bos)
        scores = enc["memory"].new_full((b, k), float("-inf"))
        scores[:, 0] = 0.0
        lengths = torch.zeros_like(scores)
        done = torch.zeros(b, k, dtype=torch.bool, device=src.device)
        hist = src.new_zeros(b, k, 0)
        lp = lambda n: ((5.0 + n) / 6.0) ** length_penalty  # noqa: E731
        offset = torch.arange(b, device=src.device).unsqueeze(1) * k
        for _ in range(max_len):
            feed, state = self.step(y, state, feed, enc)
            logp = torch.log_softmax(self.logits(feed).float(), dim=-1).view(b, k, -1)
            v = logp.size(-1)
            only_eos = torch.full_like(logp[0, 0], float("-inf"))
            only_eos[eos] = 0.0
            logp = torch.where(done.unsqueeze(-1), only_eos, logp)
            cand = scores.unsqueeze(-1) + logp
            cand_len = (lengths + (~done).float()).unsqueeze(-1)
            _, idx = (cand / lp(cand_len)).view(b, -1).topk(k, dim=-1)
            origin, token = idx // v, idx % v
            scores = cand.view(b, -1).gather(1, idx)
            prev_done = done.gather(1, origin)
            lengths = lengths.gather(1, origin) + (~prev_done).float()
            done = prev_done | (token == eos)
            hist = torch.cat([hist.gather(1, origin.unsqueeze(-1).expand(-1, -1, hist.size(2))),
                              token.unsqueeze(-1)], dim=2)
            flat = (origin + offset).view(-1)
            state = tuple(s[:, flat] for s in state)
            feed, y = feed[flat], token.view(-1)
            if done.all():
                break
        best = (scores / lp(lengths)).argmax(dim=1)
        return hist[torch.arange(b, device=src.device), best]


# ============================================================================ LightningModule
def corpus_bleu(hyps: list[str], refs: list[str], tokenize: str = "13a") -> tuple[float, str]:
    """sacreBLEU corpus BLEU (0-100) of hypotheses against one reference each, and its signature."""
    # force: our text is whitespace-tokenized by design; sacreBLEU would warn "forgot to detokenize"
    bleu = sacrebleu.metrics.BLEU(tokenize=tokenize, force=True)
    return bleu.corpus_score(hyps, [refs]).score, str(bleu.get_signature())


# The escapes of the Moses tokenizer (&apos; for ', &quot; for ", ...): text that has them was tokenized.
MOSES_ESCAPE = re.compile(r"&(?:apos|quot|amp|lt|gt|#91|#93|#124);")


def bleu_tokenizer_for(data_source: str, own_files: bool, refs: list[str]) -> tuple[str, str]:
    """The sacreBLEU tokenizer that fits the data (model.bleu_tokenize: auto), and why.

    The model reads and writes whitespace tokens of the corpus, so BLEU must not tokenize text
    that is tokenized already: 13a splits IWSLT's `&apos;` into `& apos ;`, three extra matching
    tokens per apostrophe, and inflates BLEU (the toy case of tests/test_nmt.py: 23.8 with `none`,
    the whitespace-token BLEU tensorflow/nmt's scorer computes, against 34.7 with 13a).
    Detokenized text of one's own is what 13a is for."""
    if data_source == "synthetic":
        return "none", "the synthetic pair is whitespace-tokenized by construction (13a gives the same here)"
    if not own_files:
        return "none", "IWSLT'15 (Stanford files) is tokenized and Moses-escaped; tensorflow/nmt splits on spaces"
    if any(MOSES_ESCAPE.search(r) for r in refs):
        return "none", "the references carry Moses escapes (&apos; ...): tokenized text"
    return "13a", "the references look detokenized (no Moses escapes): sacreBLEU's standard 13a"



class NMTModule(L.LightningModule):
    def __init__(self, optimizer: dict, *, embed_dim: int = 512, hidden: int = 512, num_layers: int = 2,
                 encoder: str = "uni", attention: str = "scaled_luong", dropout: float = 0.2,
                 input_feeding: bool = True, tie_embeddings: str = "none", init_weight: float = 0.1,
                 beam_width: int = 10, length_penalty: float = 0.0, val_beam_width: int = 1,
                 max_decode_len: int = 100, decode_len_ratio: float = 2.0, bleu_tokenize: str = "auto",
                 num_examples: int = 3, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        if bleu_tokenize != "auto" and bleu_tokenize not in sacrebleu.metrics.BLEU.TOKENIZERS:
            raise UserError(f"invalid model.bleu_tokenize {bleu_tokenize!r}: allowed are auto (from the data), "
                            f"{', '.join(sacrebleu.metrics.BLEU.TOKENIZERS)}")
        for name in ("embed_dim", "hidden", "num_layers", "beam_width", "val_beam_width", "max_decode_len"):
            value = getattr(self.hparams, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"invalid model.{name} {value!r}: allowed is an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"invalid model.dropout {dropout!r}: allowed is 0 <= dropout < 1")
        self.model: Seq2Seq | None = None
        self.src_vocab = self.tgt_vocab = None
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()
        # auto: chosen in setup(), once the data is known (bleu_tokenizer_for); a given one always wins
        self.bleu_tokenize = None if bleu_tokenize == "auto" else bleu_tokenize
        self.bleu_tokenize_why = None if bleu_tokenize == "auto" else "set by model.bleu_tokenize"
        self.val_bleu = SacreBLEUScore(tokenize=bleu_tokenize) if self.bleu_tokenize else None
        self.test_bleu: float | None = None
        self.test_bleu_signature: str | None = None
        self._outputs: dict[int, tuple[str, str, str]] = {}

    # --- building (after the vocabularies are known)
    def build_model(self, src_vocab: pt.Vocab, tgt_vocab: pt.Vocab) -> None:
        if self.model is not None:
            return
        h = self.hparams
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.model = Seq2Seq(len(src_vocab), len(tgt_vocab), embed_dim=h.embed_dim, hidden=h.hidden,
                             num_layers=h.num_layers, encoder=h.encoder, attention=h.attention, dropout=h.dropout,
                             input_feeding=h.input_feeding, tie_embeddings=h.tie_embeddings,
                             init_weight=h.init_weight)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.model is None and dm is not None:
            self.build_model(dm.src_vocab, dm.tgt_vocab)
        if self.bleu_tokenize is None and dm is not None:
            self.bleu_tokenize, self.bleu_tokenize_why = bleu_tokenizer_for(
                dm.data_source, bool(dm.hparams.train_src), dm.valid.ref_text + dm.test.ref_text)
            self.val_bleu = SacreBLEUScore(tokenize=self.bleu_tokenize)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nmt_vocab"] = {"src": self.src_vocab.itos, "tgt": self.tgt_vocab.itos}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.model is None:  # NMTModule.load_from_checkpoint(...) without a DataModule
            v = checkpoint["nmt_vocab"]
            self.build_model(pt.Vocab(v["src"]), pt.Vocab(v["tgt"]))

    def configure_optimizers(self):
        return build_optimizer(params=self, **self.hparams.optimizer)

    # --- training
    def token_nll(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross entropy over the real (non-padding) target tokens, and their count."""
        logits = self.model(batch["src"], batch["src_len"], batch["tgt_in"])
        target = batch["tgt_out"]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=0)
        return loss, (target != 0).sum()

    def on_train_batch_start(self, batch, batch_idx):
        # Dropout masks are a function of (seed, rank, step), not of an RNG's history: a resumed run
        # draws the masks the uninterrupted run drew (nothing else trains from torch's global RNG).
        torch.manual_seed(keyed_seed(self.hparams.seed, self.global_rank, self.global_step))

    def training_step(self, batch, batch_idx):
        loss, _ = self.token_nll(batch)
        bs = batch["src"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    # --- decoding
    def translate(self, src, src_len, beam_width: int) -> list[str]:
        max_len = min(self.hparams.max_decode_len, math.ceil(self.hparams.decode_len_ratio * int(src_len.max())))
        v = self.tgt_vocab
        if beam_width == 1:
            ids = self.model.greedy(src, src_len, max(max_len, 1), v.bos, v.eos)
        else:
            ids = self.model.beam_search(src, src_len, max(max_len, 1), v.bos, v.eos, beam_width,
                                         self.hparams.length_penalty)
        return [" ".join(v.decode(row)) for row in ids.tolist()]

    def _eval_step(self, batch, split: pt.Split, nll: MeanMetric, beam_width: int):
        loss, ntok = self.token_nll(batch)
        nll.update(loss, weight=ntok)
        hyps = self.translate(batch["src"], batch["src_len"], beam_width)
        idx = batch["index"].tolist()
        for i, hyp in zip(idx, hyps):
            self._outputs[i] = (split.src_text[i], split.ref_text[i], hyp)
        return hyps, [split.ref_text[i] for i in idx]

    def validation_step(self, batch, batch_idx):
        hyps, refs = self._eval_step(batch, self.trainer.datamodule.valid, self.val_nll, self.hparams.val_beam_width)
        self.val_bleu.update(hyps, [[r] for r in refs])

    def on_validation_epoch_end(self):
        loss = self.val_nll.compute()
        # the metrics synced themselves (identical on every rank); sync_dist only silences Lightning's DDP hint
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss), "val/bleu": 100 * self.val_bleu.compute()},
                      sync_dist=True)
        self.val_nll.reset()
        self.val_bleu.reset()
        self._log_examples("val/examples")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.trainer.datamodule.test, self.test_nll, self.hparams.beam_width)

    def on_test_epoch_end(self):
        """Corpus BLEU of the whole decoded test set with sacrebleu, on one process: under DDP the
        outputs of all ranks are gathered (and the DistributedSampler's duplicates dropped) first."""
        loss = self.test_nll.compute()
        outputs = dict(self._outputs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, outputs)
            outputs = {i: o for part in parts for i, o in part.items()}
        order = sorted(outputs)
        self.test_bleu, self.test_bleu_signature = corpus_bleu(
            [outputs[i][2] for i in order], [outputs[i][1] for i in order], self.bleu_tokenize)
        self.log_dict({"test/loss": loss, "test/ppl": torch.exp(loss), "test/bleu": self.test_bleu}, sync_dist=True)
        self.test_nll.reset()
        self._log_examples("test/examples")
        if self.trainer.is_global_zero:
            print(f"nmt test: BLEU {self.test_bleu:.2f} on {len(order)} sentences (beam {self.hparams.beam_width})"
                  f"  [{self.test_bleu_signature}]", file=sys.stderr, flush=True)

    def _log_examples(self, tag: str):
        shown = [self._outputs[i] for i in sorted(self._outputs)[: self.hparams.num_examples]]
        self._outputs = {}
        experiment = getattr(self.logger, "experiment", None)
        if not shown or not self.trainer.is_global_zero or not hasattr(experiment, "add_text"):
            return
        text = "\n\n".join(f"**src** {s}  \n**ref** {r}  \n**hyp** {h}" for s, r, h in shown)
        experiment.add_text(tag, text, global_step=self.global_step)

    def on_validation_epoch_start(self):
        self._outputs = {}

    def on_test_epoch_start(self):
        self._outputs = {}

    def summary_extra(self) -> dict:
        """Task-specific entries for summary.json["extra"] (train.py merges them)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return {"test_bleu": self.test_bleu, "bleu_signature": self.test_bleu_signature,
                "bleu_tokenize": self.bleu_tokenize, "bleu_tokenize_why": self.bleu_tokenize_why,
                "beam_width": self.hparams.beam_width, "length_penalty": self.hparams.length_penalty,
                "data": dict(dm.stats) if dm is not None else None}


# ============================================================================ DataModule
class NMTDataModule(ResumableDataModule):
    """IWSLT'15 En-Vi (Stanford layout under <dir>/iwslt15.en-vi), any parallel corpus given as
    files, or the built-in synthetic language pair."""

    SUBDIR = "iwslt15.en-vi"

    def __init__(self, *, source: str = "auto", dir: str = "data", download: bool = False, src_lang: str = "en",
                 tgt_lang: str = "vi", train_src: str | None = None, train_tgt: str | None = None,
                 valid_src: str | None = None, valid_tgt: str | None = None, test_src: str | None = None,
                 test_tgt: str | None = None, vocab_src: str | None = None, vocab_tgt: str | None = None,
                 use_vocab_files: bool = True, min_freq: int = 1, max_vocab_size: int | None = None,
                 share_vocab: bool = False, max_src_len: int | None = 50, max_tgt_len: int | None = 50,
                 max_src_len_eval: int | None = None, empty_lines: str = "error", batch_size: int = 128,
                 eval_batch_size: int = 64, num_workers: int = 0, synthetic_sizes: tuple = (20000, 500, 500),
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        positive = dict(max_src_len=max_src_len, max_tgt_len=max_tgt_len, max_src_len_eval=max_src_len_eval,
                        max_vocab_size=max_vocab_size, min_freq=min_freq, batch_size=batch_size,
                        eval_batch_size=eval_batch_size)
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"invalid data.{name} {value!r}: allowed is an integer >= 1"
                                + ("" if name in ("min_freq", "batch_size", "eval_batch_size") else ", or null"))
        if empty_lines not in ("error", "skip"):
            raise UserError(f"invalid data.empty_lines {empty_lines!r}: allowed are error, skip")
        if len(synthetic_sizes) != 3 or any(not isinstance(n, int) or n < 1 for n in synthetic_sizes):
            raise UserError(f"invalid data.synthetic_sizes {synthetic_sizes!r}: allowed is [train, valid, test], "
                            f"three integers >= 1")
        files = dict(train_src=train_src, train_tgt=train_tgt, valid_src=valid_src, valid_tgt=valid_tgt,
                     test_src=test_src, test_tgt=test_tgt)
        given = {k: v for k, v in files.items() if v}
        self.stanford_dir = pt.Path(dir) / self.SUBDIR
        if given:  # a corpus of the user's own: all six files, no fallback
            missing = sorted(set(files) - set(given))
            if missing:
                raise UserError(f"a custom parallel corpus needs all of data.train_src/train_tgt/valid_src/"
                                f"valid_tgt/test_src/test_tgt; missing: {', '.join(missing)}")
            if source == "synthetic":
                raise UserError("data.source synthetic conflicts with the corpus files given (data.train_src, ...)")
            self.files = {k: pt.Path(v) for k, v in given.items()}
            self.files.update(vocab_src=vocab_src and pt.Path(vocab_src), vocab_tgt=vocab_tgt and pt.Path(vocab_tgt))
            self.data_source = "real"
        else:
            self.files = pt.stanford_files(self.stanford_dir, src_lang, tgt_lang)
            if not use_vocab_files:
                self.files.update(vocab_src=None, vocab_tgt=None)
            if vocab_src or vocab_tgt:
                self.files.update(vocab_src=vocab_src and pt.Path(vocab_src),
                                  vocab_tgt=vocab_tgt and pt.Path(vocab_tgt))
            missing = [p.name for p in self.files.values() if p is not None and not p.is_file()]
            where = f"{self.stanford_dir} (missing: {', '.join(missing)})" if missing else str(self.stanford_dir)
            self.data_source = resolve_source(source, available=not missing, dataset="IWSLT'15 En-Vi",
                                              expected=where, download=download)
            if self.data_source == "real" and {src_lang, tgt_lang} != {"en", "vi"}:
                raise UserError(f"IWSLT'15 has languages en and vi, not {src_lang!r}/{tgt_lang!r}")
        self.src_vocab = self.tgt_vocab = None
        self.stats: dict = {"source": self.data_source}

    def prepare_data(self):
        h = self.hparams
        if self.data_source == "real" and h.download and not h.train_src:
            pt.download_stanford(self.stanford_dir)

    def setup(self, stage: str | None = None):
        if self.src_vocab is not None:
            return
        h = self.hparams
        if self.data_source == "synthetic":
            n_train, n_valid, n_test = (int(x) for x in h.synthetic_sizes)
            src, tgt = pt.synthetic_corpus(n_train + n_valid + n_test, seed=h.seed)
            cut = (0, n_train, n_train + n_valid, n_train + n_valid + n_test)
            raw = {s: (src[a:b], tgt[a:b]) for s, a, b in zip(("train", "valid", "test"), cut, cut[1:])}
            skipped = 0
        else:
            raw, skipped = {}, 0
            for s in ("train", "valid", "test"):
                a, b, n = pt.read_parallel(self.files[f"{s}_src"], self.files[f"{s}_tgt"], empty_lines=h.empty_lines)
                raw[s], skipped = (a, b), skipped + n
        self.src_vocab, self.tgt_vocab = self._vocabularies(raw["train"])
        limits = dict(max_src_len=h.max_src_len, max_tgt_len=h.max_tgt_len)
        self.train, filtered = pt.make_split(*raw["train"], self.src_vocab, self.tgt_vocab, train=True,
                                             name="train", **limits)
        evl = dict(max_src_len=h.max_src_len_eval, max_tgt_len=None, train=False)
        self.valid, trunc_v = pt.make_split(*raw["valid"], self.src_vocab, self.tgt_vocab, name="valid", **evl)
        self.test, trunc_t = pt.make_split(*raw["test"], self.src_vocab, self.tgt_vocab, name="test", **evl)
        self.stats.update(train_pairs=len(self.train.src), train_filtered=filtered, empty_skipped=skipped,
                          valid_pairs=len(self.valid.src), test_pairs=len(self.test.src),
                          valid_truncated=trunc_v, test_truncated=trunc_t,
                          vocab_src=len(self.src_vocab), vocab_tgt=len(self.tgt_vocab))

    def _vocabularies(self, train) -> tuple[pt.Vocab, pt.Vocab]:
        h = self.hparams
        kw = dict(min_freq=h.min_freq, max_size=h.max_vocab_size)
        files = self.files if self.data_source == "real" else {}
        if h.share_vocab:
            if files.get("vocab_src"):
                v = pt.Vocab.from_file(files["vocab_src"])
            else:
                v = pt.Vocab.build(train[0] + train[1], **kw)
            return v, v
        vs, vt = files.get("vocab_src"), files.get("vocab_tgt")
        return (pt.Vocab.from_file(vs) if vs else pt.Vocab.build(train[0], **kw),
                pt.Vocab.from_file(vt) if vt else pt.Vocab.build(train[1], **kw))

    def train_dataloader(self):
        h = self.hparams
        batches = pt.LengthGroupedBatches(self.train, h.batch_size, self.tgt_vocab, seed=h.seed, shuffle=True)
        # the order of the batches is shuffled per epoch and resumes mid-epoch (adashift_pl.data.resumable)
        return self.resumable_loader(batches, seed=h.seed, batch_size=None, num_workers=h.num_workers,
                                     persistent_workers=h.num_workers > 0)

    def _eval_loader(self, split):
        batches = pt.LengthGroupedBatches(split, self.hparams.eval_batch_size, self.tgt_vocab, shuffle=False)
        return DataLoader(batches, batch_size=None, shuffle=False, num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        return self._eval_loader(self.valid)

    def test_dataloader(self):
        return self._eval_loader(self.test)


def build(model: dict, data: dict, optimizer: dict, seed: int):
    dm = NMTDataModule(seed=seed, **data)
    return NMTModule(optimizer=optimizer, seed=seed, **model), dm
