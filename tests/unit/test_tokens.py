"""The trained-token rule and the token losses (engine.objectives.tokens) against transformers'
causal-LM loss and torch's cross-entropy on shifted logits, values and gradients; and the reason
they exist: the logits are neither copied nor given more than one tensor of their size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from engine.data.format import IGNORE_INDEX
from engine.objectives.tokens import (
    shift_labels,
    token_logps,
    token_nll_sum,
    trained_targets,
    trained_tokens,
)

VOCAB = 50


def labelled(rows: int = 3, positions: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels with a prompt, padding, a packed boundary and a row with nothing trained."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, positions, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (rows, positions), generator=g)
    labels[0, :4] = IGNORE_INDEX  # an SFT prompt
    labels[1, 7] = IGNORE_INDEX  # the first token of a second packed example
    labels[1, 10:] = IGNORE_INDEX  # padding
    labels[2] = IGNORE_INDEX  # nothing to train on
    return logits, labels


def close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal within fp32 rounding relative to the magnitude of what is compared (the sums run in
    another order, on AVX-512, AVX2 and plain kernels alike)."""
    assert float((got - expected).abs().max()) <= rtol * float(expected.abs().max())


def test_the_rule_is_the_next_token_of_every_labelled_position():
    logits, labels = labelled()
    assert shift_labels(labels).shape == labels.shape
    assert (shift_labels(labels)[:, -1] == IGNORE_INDEX).all()
    assert torch.equal(shift_labels(labels)[:, :-1], labels[:, 1:])
    mask = trained_tokens(labels)
    assert int(mask.sum()) == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 8 + 8
    # rows of anything laid out by position, in the order of the targets
    assert torch.equal(logits[mask], logits[:, :-1][labels[:, 1:] != IGNORE_INDEX])
    assert torch.equal(trained_targets(labels), labels[:, 1:][labels[:, 1:] != IGNORE_INDEX])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_nll_sum_is_transformers_causal_lm_loss(dtype):
    """Summed (num_items_in_batch=1) as transformers computes it for HF Trainer, value and gradient."""
    logits, labels = labelled()
    ours = logits.to(dtype).requires_grad_()
    theirs = logits.to(dtype).requires_grad_()
    got = token_nll_sum(ours, labels)
    expected = ForCausalLMLoss(theirs, labels, VOCAB, num_items_in_batch=torch.tensor(1.0))
    assert got.dtype == torch.float32
    close(got, expected)
    got.backward()
    expected.backward()
    assert ours.grad.dtype == dtype
    close(ours.grad.float(), theirs.grad.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2)
    assert float(ours.grad[2].abs().sum()) == 0.0  # nothing trained in that row


def test_token_logps_are_torch_cross_entropy_on_the_shifted_logits():
    """Per token, with a different incoming gradient for every token (as the per-sequence sums of
    the preference losses give), against F.cross_entropy on logits[:, :-1] and labels[:, 1:]."""
    logits, labels = labelled()
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = token_logps(ours, labels)
    expected = -F.cross_entropy(theirs[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none").view(len(labels), -1)
    assert got.shape == labels.shape and float(got[:, -1].abs().sum()) == 0.0
    assert float(got[~trained_tokens(labels)].abs().sum()) == 0.0
    close(got[:, :-1], expected)
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    (got * weights).sum().backward()
    (expected * weights[:, :-1]).sum().backward()
    close(ours.grad, theirs.grad)


def test_nothing_trained_gives_zero_and_a_zero_gradient():
    logits, labels = labelled()
    logits.requires_grad_()
    loss = token_nll_sum(logits, torch.full_like(labels, IGNORE_INDEX))
    loss.backward()
    assert float(loss) == 0.0 and float(logits.grad.abs().sum()) == 0.0


def test_a_second_backward_through_the_loss_fails_loudly():
    """The backward turns its saved log-softmax into the gradient in place: a retained graph's
    second pass must not read that as log-probs."""
    logits, labels = labelled()
    loss = token_nll_sum(logits.requires_grad_(), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def logits_sized_allocations(fn, logits: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """The ops that allocated a tensor of the logits' size, or larger, in fn's forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(logits, labels).backward()
    return [e.name for e in prof.events() if e.self_cpu_memory_usage >= 0.9 * logits.numel() * logits.element_size()]


def test_the_logits_are_not_copied_and_one_tensor_of_their_size_is_made():
    """One allocation of the logits' size in forward and backward together: the log-softmax, which
    becomes the gradient. Slicing the logits (logits[:, :-1]) copied them and scattered the
    gradient into a fresh zeroed tensor, five in all; cross-entropy on a view still makes three."""
    logits, labels = labelled(4, 64)
    logits.requires_grad_()
    assert logits_sized_allocations(token_nll_sum, logits, labels) == ["aten::_log_softmax"]

    def sliced(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")

    assert len(logits_sized_allocations(sliced, logits, labels)) == 5  # what this test would catch
