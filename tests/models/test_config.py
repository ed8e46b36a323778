"""SH2Config: presets, layouts, exact parameter counts, and errors that name the field."""

import pytest
import torch

from sh2.models import SH2Config, SH2Model, available_presets, parse_layout
from sh2.models.config import stripe_layout


def expected_parameters(cfg: SH2Config) -> int:
    """Parameter count derived from the published shapes of each operator, independently of the model code."""
    D, F, V = cfg.hidden_size, cfg.mlp_hidden_size, cfg.vocab_size
    per_layer_common = 2 * D + 3 * D * F  # two RMSNorm scales + gated MLP
    hyena_common = 3 * D * D + 3 * D * cfg.featurizer_len + D * D + D  # in, featurizer, out (+bias)
    total = V * D + D  # tied embedding + final norm
    for op in parse_layout(cfg.layout):
        total += per_layer_common
        if op == "SE":
            total += hyena_common + cfg.se_groups * cfg.se_filter_len
        elif op == "MR":
            total += hyena_common + cfg.mr_groups * cfg.mr_filter_len + D
        elif op == "LI":
            total += hyena_common + 3 * D * cfg.li_state_size + D
        else:
            total += 3 * D * D + D * D + D
    return total


@pytest.mark.parametrize("name,approx", [("evo2_1b_8k", 1.108e9), ("evo2_7b_8k", 6.48e9), ("evo2_7b_1m", 6.58e9),
                                         ("evo2_40b_8k", 40.33e9), ("evo2_40b_1m", 41.12e9)])
def test_evo2_presets_build_on_meta_with_exact_parameter_counts(name, approx):
    cfg = SH2Config.from_name(name)
    with torch.device("meta"):
        model = SH2Model(cfg)
    n = model.num_parameters()
    assert n == expected_parameters(cfg)
    assert abs(n - approx) / approx < 2e-3
    assert all(p.is_meta for p in model.parameters())


def test_evo2_7b_layout_is_the_published_stripe():
    assert SH2Config.from_name("evo2_7b_8k").layout == "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*"
    assert SH2Config.from_name("evo2_1b_8k").layout == "SDH*SDHSDH*SDHSDH*SDHSDH*"
    assert stripe_layout(7, (3,)) == "SDH*SDH"


def test_every_preset_and_transformer_variant_builds():
    for name in available_presets():
        cfg = SH2Config.from_name(name)
        assert len(cfg.operators) == cfg.num_layers
        if name.endswith("_transformer"):
            assert set(cfg.operators) == {"MHA"}
            base = SH2Config.from_name(name[: -len("_transformer")])
            assert (cfg.hidden_size, cfg.num_layers) == (base.hidden_size, base.num_layers)


@pytest.mark.parametrize("text,ops", [
    ("SDH*", ["SE", "MR", "LI", "MHA"]),
    ("SE MR LI MHA", ["SE", "MR", "LI", "MHA"]),
    ("se, mr, li, attn", ["SE", "MR", "LI", "MHA"]),
    ("(SDH)x2*", ["SE", "MR", "LI"] * 2 + ["MHA"]),
    ("(SE SE LI)x2 MHA", ["SE", "SE", "LI"] * 2 + ["MHA"]),
    ("*x3", ["MHA"] * 3),
    ("Sx2 H", ["SE", "SE", "LI"]),
])
def test_layout_forms(text, ops):
    assert parse_layout(text) == ops


def test_layout_list_form_and_normalisation():
    cfg = SH2Config(num_layers=4, layout=["SE", "MR", "LI", "MHA"])
    assert cfg.layout == "SDH*"
    assert cfg.operators == ["SE", "MR", "LI", "MHA"]


@pytest.mark.parametrize("changes,field", [
    ({"layout": "SDQ*"}, "layout"),
    ({"layout": "SDH"}, "layout"),  # 3 layers named, 4 configured
    ({"layout": "(SDH*"}, "layout"),
    ({"se_groups": 7}, "se_groups"),
    ({"mr_groups": 5}, "mr_groups"),
    ({"num_heads": 3}, "num_heads"),
    ({"num_kv_heads": 3, "num_heads": 4}, "num_kv_heads"),
    ({"mlp_activation": "relu"}, "mlp_activation"),
    ({"mr_decay": "extreme"}, "mr_decay"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"SH2Config.{field}"):
        SH2Config(**{"hidden_size": 64, "num_heads": 2, "num_layers": 4, "se_groups": 4, "mr_groups": 4,
                     "layout": "SDH*", **changes})


def test_unknown_preset_and_unknown_override():
    with pytest.raises(ValueError, match="unknown preset 'evo3'.*available"):
        SH2Config.from_name("evo3")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hiden_size'\]"):
        SH2Config.from_name("tiny", hiden_size=64)


def test_round_trip_through_dict():
    cfg = SH2Config.from_name("evo2_7b_1m")
    assert SH2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(num_layers=4, layout="SDH*").num_layers == 4
