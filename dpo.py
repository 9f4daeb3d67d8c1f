"""The math of Direct Preference Optimization, as pure functions (tensors in, tensors out).

Paper: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", arXiv 2305.18290. Equation numbers below are that paper's
unless another paper is named.

Three ideas live here:
  1. log pi(y|x): the *sum* of next-token log-probabilities over the response tokens only
     (prompt and padding masked out), computed in fp32.
  2. The DPO loss on four such numbers per pair (policy/reference x chosen/rejected),
     with its two published variants, conservative DPO and IPO.
  3. The supervised loss that makes a reference when there is no SFT model to start from:
     the likelihood of the preferred answers (Section 4).
And how sure a measured share is (reward accuracy on held-out pairs, a judge's win rate): the
Wilson interval.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo")


# ---------------------------------------------------------------------------------------
# 1. Masked sequence log-probabilities
# ---------------------------------------------------------------------------------------

class SequenceLogps(NamedTuple):
    """Per-sequence log-probabilities of the response tokens, and the terms they sum."""
    sum: Tensor    # (B,) log pi(y|x) = sum_t log pi(y_t | x, y_<t)   (what DPO uses)
    mean: Tensor   # (B,) sum / count                                  (what IPO uses)
    count: Tensor  # (B,) number of response tokens scored
    tokens: Tensor | None = None  # (B, L) log pi(y_t | x, y_<t), 0 where not scored: the terms of sum, in order


def next_token_targets(input_ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The one-position shift, for the plain definition (sequence_logps). Training writes the
    same shift down as data.Batch.source (data.collate), which prefix sharing needs to bend.

    The logits at position t predict the token at position t+1, so position t is scored
    against input_ids[t+1] and counts only when that *target* token is a response token.

    input_ids, response_mask: (B, T)  ->  targets, target_mask: (B, T-1), aligned with
    logits[:, :-1] (the last position predicts nothing we have).
    """
    if input_ids.shape != response_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape")
    return input_ids[:, 1:], response_mask[:, 1:].bool()


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] for each row, computed in fp32 (docs/PITFALLS.md 7).

    logits: (..., V), targets: (...) -> (...). Gathering the target's logit and subtracting
    logsumexp never materialises the full (..., V) log-softmax a second time.
    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


LOGSUMEXP_CHUNK_ROWS = 8  # rows of (rows, V) fp32 work at a time: 8 MB over Gemma's 262k vocabulary stays in cache


class ChunkedTokenLogps(torch.autograd.Function):
    """token_logps with the same values and gradient, in a fraction of the memory and time.

    Over a 262k vocabulary the plain version keeps fp32 copies of all (N, V) logits for its
    backward. This one keeps only the logits as given (bf16) and the N logsumexps, and does
    the fp32 work a few rows at a time, in place, using the log-softmax gradient

        d log softmax(z)_y / dz = onehot(y) - softmax(z)

    Small chunks are the point on a CPU: each pass over a chunk finds it still in cache, where
    a pass over all (N, V) rows goes to memory (bench/levers.py: a Gemma step x1.19 faster than
    with 64-row chunks).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:  # (N, V), (N,) -> (N,)
        chunk_rows = chunk_rows or LOGSUMEXP_CHUNK_ROWS
        logsumexp = torch.empty(logits.shape[0], device=logits.device)                  # (N,) fp32
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = logits[rows].to(torch.float32, copy=True)                                # (n, V); a copy: changed in place
            z_max = z.amax(-1)                                                           # log sum exp z = m + log sum exp(z - m)
            logsumexp[rows] = z.sub_(z_max[:, None]).exp_().sum(-1).log_().add_(z_max)
        ctx.save_for_backward(logits, targets, logsumexp)
        ctx.chunk_rows = chunk_rows
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - logsumexp

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: (N,)
        logits, targets, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            chunk_grad = logits[rows].to(torch.float32, copy=True)
            chunk_grad.sub_(logsumexp[rows, None]).exp_()                          # softmax(z): (n, V)
            chunk_grad.mul_(-grad[rows, None])                                     # -softmax(z) * g
            chunk_grad.scatter_add_(-1, targets[rows, None], grad[rows, None])     # + onehot(y) * g
            grad_logits[rows] = chunk_grad                                         # rounded once to the logits' dtype
        return grad_logits, None, None


def reduce_logps(per_token_logps: Tensor, target_mask: Tensor) -> SequenceLogps:
    """Masked sum, mean and count over the time axis: (B, T) -> three (B,) tensors, and the
    masked (B, T) terms themselves (what a per-token reward is made of)."""
    per_token_logps = per_token_logps.masked_fill(~target_mask, 0.0)  # masked positions may hold anything
    total = per_token_logps.sum(-1)
    count = target_mask.sum(-1)
    return SequenceLogps(total, total / count.clamp(min=1), count, per_token_logps)


def sequence_logps(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> SequenceLogps:
    """log pi(y|x) for each sequence of a batch, from full logits.

    logits: (B, T, V); input_ids, response_mask: (B, T), response_mask True on response
    tokens only (never prompt, never padding). Returns sum, mean and count, each (B,).
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    targets, target_mask = next_token_targets(input_ids, response_mask)
    return reduce_logps(token_logps(logits[:, :-1], targets), target_mask)  # logits[:, :-1]: (B, T-1, V)


def sequence_logps_from_hidden(hidden: Tensor, output_layer, source: Tensor, targets: Tensor,
                               target_mask: Tensor) -> SequenceLogps:
    """The same numbers as sequence_logps, but the output layer sees scored positions only.

    hidden: (R, T, H), the last hidden states of R rows. Sequence s of the S sequences lives in
    row s % R; its l-th response token targets[s, l] is predicted by hidden[s % R, source[s, l]]
    (where target_mask[s, l]). Two rows a pair (R = S) give the usual one-position shift; one row
    a pair (R = S / 2, the prompt shared) scores chosen and rejected tokens from the same row.
    output_layer maps (N, H) -> (N, V) logits. Projecting every position through a 50k-262k
    vocabulary is most of a step's cost and memory, and prompt and padding positions are thrown
    away after (docs/PITFALLS.md 8).
    """
    sequence, slot = target_mask.nonzero(as_tuple=True)                         # (N,) each, row-major
    row = sequence % hidden.shape[0]
    response_hidden = hidden[row, source[sequence, slot]]                       # (N, H)
    scored = ChunkedTokenLogps.apply(output_layer(response_hidden), targets[sequence, slot])  # (N,)
    per_token_logps = torch.zeros(target_mask.shape, dtype=scored.dtype, device=scored.device)
    per_token_logps = per_token_logps.masked_scatter(target_mask, scored)       # (S, L)
    return reduce_logps(per_token_logps, target_mask)


# ---------------------------------------------------------------------------------------
# 2. The preference losses
# ---------------------------------------------------------------------------------------

class PreferenceLoss(NamedTuple):
    """Per-pair losses and the implicit rewards that explain them. All (B,)."""
    losses: Tensor            # minimise losses.mean()
    chosen_rewards: Tensor    # r(x, y_w) = beta * log pi(y_w|x) / ref(y_w|x)   (Eq. 5, detached)
    rejected_rewards: Tensor  # r(x, y_l) = beta * log pi(y_l|x) / ref(y_l|x)

    @property
    def loss(self) -> Tensor:
        """The scalar to minimise: the mean over pairs."""
        return self.losses.mean()

    @property
    def total(self) -> Tensor:
        """The sum that loss is the mean of, over len(losses) pairs: a step of several batches
        divides the sum of their totals by all their pairs."""
        return self.losses.sum()

    @property
    def margins(self) -> Tensor:
        """r(x, y_w) - r(x, y_l): how far the policy prefers the chosen answer."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> Tensor:
        """1.0 where the implicit reward ranks the pair like the human did, 0.5 on a tie
        (so policy == reference scores exactly chance, 0.5, not 0)."""
        return (self.chosen_rewards > self.rejected_rewards).float() + 0.5 * (self.chosen_rewards == self.rejected_rewards).float()

    @staticmethod
    def concatenate(parts: "list[PreferenceLoss]") -> "PreferenceLoss":
        """Several batches' results as one: (B1,) + (B2,) + ... -> (B1 + B2 + ...,)."""
        return PreferenceLoss(*(torch.cat(field) for field in zip(*parts)))


def check_loss_settings(beta: float, label_smoothing: float, loss_type: str) -> None:
    """The loss's own arguments, checked here once; train.TrainConfig calls it too, so a bad
    --beta is reported before any model loads."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not to ipo")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> PreferenceLoss:
    """The DPO loss (Eq. 7) and its variants, per pair.

    With h = log pi(y_w|x)/ref(y_w|x) - log pi(y_l|x)/ref(y_l|x):

    sigmoid, label_smoothing = 0 (DPO, Rafailov et al. 2023, Eq. 7):
        L_DPO = -log sigmoid(beta * h)
    sigmoid, label_smoothing = eps (conservative DPO, Mitchell 2023, "A note on DPO with
    noisy preferences": the human label is flipped with probability eps):
        L_cDPO = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo (Azar et al. 2023, arXiv 2310.12036, Eq. 17, with beta in the role of tau; pass
    *mean* per-token log-probs, as IPO regresses a length-free log-ratio):
        L_IPO = (h - 1 / (2 * beta))^2

    log sigmoid is F.logsigmoid, which stays finite for any |h|. The gradient of L_DPO
    (Section 5.1) weights each pair by sigmoid(-beta * h): pairs the policy already ranks
    right count less.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    check_loss_settings(beta, label_smoothing, loss_type)
    if len({tuple(t.shape) for t in logps}) != 1:
        raise ValueError(f"the four log-prob tensors must share one shape, got {[tuple(t.shape) for t in logps]}")

    chosen_logratios = policy_chosen_logps - reference_chosen_logps        # log pi(y_w|x)/ref(y_w|x)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # log pi(y_l|x)/ref(y_l|x)
    h = chosen_logratios - rejected_logratios

    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2                                          # Azar et al., Eq. 17
    else:
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)                      # Eq. 7
                  - label_smoothing * F.logsigmoid(-beta * h))                           # cDPO term

    chosen_rewards = beta * chosen_logratios.detach()      # Eq. 5 without the beta*log Z(x) term,
    rejected_rewards = beta * rejected_logratios.detach()  # which cancels in every comparison
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)


# ---------------------------------------------------------------------------------------
# 3. The supervised stage: a reference made from the preferred answers
# ---------------------------------------------------------------------------------------

class SupervisedLoss(NamedTuple):
    """Per-sequence negative log-likelihoods and token counts of a batch. All (B,)."""
    nll: Tensor    # -log pi(y_w|x), summed over the response tokens
    count: Tensor  # response tokens of each sequence

    @property
    def loss(self) -> Tensor:
        """The mean per token over the batch: sum of nll / sum of count (so a long answer
        weighs by its tokens, as in any language-model loss); exp(loss) is the perplexity."""
        return self.nll.sum() / self.count.sum().clamp(min=1)

    @property
    def total(self) -> Tensor:
        """The sum that loss is the mean of, over count.sum() tokens: a step of several batches
        divides the sum of their totals by all their tokens, not the mean of their means."""
        return self.nll.sum()

    @staticmethod
    def concatenate(parts: "list[SupervisedLoss]") -> "SupervisedLoss":
        return SupervisedLoss(*(torch.cat(field) for field in zip(*parts)))


def sft_loss(chosen_logps: SequenceLogps) -> SupervisedLoss:
    """The supervised (SFT) stage that the paper runs before DPO when no SFT model exists
    (Section 4, "DPO outline": the reference is initialised by maximising the likelihood of
    the preferred completions; Section 6 does this for Anthropic HH):

        pi_ref = argmax_pi  E_(x, y_w) ~ D [ log pi(y_w | x) ]
        L_SFT  = - sum_i log pi(y_w,i | x_i) / sum_i |y_w,i|      (mean per response token)

    chosen_logps: the masked log-probs of the chosen sequences only, as DPO computes them.
    Without it the reference is a base model whose own answers look nothing like the data's,
    and DPO's implicit reward is measured from there.
    """
    return SupervisedLoss(-chosen_logps.sum, chosen_logps.count)


Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927, JASA 22:209):

        (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),   p = successes / n

    Unlike p +/- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at 0 or n
    successes. n = 0 says nothing: (0, 1).
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 and n successes the bounds are exactly 0 and 1; the formula gets there only up to rounding.
    return (0.0 if successes == 0 else center - half_width), (1.0 if successes == n else center + half_width)
