import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from glm4voice.llm.sampling import sample_next, uniform


def draws(logits_row, n, temperature=1.0, top_p=1.0, counter=7):
    """Token drawn by n rows holding the same logits and seeds 0..n-1."""
    logits = logits_row.float().expand(n, -1).contiguous()
    return sample_next(
        logits,
        torch.full((n,), temperature),
        torch.full((n,), top_p),
        torch.arange(n, dtype=torch.long) * 7919 + 12345,
        torch.full((n,), counter, dtype=torch.long),
    )


def frequencies(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def test_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    for temperature in (1.0, 0.5):
        expected = torch.softmax(logits / temperature, dim=-1)
        observed = frequencies(draws(logits, 40000, temperature=temperature), 5)
        assert (observed - expected).abs().max() < 0.012, (temperature, observed, expected)


def test_top_p_keeps_the_same_tokens_as_transformers():
    generator = torch.Generator().manual_seed(0)
    for top_p in (0.3, 0.7, 0.9):
        logits = torch.randn(64, generator=generator) * 2
        scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(0.8)(None, logits[None].clone()))[0]
        kept = torch.isfinite(scores)
        tokens = draws(logits, 20000, temperature=0.8, top_p=top_p)
        observed = frequencies(tokens, 64)
        assert kept[tokens].all(), "a token outside the top-p set was drawn"
        expected = torch.softmax(scores, dim=-1)
        assert (observed - expected).abs().max() < 0.015


def test_top_p_edge_cases():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert set(draws(logits, 2000, top_p=0.5).tolist()) == {0}  # the first token already reaches 0.5
    only_two = frequencies(draws(logits, 20000, top_p=0.7), 4)
    assert only_two[2:].sum() == 0 and abs(only_two[0] - 0.5 / 0.8) < 0.015
    assert set(draws(logits, 4000, top_p=1.0).tolist()) == {0, 1, 2, 3}


def test_greedy_rows_and_mixed_batch():
    logits = torch.randn(6, 100)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 1.0])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 1.0, 0.2])
    seeds = torch.arange(6, dtype=torch.long)
    counters = torch.full((6,), 3, dtype=torch.long)
    out = sample_next(logits, temperature, top_p, seeds, counters)
    greedy = temperature == 0
    assert torch.equal(out[greedy], logits.argmax(-1)[greedy])
    # each row's draw does not depend on the other rows of the batch
    for i in range(6):
        alone = sample_next(
            logits[i : i + 1], temperature[i : i + 1], top_p[i : i + 1], seeds[i : i + 1], counters[i : i + 1]
        )
        assert alone.item() == out[i].item()


def test_draws_are_reproducible_and_vary_with_seed_and_counter():
    logits = torch.zeros(1000)  # uniform over 1000 tokens
    a = draws(logits, 64, counter=5)
    assert torch.equal(a, draws(logits, 64, counter=5))
    assert (a != draws(logits, 64, counter=6)).float().mean() > 0.9
    assert len(set(a.tolist())) > 50  # different seeds give different tokens
    seeds = torch.cat([torch.arange(4096), torch.tensor([2**62 + 1, 2**62 + 2, 2**63 - 1])])
    u = uniform(seeds, torch.zeros(seeds.shape[0], dtype=torch.long))
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert len(set(u.tolist())) > 4000  # distinct seeds give distinct draws
    counters = uniform(torch.zeros(4096, dtype=torch.long), torch.arange(4096))
    assert abs(counters.mean().item() - 0.5) < 0.01 and len(set(counters.tolist())) > 4000


def test_top_p_below_float32_range_keeps_the_most_probable_token():
    """A positive top_p such as 1e-50 is 0.0 in float32: the top token is kept (no index -1)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    top_p = torch.tensor([1e-50, 0.0, 1e-50, 1.0], dtype=torch.float32)
    assert top_p[0] == 0
    out = sample_next(logits, torch.ones(4), top_p, torch.arange(4), torch.full((4,), 9))
    torch.testing.assert_close(out[:3], logits[:3].argmax(-1))


def test_draws_are_stable_under_float_noise_in_the_logits():
    # logits computed in another batch or after a prefix-cache hit differ in the last bits; near-ties
    # then swap places in the sorted order, which must not move the other tokens' draws
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1000, generator=generator) * 0.05  # a near-uniform distribution, as tiny models give
    noisy = logits + torch.randn(1000, generator=generator) * 1e-5
    for top_p in (1.0, 0.9):
        a, b = draws(logits, 4096, top_p=top_p), draws(noisy, 4096, top_p=top_p)
        assert (a != b).float().mean() < 0.005, top_p
