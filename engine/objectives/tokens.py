"""The trained-token rule, and the losses over trained tokens that every objective shares.

Position i of a row predicts token i + 1. The rule lives here, once: `shift_labels` moves each
label to the position that predicts it (labels[:, 1:], then IGNORE_INDEX at the last position,
as transformers' ForCausalLMLoss pads and slices), and a position is trained where its shifted
label is not IGNORE_INDEX (prompt tokens, padding and the first token of each packed example are
IGNORE_INDEX in the labels). Whatever is laid out by position (logits, hidden states, a teacher's
logits, packed sequence ids) is then used as it is, `x[trained_tokens(labels)]` or all of it
against `shift_labels(labels)`: the small labels are shifted, never the logits, so the largest
tensor of a step is never copied. The loss over the full logits (_TokenNLL) also turns its
log-softmax into the gradient in place: one logits-sized tensor in forward and backward together,
where cross-entropy on the sliced logits made five and on a view of them three.

Training, validation, `zerotrain eval`, the preference log-probs, distillation and the offline
teacher's store all count and score tokens through these functions. The chunked-head helpers
(--loss-chunk-size) run only the trained positions' hidden states through the LM head, a chunk
at a time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from engine.data.format import IGNORE_INDEX
from engine.objectives.base import Batch, model_inputs


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels [rows, positions] moved to the positions that predict them: position i holds the
    label of token i + 1, the last position IGNORE_INDEX (it predicts nothing in the row)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask [rows, positions] of the positions whose next token is trained; its sum is
    the batch's count of trained tokens, and `x[mask]` takes a per-position tensor's rows for
    them in row-major order."""
    return shift_labels(labels) != IGNORE_INDEX


def trained_targets(labels: torch.Tensor) -> torch.Tensor:
    """The trained tokens' ids [trained tokens], in the order of `x[trained_tokens(labels)]`."""
    shifted = shift_labels(labels)
    return shifted[shifted != IGNORE_INDEX]


class _TokenNLL(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction) for
    logits [rows, vocab], the same kernels in the forward (so the same values), with one full-size
    tensor instead of three: the log-softmax made in the forward becomes the gradient in the
    backward, in its own memory (softmax - one-hot, times the incoming gradient of the row), where
    cross-entropy's backward allocates and fills two more of its size."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        ctx.save_for_backward(log_probs, targets)
        ctx.logits_dtype = logits.dtype
        return F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX, reduction=reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        log_probs, targets = ctx.saved_tensors
        ignored = targets == IGNORE_INDEX
        # Overwritten, so a second backward through this graph fails autograd's check of the
        # saved tensor's version instead of reading a gradient as log-probs.
        grad = log_probs.exp_()
        # Masks, not a list of the trained rows: nonzero() would wait for the device.
        grad[torch.arange(len(targets), device=targets.device), targets.masked_fill(ignored, 0)] -= 1
        row_scale = grad_out.expand(len(targets)).masked_fill(ignored, 0.0)  # rows with no target: 0
        return grad.mul_(row_scale[:, None]).to(ctx.logits_dtype), None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability [rows, positions] in fp32 (as transformers' own causal-LM loss upcasts the
    logits) of each position's next token; 0 where it is not trained. The logits [rows, positions,
    vocab] are viewed, not copied (nor upcast when fp32)."""
    return -_TokenNLL.apply(logits.flatten(0, 1), shift_labels(labels).flatten(), "none").view(labels.shape)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the trained tokens, in fp32, on a view of the logits."""
    return _TokenNLL.apply(logits.flatten(0, 1), shift_labels(labels).flatten(), "sum")


# --------------------------------------------------------------------------- the LM head chunk by chunk

class _FusedLinearNLL(torch.autograd.Function):
    """Summed cross-entropy of `states @ weight.T` against `targets`, chunk by chunk, with the
    gradients computed in the forward (as liger-kernel's fused linear cross-entropy does): no
    chunk's logits outlive it, and nothing is recomputed. The logits are made in the weight's
    dtype and upcast to fp32 for the softmax, as in transformers' own path."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_states = torch.empty_like(states)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        for start in range(0, len(targets), chunk):
            h, y = states[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            d_logits = logits.sub_(lse[:, None]).exp_()  # the softmax, in the logits' own memory
            d_logits[torch.arange(len(y), device=y.device), y] -= 1
            d_logits = d_logits.to(weight.dtype)
            grad_states[start:start + chunk] = d_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(d_logits.T.float(), h.float())
        ctx.save_for_backward(grad_states, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype, ctx.has_weight_grad = weight.dtype, grad_weight is not None
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_states, grad_weight = ctx.saved_tensors
        # Scaled in place: a second weight-sized tensor would be the largest thing this loss holds
        # (the graph runs backward once; nothing else reads these).
        grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return grad_states.mul_(grad_output.to(grad_states.dtype)), grad_weight, None, None


def liger_fused_nll(device: torch.device) -> Callable[..., torch.Tensor] | None:
    """liger-kernel's fused linear cross-entropy where it runs: a Triton kernel, so CUDA only, and
    only if installed (`pip install liger-kernel`); None elsewhere (_FusedLinearNLL does the same
    math in torch)."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
        )
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def fusable_head(lm_head: torch.nn.Module) -> bool:
    """A plain bias-free linear head whose whole weight this rank holds: not a LoRA/peft wrapper,
    not a ZeRO-3 partitioned parameter (DeepSpeed marks those with ds_id)."""
    return (type(lm_head) is torch.nn.Linear and lm_head.bias is None
            and not hasattr(lm_head.weight, "ds_id"))


def chunk_count(heads: list[torch.nn.Module], tokens: int, chunk_tokens: int, device: torch.device) -> int:
    """Chunks of `chunk_tokens` covering `tokens` rows (at least one). With a ZeRO-3 head every call
    gathers its weight, a collective: then every rank makes as many calls as the rank with the
    most trained tokens, some on no rows."""
    chunks = max(1, -(-tokens // chunk_tokens))
    if any(hasattr(p, "ds_id") for head in heads for p in head.parameters()):
        from engine.distributed import all_reduce_max

        chunks = all_reduce_max(chunks, device)
    return chunks


def summed_over_chunks(fn: Callable[..., torch.Tensor], rows: list[torch.Tensor], chunk_tokens: int,
                       chunks: int) -> torch.Tensor:
    """The sum over chunks of fn(*(r[chunk] for r in rows)), each call checkpointed: whatever logits
    it makes live for that chunk only and are made again in the backward (one more forward of the
    head per step), and calls made through the head as a module keep ZeRO-3's gathering and peft's
    wrappers."""
    from torch.utils.checkpoint import checkpoint

    # Without gradients (validation, a reference or teacher) there is nothing to recompute.
    call = (lambda *args: checkpoint(fn, *args, use_reentrant=False)) if torch.is_grad_enabled() else fn
    total = None
    for i in range(chunks):
        piece = slice(i * chunk_tokens, (i + 1) * chunk_tokens)
        out = call(*(r[piece] for r in rows))
        total = out if total is None else total + out
    return total


def chunked_nll_sum(hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                    chunk_tokens: int) -> torch.Tensor:
    """token_nll_sum from the decoder's last hidden states, never holding more than `chunk_tokens`
    rows of logits; only the trained tokens go through the LM head (an SFT prompt costs nothing
    there). A plain head (fusable_head) is fused with the loss (liger-kernel's Triton kernel on CUDA
    where installed, else _FusedLinearNLL: no extra work);
    any other (ZeRO-3, a LoRA-wrapped or trained-copy head) is called as a module chunk by chunk
    (summed_over_chunks)."""
    states, targets = hidden[trained_tokens(labels)], trained_targets(labels)
    # The fused path computes the gradients in the forward: worth it only when they are wanted.
    if fusable_head(lm_head) and torch.is_grad_enabled() and (states.requires_grad or lm_head.weight.requires_grad):
        liger = liger_fused_nll(states.device) if len(targets) else None
        if liger is not None:  # it sizes its own chunks to the free memory; fp32 gradient accumulation as ours
            return liger(states, lm_head.weight, targets, reduction="sum", accum_dtype=torch.float32)
        return _FusedLinearNLL.apply(states, lm_head.weight, targets, chunk_tokens)

    def chunk_nll(states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(states).float(), targets, reduction="sum")

    chunks = chunk_count([lm_head], len(targets), chunk_tokens, hidden.device)
    return summed_over_chunks(chunk_nll, [states, targets], chunk_tokens, chunks)


def language_model(model) -> torch.nn.Module:
    """The transformers causal LM inside a DeepSpeed engine and/or a peft wrapper."""
    module = getattr(model, "module", model)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def decoder_states(model: Callable[..., object], batch: Batch) -> torch.Tensor:
    """The decoder's last hidden states [rows, positions, hidden] for a batch, taken through the
    whole model (so DeepSpeed's and peft's wrappers run as in training) with its own LM head run
    on no position: logits_to_keep with no index makes no logits."""
    captured: list[torch.Tensor] = []
    hook = language_model(model).get_decoder().register_forward_hook(
        lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        nothing = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
        model(**model_inputs(batch), use_cache=False, logits_to_keep=nothing)
    finally:
        hook.remove()
    return captured[-1]


def lm_nll_sum(model: Callable[..., object], batch: Batch, chunk: int) -> torch.Tensor:
    """Summed NLL of a batch's trained tokens: through the LM head `chunk` tokens at a time
    (--loss-chunk-size), or with the full logits, as transformers computes it, for 0."""
    if not chunk:
        return token_nll_sum(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])
    return chunked_nll_sum(decoder_states(model, batch), language_model(model).get_output_embeddings(),
                           batch["labels"], chunk)
