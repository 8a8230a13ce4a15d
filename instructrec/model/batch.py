"""Instructions → tensors: the encoder input (the instruction without its candidates) and one decoder
sequence per request that packs every candidate's title as its own block. Shared by training, in-process
scoring and the Triton backend, so the served model sees exactly what the trained one saw.

Packing matters for speed: the decoder's cross-attention projects the encoder output to keys and values
once per decoder sequence, so one sequence per request instead of one per candidate saves that work K
times over. A block-diagonal causal mask keeps candidates from seeing each other, and positions restart
at 0 in every block, so each candidate is scored exactly as if it were decoded alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache

import torch

from instructrec.instructions import Instruction, ItemMention


@dataclass(frozen=True)
class Batch:
    enc_ids: torch.Tensor  # [requests, enc_len]
    enc_mask: torch.Tensor
    enc_items: torch.Tensor  # [requests, enc_len] collaborative-vector row at an item's first token, else 0
    dec_ids: torch.Tensor  # [requests, dec_len]: every candidate's block, one after another
    dec_block: torch.Tensor  # [requests, dec_len] candidate number of each token, -1 for padding
    dec_pos: torch.Tensor  # [requests, dec_len] position within its block
    dec_items: torch.Tensor  # [requests, dec_len] collaborative-vector row at a block's first token, else 0
    cand_last: torch.Tensor  # [requests, candidates] index of each candidate's last token
    cand_mask: torch.Tensor  # [requests, candidates] bool: a real candidate, not padding

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device` (itself when it is there already)."""
        if self.enc_ids.device == torch.device(device):
            return self
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def decoder_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive [requests, 1, dec_len, dec_len] mask: causal within a block, nothing across blocks."""
        block = self.dec_block
        length = block.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=block.device).tril()
        allowed = (block[:, :, None] == block[:, None, :]) & causal & (block[:, None, :] >= 0)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=block.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)  # finite: padding rows stay NaN-free
        return mask.unsqueeze(1)


class Tokenizer:
    """Tokenises instructions with per-title budgets; caches fragments and titles (they repeat a lot).

    History items are their titles (`title_tokens` each, in the encoder); a candidate is its description —
    title, categories, a few tags (`catalogue.describe`) — cut to `candidate_tokens` in its decoder block."""

    def __init__(
        self,
        tokenizer,
        title_tokens: int,
        max_encoder_tokens: int,
        decoder_start_id: int,
        candidate_tokens: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.title_tokens = title_tokens
        self.candidate_tokens = candidate_tokens or title_tokens
        self.max_encoder_tokens = max_encoder_tokens
        self.decoder_start_id = decoder_start_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._ids = lru_cache(maxsize=65536)(self._tokenize)
        self._prefix, self._suffix = _special_tokens(tokenizer)

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def title(self, title: str) -> tuple[int, ...]:
        return self._ids(title)[: self.title_tokens]

    def encoder_ids(
        self, instruction: Instruction, title_of: Callable[[int], str], row_of: Callable[[int], int]
    ) -> tuple[list[int], list[int]]:
        """Token ids and per-token item rows; the oldest history is dropped first when over budget."""
        pieces: list[tuple[tuple[int, ...], int, bool]] = []  # (ids, item row, droppable history)
        for part in instruction.parts:
            if isinstance(part, ItemMention):
                if part.role == "candidate":
                    continue  # candidates go to the decoder
                pieces.append((self.title(title_of(part.item)), row_of(part.item), part.role == "history"))
            elif part.strip():
                pieces.append((self._ids(part), 0, False))
        budget = self.max_encoder_tokens - len(self._prefix) - len(self._suffix)
        total = sum(len(ids) for ids, _, _ in pieces)
        for i, (ids, _, droppable) in enumerate(pieces):
            if total <= budget:
                break
            if droppable:
                total -= len(ids)
                pieces[i] = ((), 0, False)
        ids: list[int] = []
        rows: list[int] = []
        for piece, row, _ in pieces:
            if piece:
                ids.extend(piece)
                rows.extend([row] + [0] * (len(piece) - 1))
        ids = [*self._prefix, *ids[:budget], *self._suffix]
        rows = [0] * len(self._prefix) + rows[:budget] + [0] * len(self._suffix)
        return ids, rows

    def decoder_ids(self, text: str) -> list[int]:
        return [self.decoder_start_id, *self._ids(text)[: self.candidate_tokens]]

    def collate(
        self,
        instructions: Sequence[Instruction],
        title_of: Callable[[int], str],
        row_of: Callable[[int], int],
        text_of: Callable[[int], str] | None = None,
    ) -> Batch:
        """`text_of`: a candidate's description (default: its title)."""
        text_of = text_of or title_of
        encoded = [self.encoder_ids(ins, title_of, row_of) for ins in instructions]
        blocks = [[self.decoder_ids(text_of(c)) for c in ins.candidates] for ins in instructions]
        enc_len = max(len(ids) for ids, _ in encoded)
        dec_len = max(sum(len(b) for b in bs) for bs in blocks)
        n_cand = max(len(bs) for bs in blocks)

        n = len(instructions)
        enc_ids = torch.full((n, enc_len), self.pad_id, dtype=torch.long)
        enc_mask = torch.zeros((n, enc_len), dtype=torch.long)
        enc_items = torch.zeros((n, enc_len), dtype=torch.long)
        dec_ids = torch.full((n, dec_len), self.pad_id, dtype=torch.long)
        dec_block = torch.full((n, dec_len), -1, dtype=torch.long)
        dec_pos = torch.zeros((n, dec_len), dtype=torch.long)
        dec_items = torch.zeros((n, dec_len), dtype=torch.long)
        cand_last = torch.zeros((n, n_cand), dtype=torch.long)
        cand_mask = torch.zeros((n, n_cand), dtype=torch.bool)
        for r, ((ids, rows), ins, bs) in enumerate(zip(encoded, instructions, blocks, strict=True)):
            enc_ids[r, : len(ids)] = torch.tensor(ids)
            enc_mask[r, : len(ids)] = 1
            enc_items[r, : len(rows)] = torch.tensor(rows)
            at = 0
            for c, (item, block) in enumerate(zip(ins.candidates, bs, strict=True)):
                end = at + len(block)
                dec_ids[r, at:end] = torch.tensor(block)
                dec_block[r, at:end] = c
                dec_pos[r, at:end] = torch.arange(len(block))
                dec_items[r, at] = row_of(item)
                cand_last[r, c] = end - 1
                cand_mask[r, c] = True
                at = end
        return Batch(
            enc_ids, enc_mask, enc_items, dec_ids, dec_block, dec_pos, dec_items, cand_last, cand_mask
        )


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer wraps content in: ([CLS], [SEP]) for BERT, ([], [</s>]) for T5."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for lead in range(len(full) - len(bare) + 1):
        if full[lead : lead + len(bare)] == bare:
            return full[:lead], full[lead + len(bare) :]
    raise ValueError("cannot tell where this tokenizer puts its special tokens")
