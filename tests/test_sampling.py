"""Device sampling against Hugging Face's own logits processors."""
import pytest
import torch

from vita_kernels.sampling import SamplingParams, process_logits, process_logits_ref, select_next

V = 1000

CASES = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.8),
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, top_k=50),
    SamplingParams(do_sample=True, top_p=0.9),
    SamplingParams(do_sample=True, top_p=0.3, temperature=1.5),
    SamplingParams(do_sample=True, top_k=40, top_p=0.8, temperature=0.9, repetition_penalty=1.2),
    SamplingParams(do_sample=True, top_k=V + 5),
]


def _ids(p: SamplingParams) -> str:
    return f"s{int(p.do_sample)}-t{p.temperature}-k{p.top_k}-p{p.top_p}-r{p.repetition_penalty}"


@pytest.mark.parametrize("params", CASES, ids=_ids)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_logits_equals_transformers(params, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, V, generator=gen) * 3
    prior = torch.randint(0, V, (37,), generator=gen)
    seen = torch.zeros(V, dtype=torch.bool)
    seen[prior] = True
    ours = process_logits(logits, seen, params)
    ref = process_logits_ref(logits, prior, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens filtered"
    kept = ~torch.isinf(ref)
    torch.testing.assert_close(ours[kept], ref[kept], atol=1e-6, rtol=1e-6)
    if params.do_sample and (0 < params.top_k < V or params.top_p < 1):
        assert kept.sum() < kept.numel()  # the filters really removed something


def test_greedy_selection_is_the_penalised_argmax():
    logits = torch.tensor([[1.0, 5.0, 4.9, -2.0]])
    seen = torch.tensor([False, True, False, False])
    assert select_next(logits, seen, SamplingParams(), None).item() == 1
    assert select_next(logits, seen, SamplingParams(repetition_penalty=1.1), None).item() == 2


def test_sampling_follows_the_filtered_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    params = SamplingParams(do_sample=True, top_k=3)
    draws = torch.stack([select_next(logits, torch.zeros(5, dtype=torch.bool), params, gen) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    torch.testing.assert_close(freq[:3], expected, atol=0.03, rtol=0)
    assert freq[3:].sum() == 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="logits must be a"):
        process_logits(torch.zeros(V), torch.zeros(V, dtype=torch.bool), SamplingParams())
    with pytest.raises(ValueError, match="seen must be a"):
        process_logits(torch.zeros(1, V), torch.zeros(V - 1, dtype=torch.bool), SamplingParams())
