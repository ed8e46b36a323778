"""The operator kinds: each declared once, its Evo 2 names complete, its decoding equal to its parallel forward,
its cost from the config."""

import math

import pytest
import torch

from sh2.models import OPERATORS, SH2Config, mixer_class, operator_kind, parse_layout
from sh2.models.config import layout_string
from sh2.models.operators import LAYOUT_SYMBOLS, LAYOUT_WORDS, MIXERS, mixer_classes

CFG = dict(hidden_size=32, num_layers=4, layout="SDH*", num_heads=2, mlp_hidden_size=48, se_groups=4, mr_groups=4,
           mr_filter_len=12, mr_ref_len=64)


def test_every_kind_is_declared_once_and_the_layout_reads_its_symbols_and_words():
    assert OPERATORS == ("SE", "MR", "LI", "MHA")
    kinds = [cls.kind for cls in MIXERS.values()]
    assert [k.name for k in kinds] == list(OPERATORS)
    assert len({k.symbol for k in kinds}) == 4 and set(LAYOUT_SYMBOLS) == {"S", "D", "H", "*"}
    for kind in kinds:
        assert parse_layout(kind.symbol) == [kind.name]
        for word in (kind.name, *kind.aliases):
            assert LAYOUT_WORDS[word] == kind.name
            assert parse_layout(word.lower()) == [kind.name]
        assert operator_kind(kind.name) is kind and mixer_class(kind.name).kind is kind
    assert layout_string(parse_layout("SE HCM LI ATTN")) == "SDH*"
    assert [cls.kind.name for cls in mixer_classes(["LI", "SE", "LI", "MHA"])] == ["LI", "SE", "MHA"]


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown operator kind 'XL'.*\['SE', 'MR', 'LI', 'MHA'\]"):
        mixer_class("XL")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", OPERATORS)
def test_evo2_tables_name_every_mixer_parameter_exactly_once(name, bias):
    # the checkpoint converters read these tables: a parameter missing here would be missing from every
    # converted checkpoint
    config = SH2Config(**{**CFG, "hyena_out_bias": bias, "attn_out_bias": bias})
    cls = mixer_class(name)
    with torch.device("meta"):
        mixer = cls(config, 0.02)
    declared = [t.sh2 for t in cls.kind.evo2.tensors if t.when is None or getattr(config, t.when)]
    assert sorted(declared) == sorted(mixer.state_dict()), name
    names = cls.kind.evo2
    assert names.vortex_layers.endswith("layer_idxs")
    assert all(size.field in config.to_dict() for size in (*names.vortex_sizes, *names.savanna_sizes))
    assert isinstance(getattr(config, cls.kind.channel_groups), int)


def _mixer(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = SH2Config(**CFG)
    mixer = mixer_class(name)(config, 0.3).double()
    with torch.no_grad():  # visible filters, skips and biases (init leaves MR taps ~1e-5, skips at 1)
        for pname, p in mixer.named_parameters():
            if pname in ("filter.h", "filter.R") or pname.endswith("bias"):
                p.normal_(0, 0.3)
            elif pname == "skip":
                p.normal_()
    return mixer


@pytest.mark.parametrize("name", OPERATORS)
def test_each_kind_continues_its_prefill_step_by_step_like_its_parallel_forward(name):
    mixer = _mixer(name)
    x = torch.randn(2, 14, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = mixer(x)
        assert torch.equal(mixer.prefill(x, positions=torch.arange(14))[0], full)  # the parallel forward itself
        out, state = mixer.prefill(x[:, :9], positions=torch.arange(9), capacity=14)
    # float64 throughout: a shorter prompt and the recurrences reorder sums of ~1e-1 terms, so 1e-12 is rounding,
    # far below any error of method (a wrong tap or pole shows at 1e-2). LI's parallel path builds its filter
    # in fp32 by design (fp32 poles and residues) while its recurrence powers the poles in float64: ~1e-10 here.
    atol = 1e-8 if name == "LI" else 1e-12
    torch.testing.assert_close(out, full[:, :9], rtol=0, atol=1e-12)
    for t in range(9, 14):
        y = mixer.step(x[:, t:t + 1], state, position=torch.full((2,), t))
        torch.testing.assert_close(y[:, 0], full[:, t], rtol=0, atol=atol)


@pytest.mark.parametrize("name", OPERATORS)
def test_state_select_keeps_the_chosen_rows(name):
    mixer = _mixer(name)
    x = torch.randn(3, 10, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, state = mixer.prefill(x[:, :9], positions=torch.arange(9), capacity=10)
        _, alone = mixer.prefill(x[[2, 0], :9], positions=torch.arange(9), capacity=10)
    state.select(torch.tensor([2, 0]))
    y = mixer.step(x[[2, 0], 9:], state, position=torch.full((2,), 9))
    # equal up to float64 rounding: a batch of 3 and a batch of 2 may take different BLAS paths
    torch.testing.assert_close(y, mixer.step(x[[2, 0], 9:], alone, position=torch.full((2,), 9)), rtol=0, atol=1e-13)


def test_flops_per_token_follow_from_the_config():
    config = SH2Config(**CFG)
    D, L, Kf = 32, 64, config.featurizer_len
    hyena = {"projections": 2 * D * 3 * D + 2 * D * D, "featurizer": 2 * 3 * D * Kf}
    n = 2 * L
    fft = (2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / L  # rfft + irfft of size 2L, spectrum product
    assert mixer_class("SE").flops_per_token(config, L) == {**hyena, "mixer": D * (2 * 7 + 4)}
    assert mixer_class("MR").flops_per_token(config, L) == {**hyena, "mixer": D * (2 * 12 + 4)}
    N = config.li_state_size  # modal recurrence: a multiply-add per pole for the state and for the readout
    assert mixer_class("LI").flops_per_token(config, L) == {**hyena, "mixer": D * (4 * N + 4)}
    fft_config = SH2Config(**{**CFG, "li_algorithm": "fft"})
    assert mixer_class("LI").flops_per_token(fft_config, L) == pytest.approx({**hyena, "mixer": D * (fft + 4)})
    assert mixer_class("MHA").flops_per_token(config, L) == {"projections": 2 * D * 3 * D + 2 * D * D,
                                                             "mixer": 2 * L * D}


def test_context_window_and_working_set_by_kind():
    config = SH2Config(**CFG)
    assert [mixer_class(n).context_window(config) for n in OPERATORS] == [7, 12, None, None]
    # the measured coefficients: the LI block's fp32 FFT convolution costs most; its recurrence keeps no fp32
    # sequence-length buffers and is taken as a Hyena block's
    assert [mixer_class(n).block_working_set(config) for n in OPERATORS] == [49.7, 49.7, 49.7, 49.7]
    fft_config = SH2Config(**{**CFG, "li_algorithm": "fft"})
    assert mixer_class("LI").block_working_set(fft_config) == 91.6

