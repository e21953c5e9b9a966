"""The causal-LM loss: next-token cross-entropy or distillation, with the LM head run a chunk of positions at a time.

Full-sequence logits (tokens x vocabulary, the largest activation of a long-context step) never exist when the loss
is chunked: each chunk's logits give its loss and, at once, its gradients. A distillation teacher reaches the loss as
one `Teacher` (its final hidden states and LM-head weight), whose logits are chunked the same way.

Pure torch: this file goes to the Hub beside the model code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def _head_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the LM head computes in: autocast's where it is on, else the weight's."""
    device_type = weight.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


class Teacher(NamedTuple):
    """A distillation target: the teacher's final hidden states for the same inputs (B, T, d_t), its LM-head weight
    (V, d_t) and the weight of the cross-entropy beside the KL term. The loss becomes KL(teacher || model) per
    predicted token plus `ce_weight` times the cross-entropy; no gradient reaches the teacher."""

    hidden: Tensor
    weight: Tensor
    ce_weight: float = 0.0

    def piece(self, piece: slice, dtype: torch.dtype) -> Teacher:
        return Teacher(self.hidden[piece].to(dtype), self.weight, self.ce_weight)

    def check(self, hidden: Tensor, vocab_size: int) -> Teacher:
        """This teacher, detached, after checking it against the student's hidden states (B, T, d)."""
        if self.hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"The teacher's hidden states have shape {tuple(self.hidden.shape)} but the inputs have "
                             f"(batch, length) = {tuple(hidden.shape[:2])}; run the teacher on the same input_ids.")
        if self.weight.shape != (vocab_size, self.hidden.shape[-1]):
            raise ValueError(f"The teacher's LM-head weight has shape {tuple(self.weight.shape)}, expected "
                             f"(vocab_size, d_teacher) = ({vocab_size}, {self.hidden.shape[-1]}): teacher and "
                             f"student must share the vocabulary.")
        return Teacher(self.hidden.detach(), self.weight.detach(), self.ce_weight)


def _chunk_loss(hidden: Tensor, weight: Tensor, targets: Tensor, teacher: Teacher | None = None) -> Tensor:
    """Summed loss of one chunk; logits in the head dtype, softmax in fp32.

    Cross-entropy against `targets`, or with a `teacher`, KL(teacher || model) over the positions with a target
    plus `teacher.ce_weight` times the cross-entropy.
    """
    logits = F.linear(hidden, weight).float()
    if teacher is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    keep = targets != IGNORE_INDEX
    with torch.no_grad():
        teacher_log_probs = F.linear(teacher.hidden, teacher.weight).float().log_softmax(-1)[keep]
    log_probs = logits[keep].log_softmax(-1)
    loss = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum()
    if teacher.ce_weight:
        loss = loss + teacher.ce_weight * F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return loss


def _cross_entropy_with_grads(
    h: Tensor, weight: Tensor, targets: Tensor, grad_hidden: Tensor | None, piece: slice, grad_weight: Tensor | None
) -> Tensor:
    """Summed cross-entropy of `h @ weight.T` (softmax in fp32), writing d/dh into `grad_hidden[piece]` and adding
    d/dweight into `grad_weight`: the gradient with respect to the logits is softmax - one-hot, computed in place in
    the logits buffer, so a chunk costs one (positions x vocabulary) fp32 buffer."""
    logits = F.linear(h, weight).float()
    keep = targets != IGNORE_INDEX
    index = targets.clamp(min=0).unsqueeze(1)
    target_logits = logits.gather(1, index)
    top = logits.amax(-1, keepdim=True)
    grad_logits = logits.sub_(top).exp_()  # exp(logits - max), in place
    total = grad_logits.sum(-1, keepdim=True)
    loss = ((total.log() + top - target_logits).squeeze(1) * keep).sum()  # logsumexp - target logit
    grad_logits.div_(total)  # softmax
    grad_logits.scatter_add_(1, index, grad_logits.new_full(index.shape, -1.0)).mul_(keep.unsqueeze(1))
    grad_logits = grad_logits.to(h.dtype)
    if grad_hidden is not None:
        grad_hidden[piece] = grad_logits @ weight
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
    return loss


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Summed loss (`_chunk_loss`) of `hidden @ weight.T` against `targets`, `chunk_size` positions at a time.

    Full-sequence logits never exist (the teacher's neither, when distilling): each chunk's logits give its loss and,
    at once, its gradients with respect to the hidden states and the head weight, so backward only scales the stored
    gradients (no second LM-head pass). The weights are cast to the compute dtype once for all chunks (autocast would
    keep one cast per chunk alive).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, teacher: Teacher | None = None
    ) -> Tensor:
        # hidden: (N, d), weight: (V, d), targets: (N,)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = _head_dtype(weight)
        w = weight.detach().to(dtype).requires_grad_(want_weight)
        if teacher is not None:
            teacher = teacher._replace(weight=teacher.weight.detach().to(dtype))
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        with torch.autocast(weight.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                piece = slice(start, start + chunk_size)
                if teacher is None:  # cross-entropy: its gradients in closed form, one logits buffer per chunk
                    h = hidden[piece].detach().to(dtype)
                    total += _cross_entropy_with_grads(h, w.detach(), targets[piece], grad_hidden, piece, grad_weight)
                    continue
                with torch.enable_grad():
                    h = hidden[piece].detach().to(dtype).requires_grad_(want_hidden)
                    loss = _chunk_loss(h, w, targets[piece], teacher and teacher.piece(piece, dtype))
                grads = iter(torch.autograd.grad(loss, [t for t in (h, w) if t.requires_grad]))
                if want_hidden:
                    grad_hidden[piece] = next(grads)
                if want_weight:
                    grad_weight += next(grads)
                total += loss.detach()
        # Results rather than saved tensors: backward scales them in place and hands them on (no second copy of a
        # head-sized gradient), which it can do once.
        ctx.grads = grad_hidden, grad_weight
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise RuntimeError("The chunked loss computed its gradients for one backward; back-propagating it again "
                               "(retain_graph=True) is not supported: compute the loss again instead.")
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def causal_lm_loss(
    hidden: Tensor,
    lm_head: nn.Linear,
    labels: Tensor | None,
    chunk_size: int = 0,
    num_items_in_batch: int | Tensor | None = None,
    logits: Tensor | None = None,
    teacher: Teacher | None = None,
    shift_labels: Tensor | None = None,
) -> Tensor:
    """Mean next-token loss: position t predicts `labels[t + 1]`, or `shift_labels[t]` when given (already shifted,
    as context-parallel training passes them per shard); `-100` labels are ignored.

    Cross-entropy, or with a `teacher` (hidden states (B, T, d_t) and head weight) the distillation loss
    KL(teacher || model) + `teacher.ce_weight` * cross-entropy at the same positions. With `chunk_size` > 0 the LM
    heads run in chunks of that many positions and full logits never exist; otherwise pass the `logits` already
    computed for the output (the head then runs once). `num_items_in_batch` (from Trainer / gradient accumulation)
    replaces the local count of predicted tokens as the denominator, so accumulated micro-batches average over the
    whole batch.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # shift left
    targets = shift_labels.reshape(-1)  # (B*T,)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if teacher is not None:
        teacher = teacher._replace(hidden=teacher.hidden.reshape(-1, teacher.hidden.shape[-1]))
    if logits is not None and teacher is None:
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    elif torch.is_grad_enabled() and (hidden.requires_grad or lm_head.weight.requires_grad):
        total = ChunkedLMHeadLoss.apply(hidden, lm_head.weight, targets, chunk_size or hidden.shape[0], teacher)
    else:  # evaluation: the loss alone, chunk by chunk
        weight = lm_head.weight.to(_head_dtype(lm_head.weight))
        if teacher is not None:
            teacher = teacher._replace(weight=teacher.weight.to(weight.dtype))
        with torch.autocast(weight.device.type, enabled=False):
            total = sum(
                _chunk_loss(hidden[piece].to(weight.dtype), weight, targets[piece],
                            teacher and teacher.piece(piece, weight.dtype))
                for piece in (slice(start, start + (chunk_size or hidden.shape[0]))
                              for start in range(0, hidden.shape[0], chunk_size or hidden.shape[0]))
            )  # fmt: skip
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    if isinstance(count, Tensor):
        count = count.to(total.device)
    return total / count


__all__ = ["IGNORE_INDEX", "ChunkedLMHeadLoss", "Teacher", "causal_lm_loss"]
