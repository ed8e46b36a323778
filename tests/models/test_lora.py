"""LoRA layers and parameter groups: the layer's formula, base keys kept, merge equals the adapted model, targets
and groups named in errors, every parameter in exactly one group."""

import math

import pytest
import torch
from torch import nn

from sh2.models import SH2Config, SH2Model
from sh2.models.freeze import GROUPS, freeze_parameters, parameter_roles
from sh2.models.lora import DEFAULT_TARGETS, LoRAConfig, LoRALinear, apply_lora, merge_lora
from sh2.training.finetune import apply_finetuning

SMALL = dict(hidden_size=32, num_heads=2, mlp_hidden_size=48, se_groups=4, mr_groups=4, mr_filter_len=12,
             mr_ref_len=64, num_layers=4, layout="SDH*")


def small_model(seed: int = 0, **kw) -> SH2Model:
    torch.manual_seed(seed)
    return SH2Model(SH2Config(**{**SMALL, **kw})).double()


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero (the adapted model equals the base); give it values so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype) * 0.1)


def test_lora_linear_computes_its_formula_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=True).double()
    layer = LoRALinear(base, rank=3, alpha=6.0)
    assert not layer.lora_B.any()  # the update starts at zero
    randomise_adapters(layer)
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (6.0 / 3) * (x @ A.T @ B.T)  # independent of F.linear and lora_delta
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    # the base parameters are the wrapped layer's own (no copy), the adapters have the documented shapes
    assert layer.weight is W and layer.bias is b
    assert A.shape == (3, 7) and B.shape == (5, 3)
    bound = 1 / math.sqrt(7)  # kaiming_uniform(a=sqrt(5)) on a [r, in] matrix: U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max() <= bound


def test_apply_lora_keeps_every_base_key_and_starts_at_the_base_model():
    model = small_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 512, (2, 24))
    before = model(x)
    adapted = apply_lora(model, LoRAConfig(rank=4))
    state = model.state_dict()
    assert set(base_state) <= set(state)
    assert set(state) - set(base_state) == {f"{p}.{w}" for p in adapted for w in ("lora_A", "lora_B")}
    for k, v in base_state.items():
        assert torch.equal(state[k], v), k
    # every projection and MLP linear of the 4 blocks: Hyena in/out (3 blocks), attention qkv/out, 3 MLP linears
    assert len(adapted) == 3 * 2 + 2 + 4 * 3
    assert {p.rpartition(".")[2] for p in adapted} == set(DEFAULT_TARGETS)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B = 0: exactly the base model
    # the default targets are those of the usual projections that the layout has
    assert apply_lora(small_model(layout="SDH", num_layers=3), LoRAConfig()) == [
        f"blocks.{i}.{m}" for i in range(3) for m in ("mixer.in_proj", "mixer.out_proj", "mlp.w1", "mlp.w2", "mlp.w3")]
    assert apply_lora(model, LoRAConfig(rank=4)) == adapted  # idempotent
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == len(adapted)


def test_merged_model_equals_the_adapted_model():
    model = small_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("in_proj", "qkv", "mlp.w2", "blocks.3.mixer.out_proj")))
    randomise_adapters(model)
    x = torch.randint(0, 512, (2, 24))
    adapted = model(x)
    base_keys = {k for k in model.state_dict() if not k.endswith(("lora_A", "lora_B"))}
    assert merge_lora(model) == 3 + 1 + 4 + 1
    assert set(model.state_dict()) == base_keys and not any(isinstance(m, LoRALinear) for m in model.modules())
    # float64 model: the only difference is the order of the sums, W x + s B (A x) vs (W + s B A) x
    torch.testing.assert_close(model(x), adapted, rtol=1e-10, atol=1e-10)
    # and it differs from the base model by the adapters' update (they did something)
    assert (adapted - small_model()(x)).abs().max() > 1e-3


def test_targets_match_dotted_suffixes_only():
    model = small_model()
    adapted = apply_lora(model, LoRAConfig(targets=("mixer.out_proj", "blocks.0.mlp.w1")))
    assert adapted == ["blocks.0.mixer.out_proj", "blocks.0.mlp.w1", "blocks.1.mixer.out_proj",
                       "blocks.2.mixer.out_proj", "blocks.3.mixer.out_proj"]
    with pytest.raises(ValueError, match="'xer.out_proj' matches no module"):  # whole path components only
        apply_lora(small_model(), LoRAConfig(targets=("xer.out_proj",)))


@pytest.mark.parametrize("target,needle", [
    ("w4", "'w4' matches no module of the model"),
    ("short_filter", "'short_filter' matches no module"),  # a parameter, not a module
    ("filter", "'filter' matches 'blocks.0.mixer.filter', which is a ExplicitFilter, not a linear layer"),
    ("mixer", "which is a HyenaSE, not a linear layer"),
])
def test_a_target_that_matches_no_linear_layer_names_the_setting(target, needle):
    model = small_model()
    with pytest.raises(ValueError, match="model.lora.targets") as err:
        apply_lora(model, LoRAConfig(targets=("w1", target)))
    assert needle in str(err.value)
    assert "['in_proj', 'out_proj', 'w1', 'w2', 'w3', 'qkv']" in str(err.value)  # the names that exist
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # checked before anything changed


@pytest.mark.parametrize("kwargs,needle", [
    ({"rank": 0}, "model.lora.rank must be a positive integer"),
    ({"alpha": -1.0}, "model.lora.alpha must be > 0"),
    ({"dropout": 1.0}, r"model.lora.dropout must be in \[0, 1\)"),
    ({"targets": []}, "model.lora.targets must be a non-empty list"),
])
def test_bad_lora_settings_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LoRAConfig(**kwargs)


def test_lora_settings_from_a_mapping():
    cfg = LoRAConfig.coerce({"rank": 4, "alpha": 4, "targets": ["w1"]})
    assert cfg == LoRAConfig(rank=4, alpha=4, targets=("w1",)) and cfg.scaling == 1.0
    assert LoRAConfig.coerce(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="model.lora.rnak is not a LoRA setting"):
        LoRAConfig.coerce({"rnak": 4})


@pytest.mark.parametrize("preset", ["tiny", "evo2_7b_8k", "evo2_1b_8k_transformer"])
def test_every_parameter_has_exactly_one_group(preset):
    with torch.device("meta"):
        model = SH2Model(SH2Config.from_name(preset))
        apply_lora(model, LoRAConfig())
    roles = parameter_roles(model)  # raises for a parameter no group covers
    assert set(roles) == {n for n, _ in model.named_parameters()}
    hyena = {"hyena_projections", "featurizer", "hyena_filters"}
    assert set(roles.values()) == set(GROUPS) - (hyena if preset.endswith("_transformer") else set())


def test_groups_are_decided_by_module_type():
    model = small_model(tie_embeddings=False)
    apply_lora(model, LoRAConfig(targets=("w1",)))
    roles = parameter_roles(model)
    expected = {  # written out from the architecture: block 0 is SE, block 2 LI, block 3 attention
        "embedding.weight": "embeddings", "lm_head.weight": "embeddings", "norm.scale": "norms",
        "blocks.0.norm_in.scale": "norms", "blocks.0.norm_mlp.scale": "norms",
        "blocks.0.mixer.in_proj.weight": "hyena_projections", "blocks.0.mixer.out_proj.weight": "hyena_projections",
        "blocks.0.mixer.out_proj.bias": "hyena_projections", "blocks.0.mixer.short_filter": "featurizer",
        "blocks.0.mixer.filter.h": "hyena_filters", "blocks.1.mixer.skip": "hyena_filters",
        "blocks.2.mixer.filter.R": "hyena_filters", "blocks.2.mixer.filter.p": "hyena_filters",
        "blocks.3.mixer.qkv.weight": "attention", "blocks.3.mixer.out_proj.weight": "attention",
        "blocks.0.mlp.w1.weight": "mlp", "blocks.3.mlp.w3.weight": "mlp",
        "blocks.0.mlp.w1.lora_A": "adapters", "blocks.3.mlp.w1.lora_B": "adapters",
    }
    for name, group in expected.items():
        assert roles[name] == group, name


def test_freeze_groups_shorthands_and_prefixes():
    model = small_model()
    frozen = freeze_parameters(model, ["hyena", "blocks.3.mlp"])
    roles = parameter_roles(model)
    expected = {n for n, r in roles.items() if r in ("hyena_projections", "featurizer", "hyena_filters")}
    expected |= {n for n in roles if n.startswith("blocks.3.mlp.")}
    assert set(frozen) == expected
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == expected
    with pytest.raises(ValueError, match="model.freeze: 'mlps' is neither a parameter group nor the prefix"):
        freeze_parameters(small_model(), ["mlps"])
    with pytest.raises(ValueError, match="'adapters' cannot be frozen"):
        freeze_parameters(small_model(), ["adapters"])


def test_lora_freezes_the_base_and_freezing_everything_is_refused():
    model = small_model()
    summary = apply_finetuning(model, LoRAConfig(rank=2), None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert summary.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    # LoRA with an explicit list: the norms stay trainable too
    model = small_model()
    apply_finetuning(model, LoRAConfig(rank=2), ["embeddings", "mixers", "mlp"])
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n} == {
        n for n, r in parameter_roles(model).items() if r == "norms"}
    with pytest.raises(ValueError, match=r"model.freeze=\['base'\] freezes every parameter of the model and "
                                         r"model.lora is not set: nothing would train"):
        apply_finetuning(small_model(), None, ["base"])
    with pytest.raises(ValueError, match="model.freeze="):
        apply_finetuning(small_model(), None, ["embeddings", "norms", "mixers", "mlp"])


def test_adapter_dropout_acts_in_training_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).double()
    layer = LoRALinear(base, rank=4, alpha=4.0, dropout=0.5)
    randomise_adapters(layer)
    x = torch.randn(3, 16, dtype=torch.float64)
    plain = x @ base.weight.T + base.bias + x @ layer.lora_A.T @ layer.lora_B.T
    layer.eval()
    torch.testing.assert_close(layer(x), plain, rtol=1e-12, atol=1e-12)
    layer.train()
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)  # the same mask, drawn independently: inverted dropout scales kept inputs by 1 / (1 - p)
    kept = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    expected = x @ base.weight.T + base.bias + (x * kept) @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, plain)
