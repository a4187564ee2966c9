"""Each piece of PPO against a straightforward reference computation: plain Python loops over rows and real
tokens, written from the formulas, never sharing code with `medgpt.rl.ppo_core`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medgpt.rl import ppo_core as core

LENGTHS = [5, 3, 1, 4]  # real reply tokens per row; rows are right-padded to 5


def padded_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (len(LENGTHS), max(LENGTHS))
    mask = torch.tensor([[1.0] * n + [0.0] * (shape[1] - n) for n in LENGTHS])
    return lambda: torch.randn(shape, generator=generator, dtype=torch.float64), mask


def real_values(values: torch.Tensor) -> list[float]:
    return [values[i, t].item() for i, n in enumerate(LENGTHS) for t in range(n)]


def test_masked_mean_var_and_whitening_use_only_real_tokens():
    draw, mask = padded_batch()
    values = draw()
    values[mask == 0] = 1e6  # padding must not leak in
    real = np.array(real_values(values))
    assert core.masked_mean(values, mask).item() == pytest.approx(real.mean())
    assert core.masked_var(values, mask).item() == pytest.approx(real.var(ddof=1))
    assert core.masked_var(values, mask, unbiased=False).item() == pytest.approx(real.var())
    whitened = core.masked_whiten(values, mask)
    assert real_values(whitened) == pytest.approx(list((real - real.mean()) / math.sqrt(real.var(ddof=1) + 1e-8)))
    assert whitened[mask == 0].abs().max() == 0
    kept_mean = core.masked_whiten(values, mask, shift_mean=False)
    assert core.masked_mean(kept_mean, mask).item() == pytest.approx(real.mean())
    rows = core.masked_mean(values, mask, dim=1)
    assert rows.tolist() == pytest.approx([np.mean([values[i, t].item() for t in range(n)]) for i, n in enumerate(LENGTHS)])


def test_masked_mean_of_nothing_is_zero_not_nan():
    assert core.masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0


def reference_gae(rewards, values, gamma, lam):
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            total = 0.0
            for k in range(t, n):  # A_t = sum_k (gamma lam)^(k-t) delta_k, V after the last token = 0
                next_value = values[i, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[i, k].item() + gamma * next_value - values[i, k].item()
                total += (gamma * lam) ** (k - t) * delta
            advantages[i, t] = total
            returns[i, t] = total + values[i, t].item()
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_the_sum_of_discounted_td_errors(gamma, lam):
    draw, mask = padded_batch(1)
    rewards, values = draw(), draw()
    advantages, returns = core.gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = reference_gae(rewards, values, gamma, lam)
    assert torch.allclose(advantages, expected_advantages)
    assert torch.allclose(returns, expected_returns)


def test_gae_with_lambda_one_and_no_discount_gives_reward_to_go_minus_value():
    draw, mask = padded_batch(2)
    rewards, values = draw(), draw()
    advantages, _ = core.gae(rewards, values, mask, 1.0, 1.0)
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            to_go = sum(rewards[i, k].item() for k in range(t, n))
            assert advantages[i, t].item() == pytest.approx(to_go - values[i, t].item())


def test_token_rewards_pay_the_kl_penalty_per_token_and_the_score_at_the_last_real_token():
    draw, mask = padded_batch(3)
    kl = draw() * mask
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    rewards = core.token_rewards(scores, kl, 0.1, mask)
    for i, n in enumerate(LENGTHS):
        for t in range(max(LENGTHS)):
            expected = -0.1 * kl[i, t].item() if t < n else 0.0
            if t == n - 1:
                expected += scores[i].item()
            assert rewards[i, t].item() == pytest.approx(expected)


def test_kl_estimators_follow_their_formulas_and_k3_is_never_negative():
    logprobs = torch.tensor([-1.0, -0.2, -3.0, -0.7])
    ref = torch.tensor([-1.5, -0.1, -2.0, -0.7])
    assert core.kl_penalty(logprobs, ref, "k1").tolist() == pytest.approx([0.5, -0.1, -1.0, 0.0])
    k3 = [(math.exp(r - l) - 1) - (r - l) for l, r in zip(logprobs.tolist(), ref.tolist())]
    assert core.kl_penalty(logprobs, ref, "k3").tolist() == pytest.approx(k3, abs=1e-6)
    assert min(k3) >= 0
    with pytest.raises(ValueError, match="k1 or k3"):
        core.kl_penalty(logprobs, ref, "k2")


def test_clipped_policy_loss_clip_fraction_and_approx_kl_match_a_token_loop():
    draw, mask = padded_batch(4)
    old, advantages = draw(), draw()
    new = old + 0.4 * draw()  # ratios well outside [0.8, 1.2] on some tokens
    loss, stats = core.policy_loss(new, old, advantages, mask, cliprange=0.2)
    losses, clipped, kls = [], [], []
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            ratio = math.exp(new[i, t].item() - old[i, t].item())
            a = advantages[i, t].item()
            plain, capped = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            losses.append(max(plain, capped))
            clipped.append(float(capped > plain))
            kls.append(0.5 * (new[i, t].item() - old[i, t].item()) ** 2)
    assert loss.item() == pytest.approx(np.mean(losses))
    assert stats["clipfrac"].item() == pytest.approx(np.mean(clipped))
    assert 0 < stats["clipfrac"].item() < 1
    assert stats["approx_kl"].item() == pytest.approx(np.mean(kls))


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage_and_its_gradient_pushes_up_good_tokens():
    draw, mask = padded_batch(5)
    old, advantages = draw(), draw()
    new = old.clone().requires_grad_(True)
    loss, stats = core.policy_loss(new, old, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-np.mean(real_values(advantages)))
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0
    loss.backward()
    assert torch.all((new.grad * advantages)[mask == 1] < 0)  # descending raises log-probs where A > 0


def test_clipped_value_loss_matches_a_token_loop():
    draw, mask = padded_batch(6)
    old, returns = draw(), draw()
    values = old + draw()
    loss, clipfrac = core.value_loss(values, old, returns, mask, cliprange_value=0.2)
    losses, clipped = [], []
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            v, o, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
            capped = o + min(max(v - o, -0.2), 0.2)
            losses.append(0.5 * max((v - r) ** 2, (capped - r) ** 2))
            clipped.append(float((capped - r) ** 2 > (v - r) ** 2))
    assert loss.item() == pytest.approx(np.mean(losses))
    assert clipfrac.item() == pytest.approx(np.mean(clipped))


def test_entropy_and_token_logprobs_match_the_softmax_definitions():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    tokens = torch.tensor([[0, 6, 3], [2, 2, 5]])
    entropy = core.entropy_from_logits(logits)
    logprobs = core.token_logprobs(logits, tokens)
    for i in range(2):
        for t in range(3):
            row = logits[i, t].tolist()
            z = sum(math.exp(x) for x in row)
            probabilities = [math.exp(x) / z for x in row]
            assert entropy[i, t].item() == pytest.approx(-sum(p * math.log(p) for p in probabilities))
            assert logprobs[i, t].item() == pytest.approx(math.log(probabilities[tokens[i, t]]), abs=1e-6)


def test_adaptive_kl_controller_follows_ziegler_and_fixed_one_stays_put():
    controller = core.kl_controller(0.1, target_kl=6.0, horizon=10000)
    controller.update(current_kl=9.0, n_steps=256)  # error +0.5 clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    controller.update(current_kl=5.4, n_steps=256)  # error -0.1
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 256 / 10000))
    restored = core.kl_controller(0.1, 6.0, 10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    fixed = core.kl_controller(0.05, target_kl=None, horizon=10000)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


def test_running_moments_equal_the_moments_of_all_scores_seen():
    generator = torch.Generator().manual_seed(8)
    batches = [torch.randn(n, generator=generator, dtype=torch.float64) * 3 + 2 for n in (4, 7, 1, 5)]
    moments = core.RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).numpy()
    assert moments.mean == pytest.approx(everything.mean())
    assert moments.std == pytest.approx(everything.std(ddof=1))


def test_score_normalisation_modes_and_clipping():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    assert torch.equal(core.normalise_scores(scores, "none"), scores)
    batch = core.normalise_scores(scores, "batch")
    assert batch.mean().item() == pytest.approx(0, abs=1e-9) and batch.std().item() == pytest.approx(1)
    running = core.RunningMoments()
    first = core.normalise_scores(scores, "running", running)
    assert first.tolist() == pytest.approx(((scores - scores.mean()) / scores.std()).tolist())
    assert core.clip_scores(first * 10, 2.0).abs().max().item() == 2.0
    assert torch.equal(core.clip_scores(scores, None), scores)
