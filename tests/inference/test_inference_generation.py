"""Cached decoding: prefill equals the parallel forward, step-by-step decoding equals it to fp32 rounding for
every operator type, padded batches equal single prompts, and sampling honours its filters."""

from __future__ import annotations

import pytest
import torch
from inference_models import make_model

import sh2.models.hyena as hyena_mod
from sh2.inference import HyenaCache, alphabet_ids, decode_step, generate, li_prefill_state, prefill, sample_next
from sh2.inference.cache import FIRState
from sh2.models import SH2Config, SH2Model

# Stepwise decoding reorders fp32 sums (FIR dot products, LI recurrence vs FFT): relative error ~1e-6.
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def stepwise_logits(model: SH2Model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits at positions prompt_len-1 .. L-1 from prefill + one decode step per token."""
    logits, cache = prefill(model, ids[:, :prompt_len], max_new_tokens=ids.shape[1] - prompt_len)
    out = [logits[:, -1]]
    for t in range(prompt_len, ids.shape[1]):
        out.append(decode_step(model, ids[:, t], cache))
    return torch.stack(out, 1)


@pytest.mark.parametrize("layout", ["S", "D", "H", "*", "SDH*SD"])
def test_stepwise_decoding_matches_parallel_forward(layout):
    model = make_model(layout)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    steps = stepwise_logits(model, ids, 24)
    assert rel_err(steps, full[:, 23:]) < TOL


def test_tiny_preset_and_gqa_decode_like_the_parallel_forward():
    torch.manual_seed(0)
    for model in (SH2Model(SH2Config.from_name("tiny")).eval(),
                  make_model("*H*", num_heads=4, num_kv_heads=2)):
        ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            full = model(ids)
        assert rel_err(stepwise_logits(model, ids, 5), full[:, 4:]) < TOL


def test_prefill_is_the_parallel_forward_exactly():
    model = make_model("SDH*SD")
    ids = torch.randint(0, 512, (3, 33), generator=torch.Generator().manual_seed(3))
    logits, cache = prefill(model, ids, max_new_tokens=7)
    with torch.no_grad():
        assert torch.equal(logits, model(ids))
    assert cache.layers[3].k.shape[2] == 40  # KV cache sized to prompt + new tokens


def test_li_prefill_state_is_the_recurrence_computed_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 50, 8, dtype=torch.float64, generator=g)
    log_poles = -torch.rand(8, 4, dtype=torch.float64, generator=g) * 0.5
    s = torch.zeros(2, 8, 4, dtype=torch.float64)
    for t in range(50):
        s = torch.exp(log_poles) * s + z[:, t, :, None]
    monkeypatch.setattr(hyena_mod, "_LI_CHUNK_ELEMENTS", 8 * 4 * 7)  # 7-token chunks
    torch.testing.assert_close(li_prefill_state(z, log_poles), s, rtol=1e-12, atol=1e-12)


def left_padded(lengths: tuple[int, ...], new_tokens: int, seed: int
                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random prompts of ``lengths``, their left-padded batch ``(ids, mask)`` and ``new_tokens`` tokens each."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 512, (n,), generator=g) for n in lengths]
    new = torch.randint(2, 512, (len(lengths), new_tokens), generator=g)
    L = max(lengths)
    ids = torch.ones(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = p, 1
    return prompts, ids, mask, new


def test_left_padded_batch_matches_each_prompt_alone():
    model = make_model("SDH*SD")
    prompts, ids, mask, new = left_padded((20, 13, 5), 6, seed=4)
    L = 20
    logits, cache = prefill(model, ids, mask, max_new_tokens=6)
    steps = [decode_step(model, new[:, t], cache) for t in range(6)]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            alone = model(torch.cat([p, new[i]])[None])[0]
        assert rel_err(logits[i, L - len(p):], alone[: len(p)]) < TOL
        assert rel_err(torch.stack([s[i] for s in steps]), alone[len(p):]) < TOL


def test_selecting_samples_of_a_padded_batch_continues_them_unchanged():
    model = make_model("SDH*SD")
    prompts, ids, mask, new = left_padded((7, 12, 4), 4, seed=6)
    _, cache = prefill(model, ids, mask, max_new_tokens=4)
    decode_step(model, new[:, 0], cache)
    keep = torch.tensor([2, 0])  # sample 1 finished
    cache.select(keep)
    steps = [decode_step(model, new[keep, t], cache) for t in range(1, 4)]
    for row, i in enumerate(keep.tolist()):
        with torch.no_grad():
            alone = model(torch.cat([prompts[i], new[i]])[None])[0]
        assert rel_err(torch.stack([s[row] for s in steps]), alone[len(prompts[i]) + 1:]) < TOL


def test_generate_batches_prompts_of_different_lengths():
    model = make_model("SDH*")
    prompts = ["ACGTACGTTTGA", "GGC", "TTAGC"]
    batched = generate(model, prompts, max_new_tokens=10, temperature=0)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=10, temperature=0)
        assert torch.equal(batched.tokens[i], alone.tokens[0])
    assert batched.prompt_lengths == [12, 3, 5]
    dna = generate(model, prompts, max_new_tokens=12, temperature=1.0, top_k=3, top_p=0.9, alphabet="ACGT", seed=7)
    assert all(set(s) <= set("ACGT") and len(s) == 12 for s in dna.sequences)
    again = generate(model, prompts, max_new_tokens=12, temperature=1.0, top_k=3, top_p=0.9, alphabet="ACGT", seed=7)
    assert dna.sequences == again.sequences
    assert bool((dna.logprobs <= 0).all())


def test_generation_stops_at_stop_ids():
    model = make_model("SH")
    first = generate(model, ["ACGT"], max_new_tokens=3, temperature=0).tokens[0, 0].item()
    out = generate(model, ["ACGT"], max_new_tokens=5, temperature=0, stop_ids=[first])
    assert out.tokens[0, 0].item() == first and bool((out.tokens[0, 1:] == 1).all())


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 512, generator=g)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, top_p=1e-6, generator=g), logits.argmax(-1))
    allowed = alphabet_ids("ACGT")
    assert allowed.tolist() == [65, 67, 71, 84]
    draws = torch.stack([sample_next(logits, allowed=allowed, generator=g) for _ in range(50)])
    assert set(draws.unique().tolist()) <= set(allowed.tolist())
    top2 = logits.topk(2, dim=-1).indices
    draws = torch.stack([sample_next(logits, temperature=5.0, top_k=2, generator=g) for _ in range(50)], 1)
    assert bool((draws[..., None] == top2[:, None]).any(-1).all())
    with pytest.raises(ValueError):
        sample_next(logits, top_p=0)
    with pytest.raises(ValueError, match="left-padded"):
        prefill(make_model("S"), torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1]]))


def test_hyena_caches_do_not_keep_prompt_length_tensors_alive():
    """Each Hyena cache entry owns its few columns: a view would pin a [B, L, 3D] tensor per layer."""
    model = make_model("SDH*SD")
    L = 257
    ids = torch.randint(0, 512, (1, L), generator=torch.Generator().manual_seed(5))
    _, cache = prefill(model, ids, max_new_tokens=1)
    hyena = [layer for layer in cache.layers if isinstance(layer, HyenaCache)]
    assert len(hyena) == 5
    for layer in hyena:
        inner = layer.filter.window if isinstance(layer.filter, FIRState) else layer.filter.s
        for name, t in (("featurizer", layer.featurizer), ("filter", inner)):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


def test_generate_upper_cases_string_prompts_by_default_and_refuses_no_tokens():
    model = make_model("SDH*")
    soft = generate(model, ["acgtAC"], max_new_tokens=6, temperature=0)
    upper = generate(model, ["ACGTAC"], max_new_tokens=6, temperature=0, uppercase=False)
    assert torch.equal(soft.tokens, upper.tokens)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got -5"):
        generate(model, ["ACGT"], max_new_tokens=-5)
