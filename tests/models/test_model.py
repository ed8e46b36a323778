"""SH2Model and its operators: causality, filter definitions, activation policy, parameter groups."""

import math

import pytest
import torch
import torch.nn.functional as F

from sh2.models import SH2Config, SH2Model, parameter_groups
from sh2.models.filters import DecayedFilter, ModalFilter
from sh2.strategies import apply_activation_checkpointing

SMALL = dict(hidden_size=32, num_heads=2, mlp_hidden_size=48, se_groups=4, mr_groups=4, mr_filter_len=12,
             mr_ref_len=64)


def small_model(layout: str, seed: int = 0, **kw) -> SH2Model:
    torch.manual_seed(seed)
    cfg = SH2Config(num_layers=len(layout), layout=layout, **{**SMALL, **kw})
    model = SH2Model(cfg).double()
    with torch.no_grad():  # MR taps start ~1e-5; make every operator visibly active for the tests
        for m in model.modules():
            if isinstance(m, DecayedFilter):
                m.h.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("layout", ["S", "D", "H", "*", "SDH*SD"])
def test_changing_future_tokens_never_changes_past_outputs(layout):
    model = small_model(layout)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (2, 40), generator=g)
    y = model(x)
    for t in (0, 7, 23, 39):
        x2 = x.clone()
        x2[:, t:] = torch.randint(0, 512, x2[:, t:].shape, generator=g)
        y2 = model(x2)
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-12)
        if t < 39:
            assert (y2[:, t:] - y[:, t:]).abs().max() > 1e-6


def test_mr_decay_depends_on_reference_length_not_batch_length():
    f = DecayedFilter(groups=4, length=16, decay="weak", ref_len=8192)
    d = f.decay()
    t = torch.arange(16, dtype=torch.float32)
    rates = torch.logspace(-2, 2, 4)
    torch.testing.assert_close(d, torch.exp(-rates[:, None] * t / 8191))
    model = small_model("D")
    mixer = model.blocks[0].mixer
    w1 = mixer.filter.weight().clone()
    model(torch.randint(0, 512, (1, 5)))
    model(torch.randint(0, 512, (1, 50)))
    torch.testing.assert_close(mixer.filter.weight(), w1)


def test_li_filter_matches_closed_form_and_recurrence():
    torch.manual_seed(0)
    f = ModalFilter(channels=3, state_size=4).double()
    L = 12
    h = f.weight(L)
    lam = torch.exp(-torch.exp(f.p) * torch.exp(f.gamma))  # per-token decay in (0, 1)
    assert ((lam > 0) & (lam < 1)).all()
    closed = torch.stack([(f.R * lam ** t).sum(-1) for t in range(L)], dim=-1)
    # the filter is built in fp32 by design: compare at fp32 rounding of terms of size |R| ~ 0.1
    torch.testing.assert_close(h.double(), closed, rtol=0, atol=1e-7)
    # recurrence s_n <- lam_n s_n + z_t ; y_t = sum_n R_n s_n equals the causal convolution with h
    z = torch.randn(3, L, dtype=torch.float64)
    s = torch.zeros(3, 4, dtype=torch.float64)
    rec = []
    for t in range(L):
        s = lam * s + z[:, t:t + 1]
        rec.append((f.R * s).sum(-1))
    rec = torch.stack(rec, dim=-1)
    conv = torch.stack([sum(h[:, j].double() * z[:, t - j] for j in range(t + 1)) for t in range(L)], dim=-1)
    torch.testing.assert_close(rec, conv, rtol=0, atol=1e-7)  # h is fp32 (see above)


def test_li_algorithms_modal_and_fft_are_the_same_model():
    """li_algorithm only changes how LI is computed: same parameters, same logits and gradients (float64)."""
    modal = small_model("SDH*H", li_algorithm="modal")
    fft = SH2Model(modal.config.replace(li_algorithm="fft")).double()
    fft.load_state_dict(modal.state_dict())
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(3))
    out_m, out_f = modal(ids), fft(ids)
    torch.testing.assert_close(out_m, out_f, rtol=1e-10, atol=1e-10)
    out_m.square().mean().backward()
    out_f.square().mean().backward()
    for (name, a), b in zip(modal.named_parameters(), fft.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="SH2Config.li_algorithm: must be one of"):
        modal.config.replace(li_algorithm="scan")


def test_evo2_activation_policy_gelu_only_in_layer_zero():
    model = small_model("SDH*", mlp_activation="evo2")
    assert [b.mlp.use_gelu for b in model.blocks] == [True, False, False, False]
    mlp = model.blocks[1].mlp
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), mlp.w3(mlp.w1(x) * mlp.w2(x)))
    mlp0 = model.blocks[0].mlp
    torch.testing.assert_close(mlp0(x), mlp0.w3(F.gelu(mlp0.w1(x)) * mlp0.w2(x)))
    assert all(b.mlp.use_gelu for b in small_model("SDH*", mlp_activation="gelu").blocks)


def test_rmsnorm_is_the_evo2_form():
    model = small_model("S")
    norm = model.norm
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5)
    x = torch.randn(3, 32, dtype=torch.float64)
    expected = norm.scale * x / (x.norm(dim=-1, keepdim=True) / math.sqrt(32) + 1e-6)
    torch.testing.assert_close(norm(x), expected)


def test_hyena_block_equals_its_equations():
    """Projection -> featurizer -> (q, k, v) -> q * (h * (k v) + D k v) -> out projection."""
    model = small_model("D")
    mixer = model.blocks[0].mixer
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    u = mixer.in_proj(x)
    w = mixer.short_filter
    feat = sum(w[:, s] * F.pad(u, (0, 0, s, 0))[:, :20] for s in range(w.shape[1]))
    q, k, v = feat[..., :32], feat[..., 32:64], feat[..., 64:]  # stream-major rows: post-gate, pre-gate, value
    h = mixer.filter.weight().repeat_interleave(8, dim=0)
    z = k * v
    conv = sum(h[:, s] * F.pad(z, (0, 0, s, 0))[:, :20] for s in range(h.shape[1]))
    expected = mixer.out_proj(q * (conv + mixer.skip * z))
    torch.testing.assert_close(mixer(x), expected)


def test_attention_matches_explicit_softmax_with_rope():
    model = small_model("*", rope_scaling=2.0, rope_base=500.0)
    attn = model.blocks[0].mixer
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(1, 9, 3, 2, 16).unbind(2)
    pos = torch.arange(9, dtype=torch.float64) / 2.0
    inv = 1.0 / 500.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)

    def rot(t):
        return t * ang.cos()[None, :, None] + torch.cat([-t[..., 8:], t[..., :8]], -1) * ang.sin()[None, :, None]

    q, k = rot(q), rot(k)
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / 4.0
    scores = scores.masked_fill(torch.triu(torch.ones(9, 9, dtype=torch.bool), 1), float("-inf"))
    out = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(1, 9, 32)
    torch.testing.assert_close(attn(x), attn.out_proj(out))


def test_meta_build_then_materialise_and_init():
    cfg = SH2Config(num_layers=4, layout="SDH*", **SMALL)
    with torch.device("meta"):
        model = SH2Model(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.blocks[0].norm_in.scale, torch.ones(32))
    assert torch.all(model.blocks[2].mixer.filter.p == -1)
    assert model.blocks[2].mixer.filter.p.dtype == torch.float32
    assert model(torch.randint(0, 512, (1, 8))).shape == (1, 8, 512)


@pytest.mark.parametrize("tied", [True, False])
def test_init_unit_by_unit_equals_whole_model_init(tied):
    # DeepSpeed ZeRO-3 initialises one gathered unit at a time: the same weights for the same seed as
    # init_weights() on the whole model (the meta-device path of FSDP2)
    cfg = SH2Config(num_layers=4, layout="SDH*", tie_embeddings=tied, **SMALL)
    models = []
    for by_unit in (False, True):
        torch.manual_seed(0)
        m = SH2Model(cfg)
        torch.manual_seed(3)
        if by_unit:
            for unit in m.init_units():
                m.init_weights([unit])
        else:
            m.init_weights()
        models.append(m)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    units = models[0].init_units()
    assert sum(p.numel() for u in units for p in u.parameters()) == models[0].num_parameters()


def test_parameter_groups_exclude_norms_biases_filters_featurizer_skip_embeddings():
    model = small_model("SDH*")
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = sorted(names[id(p)] for p in decay["params"])
    no_decay_names = sorted(names[id(p)] for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for n in decay_names:
        assert n.endswith("weight") and ("proj" in n or "qkv" in n or ".mlp.w" in n), n
    for frag in ("embedding.weight", "norm_in.scale", "norm.scale", "out_proj.bias", "mixer.filter.h",
                 "mixer.filter.p", "mixer.filter.gamma", "mixer.filter.R", "mixer.short_filter", "mixer.skip"):
        assert any(frag in n for n in no_decay_names), frag
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_activation_checkpointing_gives_the_same_gradients():
    model = small_model("SDH*")
    x = torch.randint(0, 512, (2, 16))
    model(x).sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model)
    model(x).sum().backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_output_hidden_states_and_position_ids():
    model = small_model("SD*")
    x = torch.randint(0, 512, (1, 10))
    logits, hidden = model(x, output_hidden_states=True)
    assert len(hidden) == 4 and hidden[-1].shape == (1, 10, 32)
    torch.testing.assert_close(model(x, torch.arange(10)), logits)
