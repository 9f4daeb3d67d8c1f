"""Properties of dpo.py: masked log-probs and the preference losses."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import dpo

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def batches(draw, min_len=2, max_len=12, vocab=7):
    """Random logits, ids and a response mask: each row is prompt, then response, then padding."""
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(min_len, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g) * 3
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        prompt = draw(st.integers(1, length - 1))
        response = draw(st.integers(0, length - prompt))
        mask[b, prompt:prompt + response] = True
    return logits, ids, mask


def naive_logps(logits, ids, mask):
    """A per-token Python loop: the definition, written as plainly as possible."""
    out = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1].double(), -1)[ids[b, t]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


# ----- log-probs --------------------------------------------------------------------

@SETTINGS
@given(batches())
def test_logps_equal_a_naive_per_token_loop(batch):
    logits, ids, mask = batch
    result = dpo.sequence_logps(logits, ids, mask)
    torch.testing.assert_close(result.sum.double(), naive_logps(logits, ids, mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(result.count, mask[:, 1:].sum(-1))
    torch.testing.assert_close(result.mean, result.sum / result.count.clamp(min=1))


@SETTINGS
@given(batches())
def test_the_per_token_terms_are_the_naive_loops_and_sum_to_the_sequence_logp(batch):
    """SequenceLogps.tokens: log pi(y_t | x, y_<t) at each scored target, 0 elsewhere; their sum
    is the sequence's log-prob itself, so a per-token reward adds up to the reward DPO uses."""
    logits, ids, mask = batch
    result = dpo.sequence_logps(logits, ids, mask)
    targets = mask[:, 1:]
    assert torch.equal(result.tokens.sum(-1), result.sum) and not result.tokens[~targets].any()
    for b, t in targets.nonzero().tolist():  # target t + 1, predicted by the logits at t
        expected = torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]]
        torch.testing.assert_close(result.tokens[b, t].double(), expected, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(batches(), st.integers(0, 2**31 - 1))
def test_padding_never_changes_logps(batch, seed):
    """Changing logits or ids anywhere a token is not scored changes nothing."""
    logits, ids, mask = batch
    g = torch.Generator().manual_seed(seed)
    scored = torch.zeros_like(mask)
    scored[:, 1:] = mask[:, 1:]                  # target positions
    logit_used = torch.zeros_like(mask)
    logit_used[:, :-1] = mask[:, 1:]             # positions whose logits predict a target
    noisy_logits = torch.where(logit_used.unsqueeze(-1), logits, torch.randn(logits.shape, generator=g) * 50)
    noisy_ids = torch.where(scored, ids, torch.randint(0, logits.shape[-1], ids.shape, generator=g))
    before = dpo.sequence_logps(logits, ids, mask)
    after = dpo.sequence_logps(noisy_logits, noisy_ids, mask)
    assert torch.equal(before.sum, after.sum) and torch.equal(before.count, after.count)


@SETTINGS
@given(batches(), st.integers(1, 5))
def test_appending_masked_padding_changes_nothing(batch, extra):
    logits, ids, mask = batch
    padded_logits = torch.cat([logits, torch.randn(logits.shape[0], extra, logits.shape[2])], 1)
    padded_ids = torch.cat([ids, torch.zeros(ids.shape[0], extra, dtype=ids.dtype)], 1)
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], 1)
    # Equal up to float summation order (a longer row may be summed in other SIMD lanes).
    torch.testing.assert_close(dpo.sequence_logps(logits, ids, mask).sum,
                               dpo.sequence_logps(padded_logits, padded_ids, padded_mask).sum, rtol=1e-6, atol=1e-5)


@SETTINGS
@given(batches())
def test_prompt_tokens_contribute_nothing(batch):
    """Marking prompt tokens as scored would change the value; unmarked, they are free to change."""
    logits, ids, mask = batch
    prompt_only = torch.zeros_like(mask)
    assert torch.equal(dpo.sequence_logps(logits, ids, prompt_only).sum, torch.zeros(ids.shape[0]))
    new_ids = torch.where(mask, ids, (ids + 1) % logits.shape[-1])  # every prompt (and padding) id changed
    # Prompt *ids* feed the model, not the score: with logits fixed, only response targets matter.
    assert torch.equal(dpo.sequence_logps(logits, ids, mask).sum, dpo.sequence_logps(logits, new_ids, mask).sum)


@SETTINGS
@given(batches())
def test_left_and_right_padding_give_the_same_logps(batch):
    """Rolling each row's content to the right end (left padding) keeps every value."""
    logits, ids, mask = batch
    length = ids.shape[1]
    left_logits, left_ids, left_mask = logits.clone(), ids.clone(), mask.clone()
    for b in range(ids.shape[0]):
        used = int(mask[b].nonzero().max()) + 1 if mask[b].any() else length
        shift = length - used  # trailing padding moved to the front
        left_logits[b] = logits[b].roll(shift, 0)
        left_ids[b] = ids[b].roll(shift, 0)
        left_mask[b] = mask[b].roll(shift, 0)
    torch.testing.assert_close(dpo.sequence_logps(left_logits, left_ids, left_mask).sum,
                               dpo.sequence_logps(logits, ids, mask).sum)


def test_logps_are_computed_in_fp32_from_bf16_logits():
    """Summing bf16 log-probs loses the signal (docs/PITFALLS.md 7): the result must be fp32."""
    torch.manual_seed(0)
    logits, ids = torch.randn(1, 200, 50).bfloat16(), torch.randint(0, 50, (1, 200))
    mask = torch.ones(1, 200, dtype=torch.bool)
    result = dpo.sequence_logps(logits, ids, mask)
    assert result.sum.dtype == torch.float32
    torch.testing.assert_close(result.sum.double(), naive_logps(logits.float(), ids, mask), rtol=1e-5, atol=1e-4)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        dpo.next_token_targets(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not match"):
        dpo.sequence_logps(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))


# ----- the loss ---------------------------------------------------------------------

logp = st.floats(-500, 0, allow_nan=False)
betas = st.floats(0.01, 5.0)


def loss_of(pw, pl, rw, rl, beta, **kw):
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    return dpo.dpo_loss(t(pw), t(pl), t(rw), t(rl), beta, **kw)


@SETTINGS
@given(logp, logp, betas)
def test_loss_is_log2_at_zero_margin(chosen, rejected, beta):
    """Policy == reference (step 0): loss log 2, rewards exactly 0 (docs/PITFALLS.md 5)."""
    out = loss_of(chosen, rejected, chosen, rejected, beta)
    assert out.losses.item() == pytest.approx(math.log(2), abs=1e-12)
    assert out.chosen_rewards.item() == 0 and out.rejected_rewards.item() == 0
    assert out.accuracies.item() == 0.5  # a tie is chance, not a loss


@SETTINGS
@given(st.floats(-50, 50), betas)
def test_loss_h_minus_loss_minus_h_is_minus_beta_h(h, beta):
    """-log s(bh) + log s(-bh) = -bh: the loss is log 2 plus an odd part, slope -beta/2 at 0."""
    plus = loss_of(h, 0.0, 0.0, 0.0, beta).losses.item()
    minus = loss_of(-h, 0.0, 0.0, 0.0, beta).losses.item()
    assert plus - minus == pytest.approx(-beta * h, abs=1e-9)


@SETTINGS
@given(logp, logp, logp, logp, betas, st.floats(0.01, 10))
def test_loss_falls_with_chosen_and_rises_with_rejected_logp(pw, pl, rw, rl, beta, step):
    base = loss_of(pw, pl, rw, rl, beta).losses.item()
    assert loss_of(pw + step, pl, rw, rl, beta).losses.item() <= base
    assert loss_of(pw, pl + step, rw, rl, beta).losses.item() >= base
    h = (pw - rw) - (pl - rl)
    if abs(beta * h) < 20:  # away from saturation the change is strict
        assert loss_of(pw + step, pl, rw, rl, beta).losses.item() < base
        assert loss_of(pw, pl + step, rw, rl, beta).losses.item() > base


@SETTINGS
@given(logp, logp, logp, logp, betas, st.floats(-100, 100), st.sampled_from(["chosen", "rejected"]))
def test_loss_ignores_a_constant_added_to_policy_and_reference(pw, pl, rw, rl, beta, c, which):
    if which == "chosen":
        shifted = loss_of(pw + c, pl, rw + c, rl, beta)
    else:
        shifted = loss_of(pw, pl + c, rw, rl + c, beta)
    torch.testing.assert_close(shifted.losses, loss_of(pw, pl, rw, rl, beta).losses, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(st.floats(-30, 30), betas)
def test_gradient_wrt_chosen_logp_is_minus_beta_sigmoid(h, beta):
    """Section 5.1: dL/d log pi(y_w|x) = -beta * sigmoid(-beta * h)."""
    pw = torch.tensor([h], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo.dpo_loss(pw, zero, zero, zero, beta).losses.sum().backward()
    assert pw.grad.item() == pytest.approx(-beta * torch.sigmoid(torch.tensor(-beta * h, dtype=torch.float64)).item(), rel=1e-9, abs=1e-12)


@SETTINGS
@given(st.floats(-1e30, 1e30), betas, st.floats(0, 0.49))
def test_loss_and_gradient_stay_finite_for_huge_margins(h, beta, eps):
    pw = torch.tensor([h], requires_grad=True)
    zero = torch.zeros(1)
    out = dpo.dpo_loss(pw, zero, zero, zero, beta, label_smoothing=eps)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pw.grad).all()


@SETTINGS
@given(st.floats(-20, 20), st.floats(0.05, 5.0))
def test_ipo_is_minimised_at_h_equal_one_over_two_beta(h, beta):
    target = 1 / (2 * beta)
    at_target = loss_of(target, 0.0, 0.0, 0.0, beta, loss_type="ipo").losses.item()
    assert at_target == pytest.approx(0.0, abs=1e-12)
    assert loss_of(h, 0.0, 0.0, 0.0, beta, loss_type="ipo").losses.item() == pytest.approx((h - target) ** 2)


@SETTINGS
@given(logp, logp, logp, logp, betas)
def test_label_smoothing_zero_is_plain_dpo(pw, pl, rw, rl, beta):
    plain = -F.logsigmoid(torch.tensor(beta * ((pw - rw) - (pl - rl)), dtype=torch.float64))
    assert loss_of(pw, pl, rw, rl, beta, label_smoothing=0.0).losses.item() == pytest.approx(plain.item(), rel=1e-12, abs=1e-12)


@SETTINGS
@given(st.floats(-20, 20), betas, st.floats(0.01, 0.49))
def test_conservative_dpo_mixes_both_labels(h, beta, eps):
    forward = loss_of(h, 0.0, 0.0, 0.0, beta).losses.item()
    flipped = loss_of(-h, 0.0, 0.0, 0.0, beta).losses.item()
    assert loss_of(h, 0.0, 0.0, 0.0, beta, label_smoothing=eps).losses.item() == pytest.approx(
        (1 - eps) * forward + eps * flipped, rel=1e-9)


def test_rewards_margin_and_accuracy():
    out = dpo.dpo_loss(torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -2.0]),
                       torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -4.0]), beta=0.5)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5, 1.0]))
    torch.testing.assert_close(out.margins, torch.tensor([1.0, -1.5]))
    torch.testing.assert_close(out.accuracies, torch.tensor([1.0, 0.0]))


def test_worked_example_from_the_readme():
    """README's toy example: h = (-12 - -14) - (-15 - -14) = 3, beta 0.1 -> loss = log(1 + e^-0.3)."""
    out = dpo.dpo_loss(torch.tensor([-12.0]), torch.tensor([-15.0]), torch.tensor([-14.0]), torch.tensor([-14.0]), 0.1)
    assert out.losses.item() == pytest.approx(0.5544, abs=1e-4)
    assert out.chosen_rewards.item() == pytest.approx(0.2) and out.rejected_rewards.item() == pytest.approx(-0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(beta=float("nan")), "beta must be > 0"),
    (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
    (dict(beta=0.1, label_smoothing=-0.1), "label_smoothing"),
    (dict(beta=0.1, loss_type="hinge"), "loss_type"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        dpo.dpo_loss(x, x, x, x, **kwargs)


def test_shapes_that_disagree_raise():
    with pytest.raises(ValueError, match="one shape"):
        dpo.dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), 0.1)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 70), st.integers(2, 300), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**31 - 1),
       st.integers(1, 20))
def test_chunked_token_logps_equal_the_plain_ones_in_value_and_gradient(rows, vocab, dtype, seed, chunk_rows):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)
    plain_logits, chunked_logits = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    plain = dpo.token_logps(plain_logits, targets)
    chunked = dpo.ChunkedTokenLogps.apply(chunked_logits, targets, chunk_rows)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    (plain * upstream).sum().backward()
    (chunked * upstream).sum().backward()
    torch.testing.assert_close(chunked_logits.grad.float(), plain_logits.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


# ----- the supervised stage ------------------------------------------------------------

@SETTINGS
@given(batches())
def test_sft_loss_is_the_mean_nll_over_every_response_token_of_the_batch(batch):
    """L_SFT = -(sum over all response tokens of log p) / (their number): a per-token loop."""
    logits, ids, mask = batch
    nll, tokens = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                nll -= torch.log_softmax(logits[b, t - 1].double(), -1)[ids[b, t]].item()
                tokens += 1
    result = dpo.sft_loss(dpo.sequence_logps(logits, ids, mask))
    assert result.count.sum().item() == tokens
    torch.testing.assert_close(result.loss.double(), torch.tensor(nll / max(tokens, 1), dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    parts = [dpo.sft_loss(dpo.sequence_logps(logits[b:b + 1], ids[b:b + 1], mask[b:b + 1])) for b in range(ids.shape[0])]
    torch.testing.assert_close(dpo.SupervisedLoss.concatenate(parts).loss, result.loss)  # weighted by tokens, not rows


@SETTINGS
@given(batches())
def test_sft_gradient_never_reaches_prompt_or_padding_logits(batch):
    """Only the logits that predict a response token get a gradient: prompt tokens never count."""
    logits, ids, mask = batch
    logits = logits.clone().requires_grad_()
    dpo.sft_loss(dpo.sequence_logps(logits, ids, mask)).loss.backward()
    predicts_response = torch.zeros_like(mask)
    predicts_response[:, :-1] = mask[:, 1:]
    assert torch.all(logits.grad[~predicts_response] == 0)
    assert torch.all(logits.grad[predicts_response].abs().sum(-1) > 0)
