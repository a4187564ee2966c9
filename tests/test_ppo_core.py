"""Each piece of PPO against a straightforward reference computation: plain Python loops over rows and real
tokens, written from the formulas, never sharing code with `medgpt.rl.ppo_core`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medgpt.rl import advantages as estimators
from medgpt.rl import ppo_core as core
from medgpt.rl.token_stats import LogitTransform, token_stats

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
    whitened = estimators.global_whiten(values, mask)
    assert real_values(whitened) == pytest.approx(list((real - real.mean()) / math.sqrt(real.var(ddof=1) + 1e-8)))
    assert whitened[mask == 0].abs().max() == 0
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


def test_value_loss_without_clipping_is_half_the_squared_error():
    draw, mask = padded_batch(6)
    old, returns = draw(), draw()
    values = old + 3 * draw()  # far outside any clip range
    loss, clipfrac = core.value_loss(values, old, returns, mask, cliprange_value=None)
    expected = np.mean([0.5 * (values[i, t].item() - returns[i, t].item()) ** 2
                        for i, n in enumerate(LENGTHS) for t in range(n)])
    assert loss.item() == pytest.approx(expected) and clipfrac.item() == 0


@pytest.mark.parametrize("chunk_size", [1, 3, 256])
def test_chunked_token_stats_match_the_softmax_definitions(chunk_size):
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    head = torch.nn.Linear(5, 7, bias=False).double()
    tokens = torch.tensor([[0, 6, 3], [2, 2, 5]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    transform = LogitTransform(temperature=0.7, softcap=2.0)
    logprobs, entropy = token_stats(hidden, tokens, mask, head, transform, "value", chunk_size=chunk_size)
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                assert logprobs[i, t] == 0 and entropy[i, t] == 0
                continue
            row = [math.tanh(x / 2.0) * 2.0 / 0.7 for x in head(hidden[i, t]).tolist()]
            z = sum(math.exp(x) for x in row)
            probabilities = [math.exp(x) / z for x in row]
            assert entropy[i, t].item() == pytest.approx(-sum(p * math.log(p) for p in probabilities), abs=1e-6)
            assert logprobs[i, t].item() == pytest.approx(math.log(probabilities[tokens[i, t]]), abs=1e-6)


def test_chunked_token_stats_gradients_equal_full_logits_and_entropy_grad_only_when_asked():
    generator = torch.Generator().manual_seed(9)
    hidden = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
    head = torch.nn.Linear(6, 11, bias=False).double()
    tokens = torch.randint(0, 11, (3, 4), generator=generator)
    mask = torch.tensor([[1.0] * 4, [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    weights = torch.randn(3, 4, generator=generator, dtype=torch.float64)

    def gradients(chunked: bool, with_entropy: bool):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        if chunked:
            lp, ent = token_stats(h, tokens, mask, head, LogitTransform(), "grad" if with_entropy else "none", 2)
        else:
            logits = head(h).log_softmax(-1)
            lp = logits.gather(-1, tokens[..., None])[..., 0] * mask
            ent = -(logits.exp() * logits).sum(-1) * mask
        loss = (lp * weights).sum() + (ent.sum() if with_entropy else 0)
        loss.backward()
        return h.grad.clone(), head.weight.grad.clone()

    for with_entropy in (False, True):
        for a, b in zip(gradients(True, with_entropy), gradients(False, with_entropy)):
            assert torch.allclose(a, b, atol=1e-10)
    h = hidden.clone().requires_grad_(True)
    _, entropy = token_stats(h, tokens, mask, head, LogitTransform(), "value")
    assert not entropy.requires_grad and entropy[mask == 1].min() > 0
    _, nothing = token_stats(h, tokens, mask, head, LogitTransform(), "none")
    assert nothing.abs().sum() == 0


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


# ------------------------------------------------------------------------------------------------ estimators


GROUP_REWARDS = [1.0, 2.0, 4.0, 0.5, 0.5, 0.5, 3.0, -1.0, 7.0]  # three prompts x three replies
GROUP_VALID = [True, True, True, True, True, True, True, True, False]  # the last reply: no reward applied


def test_grpo_advantages_are_group_standardised_over_valid_replies():
    rewards, valid = torch.tensor(GROUP_REWARDS, dtype=torch.float64), torch.tensor(GROUP_VALID)
    advantages = estimators.group_advantages(rewards, valid, 3, "grpo")
    expected = []
    for g in range(3):
        kept = [GROUP_REWARDS[3 * g + k] for k in range(3) if GROUP_VALID[3 * g + k]]
        mean = sum(kept) / len(kept)
        std = math.sqrt(sum((x - mean) ** 2 for x in kept) / (len(kept) - 1))
        for k in range(3):
            ok = GROUP_VALID[3 * g + k]
            expected.append((GROUP_REWARDS[3 * g + k] - mean) / (std + 1e-4) if ok else 0.0)
    assert advantages.tolist() == pytest.approx(expected)
    assert advantages[3:6].abs().max() == 0  # a flat group teaches nothing
    assert advantages[6].item() == pytest.approx(2 / (math.sqrt(8) + 1e-4))  # (3 - 1) / std of {3, -1}


def test_rloo_advantages_use_the_mean_of_the_other_valid_replies():
    rewards, valid = torch.tensor(GROUP_REWARDS, dtype=torch.float64), torch.tensor(GROUP_VALID)
    advantages = estimators.group_advantages(rewards, valid, 3, "rloo")
    expected = []
    for i, r in enumerate(GROUP_REWARDS):
        g = i // 3
        others = [GROUP_REWARDS[j] for j in range(3 * g, 3 * g + 3) if j != i and GROUP_VALID[j]]
        expected.append(r - sum(others) / len(others) if GROUP_VALID[i] else 0.0)
    assert advantages.tolist() == pytest.approx(expected)
    assert advantages[:3].tolist() == pytest.approx([1 - 3, 2 - 2.5, 4 - 1.5])


def test_group_estimators_broadcast_the_reply_advantage_and_rloo_pays_the_kl_in_the_reward():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.tensor([[0.5, 0.5, 9.0], [1.0, 1.0, 1.0]])  # padding's 9 must not count
    scores, valid = torch.tensor([1.0, 1.0]), torch.tensor([True, True])
    rloo, returns = estimators.estimate("rloo", scores, kl, 0.1, mask, valid, group_size=2)
    assert returns is None
    expected = torch.tensor([[0.2, 0.2, 0.0], [-0.2, -0.2, -0.2]])  # (1 - 0.1) - (1 - 0.3) = 0.2
    assert torch.allclose(rloo.float(), expected, atol=1e-6)
    grpo, _ = estimators.estimate("grpo", scores, kl, 0.1, mask, valid, group_size=2)
    assert grpo.abs().max() == 0  # GRPO's KL is a loss term, not part of the reward


def test_reinforce_pp_whitens_the_return_to_go_of_the_per_token_rewards():
    draw, mask = padded_batch(11)
    kl = draw() * mask
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    gamma, coef = 0.9, 0.1
    advantages, returns = estimators.estimate("reinforce_pp", scores, kl, coef, mask, torch.ones(4, dtype=torch.bool),
                                              gamma=gamma)
    assert returns is None
    to_go = []
    for i, n in enumerate(LENGTHS):
        rewards = [-coef * kl[i, t].item() + (scores[i].item() if t == n - 1 else 0.0) for t in range(n)]
        to_go += [sum(gamma ** (k - t) * rewards[k] for k in range(t, n)) for t in range(n)]
    to_go = np.array(to_go)
    expected = (to_go - to_go.mean()) / math.sqrt(to_go.var(ddof=1) + 1e-8)
    assert real_values(advantages) == pytest.approx(list(expected))
    assert advantages[mask == 0].abs().max() == 0


def test_gae_estimator_is_whitened_gae_of_the_token_rewards():
    draw, mask = padded_batch(12)
    kl, values = draw() * mask, draw()
    scores = torch.tensor([0.3, 1.0, -1.0, 2.0], dtype=torch.float64)
    advantages, returns = estimators.estimate("gae", scores, kl, 0.05, mask, torch.ones(4, dtype=torch.bool), values,
                                              gamma=1.0, lam=0.9)
    raw, expected_returns = reference_gae(core.token_rewards(scores, kl, 0.05, mask), values, 1.0, 0.9)
    real = np.array(real_values(raw))
    assert real_values(advantages) == pytest.approx(list((real - real.mean()) / math.sqrt(real.var(ddof=1) + 1e-8)))
    assert torch.allclose(returns, expected_returns)


def test_explained_variance_is_one_minus_the_residual_share():
    draw, mask = padded_batch(13)
    returns, noise = draw(), draw()
    values = returns + 0.5 * noise
    r, v = np.array(real_values(returns)), np.array(real_values(values))
    assert estimators.explained_variance(values, returns, mask) == pytest.approx(1 - np.var(r - v) / np.var(r))
    assert estimators.explained_variance(returns, returns, mask) == pytest.approx(1.0)


def test_kl_loss_is_the_mean_k3_with_gradients_through_the_policy_only():
    logprobs = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -0.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = core.kl_loss(logprobs, ref, mask)
    k3 = [math.exp(r - l) - 1 - (r - l) for l, r in ((-1.0, -1.2), (-0.5, -0.5))]
    assert loss.item() == pytest.approx(sum(k3) / 2)
    loss.backward()
    assert ref.grad is None and logprobs.grad[0, 2] == 0 and logprobs.grad[0, 0] != 0
