"""sdpa that attends each example of a packed row on its own.

A packed row (SFT/DPO `--pack`, pretraining `--document-mask`) tells its examples apart by
position_ids that restart. transformers' sdpa then builds a block-diagonal causal mask and
computes the whole row's attention, (sum of lengths)^2 scores, most of them masked away (its
flash and cuDNN kernels do not take such a mask either). Attended one example at a time, each
causal with no mask, the row costs the sum of the squared lengths: eight examples of similar
length, an eighth of the attention. The math is unchanged (tests/unit/test_packing.py).

Registered with transformers' AttentionInterface and AttentionMaskInterface (its public
extension points) as "zerotrain_sdpa"; model.build builds every model asking for "sdpa" with it.
Anything that is not a packed row (padded batches, one example a row, generation with a KV
cache, an architecture that does not hand its attention the position_ids) goes to
transformers' sdpa unchanged. On GPUs flash_attention_2 does the same natively (varlen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "zerotrain_sdpa"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) of each example: a new one wherever the position does not follow
    the previous one (transformers' own rule for packed rows); None if no row is packed."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if int(starts.sum()) == len(position_ids):
        return None
    length = position_ids.shape[1]
    rows = []
    for row in starts.cpu():
        begin = row.nonzero().flatten().tolist()
        rows.append(list(zip(begin, begin[1:] + [length])))
    return rows


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [batch, heads, q, dim], key and value
    [batch, kv_heads, k, dim] -> ([batch, q, heads, dim], no weights)."""
    position_ids = kwargs.get("position_ids")
    rows = None
    if position_ids is not None and query.shape[2] == key.shape[2] > 1 and position_ids.shape[-1] == query.shape[2]:
        rows = segments(position_ids.expand(query.shape[0], -1))
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves several query heads
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.stack([
        torch.cat([F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                  dropout_p=dropout, is_causal=e - s > 1, scale=scaling)[0]
                   for s, e in spans], dim=1)
        for b, spans in enumerate(rows)])
    return out.transpose(1, 2).contiguous(), None


def resolve(attn_implementation: str | None) -> str | None:
    """The implementation a model asking for `attn_implementation` is built with."""
    return NAME if attn_implementation == "sdpa" else attn_implementation


AttentionInterface.register(NAME, packed_sdpa_forward)
# The same masks as sdpa: built for the padded batches that go to transformers' sdpa.
AttentionMaskInterface.register(NAME, sdpa_mask)
