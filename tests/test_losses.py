"""Every unlearning loss against values worked out by hand on tiny tensors (masks and directions included)."""

from __future__ import annotations

import math

import pytest
import torch

from mmunlearn.errors import DataError
from mmunlearn.methods.losses import (
    answer_ce,
    dmk_loss,
    kl_to_reference,
    npo_loss,
    sequence_logprob,
)

I = -100  # noqa: E741  (ignored label)


def lsm(row: list[float]) -> list[float]:
    """log-softmax by hand."""
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


def kl(p_logits: list[float], q_logits: list[float], keep: list[int] | None = None) -> float:
    """Σ_{v in keep} p (log p − log q) with p, q the full softmaxes."""
    lp, lq = lsm(p_logits), lsm(q_logits)
    keep = keep if keep is not None else list(range(len(lp)))
    return sum(math.exp(lp[v]) * (lp[v] - lq[v]) for v in keep)


# one sequence of 4 positions over a vocabulary of 3; the last two tokens are the answer
L0 = [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [9.0, 9.0, 9.0]]
R0 = [[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [1.0, 1.0, -1.0], [0.0, 0.0, 0.0]]
Y0 = [I, I, 2, 0]  # logits[1] predicts 2, logits[2] predicts 0
# a second, right-padded sequence with a single answer token
L1 = [[2.0, 0.0, -2.0], [0.0, 1.0, 0.0], [3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]
R1 = [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
Y1 = [I, 1, I, I]  # logits[0] predicts 1


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor([L0, L1]), torch.tensor([R0, R1]), torch.tensor([Y0, Y1])


def test_answer_ce_is_mean_over_answer_tokens_not_sequences() -> None:
    logits, _, labels = batch()
    nll = [-lsm(L0[1])[2], -lsm(L0[2])[0], -lsm(L1[0])[1]]
    assert answer_ce(logits, labels).item() == pytest.approx(sum(nll) / 3, rel=1e-6)
    # equals the model's own loss convention (HF shifts the same way)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 3), labels[:, 1:].reshape(-1), ignore_index=I)
    assert answer_ce(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_answer_ce_without_answer_tokens_is_an_error() -> None:
    with pytest.raises(DataError):
        answer_ce(torch.zeros(1, 3, 4), torch.full((1, 3), I))


def test_sequence_logprob_sums_answer_tokens() -> None:
    logits, _, labels = batch()
    got = sequence_logprob(logits, labels)
    assert got[0].item() == pytest.approx(lsm(L0[1])[2] + lsm(L0[2])[0], rel=1e-6)
    assert got[1].item() == pytest.approx(lsm(L1[0])[1], rel=1e-6)


def test_kl_direction_and_token_mean() -> None:
    logits, ref, labels = batch()
    want = (kl(R0[1], L0[1]) + kl(R0[2], L0[2]) + kl(R1[0], L1[0])) / 3
    assert kl_to_reference(ref, logits, labels).item() == pytest.approx(want, rel=1e-6)
    reverse = (kl(L0[1], R0[1]) + kl(L0[2], R0[2]) + kl(L1[0], R1[0])) / 3
    assert abs(want - reverse) > 1e-3  # the direction matters, and it is KL(p_ref ‖ p_θ)
    assert kl_to_reference(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-7)


def test_npo_by_hand() -> None:
    logp, logp_ref = torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.4
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = -(2 / beta) * (math.log(sig(-beta * 1.0)) + math.log(sig(-beta * -1.0))) / 2
    assert npo_loss(logp, logp_ref, beta).item() == pytest.approx(want, rel=1e-6)
    # with equal policies the loss is (2/β)·log 2, whatever the sequences
    assert npo_loss(logp, logp, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_uses_summed_sequence_logprobs() -> None:
    logits, ref, labels = batch()
    lp, lr = sequence_logprob(logits, labels), sequence_logprob(ref, labels)
    d0 = (lsm(L0[1])[2] + lsm(L0[2])[0]) - (lsm(R0[1])[2] + lsm(R0[2])[0])  # sums over the 2 answer tokens
    d1 = lsm(L1[0])[1] - lsm(R1[0])[1]
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = -(2 / 0.4) * (math.log(sig(-0.4 * d0)) + math.log(sig(-0.4 * d1))) / 2
    assert npo_loss(lp, lr).item() == pytest.approx(want, rel=1e-6)


def test_dmk_token_and_vocabulary_masks() -> None:
    logits, ref, labels = batch()
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0, 1] = False  # the label at shifted position 1 of row 0 belongs to the target phrase
    got = dmk_loss(ref, logits, labels, keep, vocab_drop=[0])
    # kept answer positions: (row 0, pos 2) and (row 1, pos 0); vocabulary entries 1 and 2 only
    want = (kl(R0[2], L0[2], keep=[1, 2]) + kl(R1[0], L1[0], keep=[1, 2])) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)
    # no masks: the plain token-mean KL
    assert dmk_loss(ref, logits, labels).item() == pytest.approx(kl_to_reference(ref, logits, labels).item())


def test_dmk_renormalised_over_kept_vocabulary() -> None:
    logits, ref, labels = batch()
    got = dmk_loss(ref, logits, labels, vocab_drop=[2], renormalise=True)
    sub = lambda row: row[:2]
    want = (kl(sub(R0[1]), sub(L0[1])) + kl(sub(R0[2]), sub(L0[2])) + kl(sub(R1[0]), sub(L1[0]))) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_dmk_with_every_position_masked_is_zero() -> None:
    logits, ref, labels = batch()
    assert dmk_loss(ref, logits, labels, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_dmk_rejects_a_misshapen_token_mask() -> None:
    logits, ref, labels = batch()
    with pytest.raises(DataError):
        dmk_loss(ref, logits, labels, torch.ones(2, 4, dtype=torch.bool))
