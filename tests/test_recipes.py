import pytest

from jaxq.recipes import RECIPES, QuantConfig, Recipe, get_recipe

LLAMA_PATHS = [
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
    "model.layers.1.mlp.down_proj", "lm_head",
]


def test_all_ten_recipe_names_exist():
    assert set(RECIPES) == {"fp8", "fp8_rowwise", "fp8_block", "nvfp4", "mxfp4", "w4a16_awq",
                            "w4a8_awq", "w4a16_gptq", "w4a8_gptq"}
    assert QuantConfig.for_recipe("fp8", kv_cache="fp8").kv_cache == "fp8"


def test_overrides_give_variants():
    assert get_recipe("nvfp4", activation="none").weight_only
    assert not get_recipe("nvfp4").weight_only
    assert get_recipe("w4a16_gptq", group_size=64, symmetric=False, act_order=True).group_size == 64
    assert get_recipe("mxfp4", activation="fp8_static").activation == "fp8_static"


@pytest.mark.parametrize("bad, message", [
    (dict(group_size=100), "group_size must be 32, 64, 128"),
    (dict(activation="int8"), "activation='int8'"),
    (dict(act_order=True), "act_order needs algorithm='gptq'"),
])
def test_invalid_fields_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        get_recipe("w4a16_awq", **bad)


def test_unknown_recipe_lists_supported():
    with pytest.raises(ValueError, match="unknown recipe 'int3'.*fp8_block"):
        get_recipe("int3")


def test_default_exclusions_keep_lm_head_and_router():
    config = QuantConfig.for_recipe("fp8")
    assert config.recipe_for("lm_head") is None
    assert config.recipe_for("model.layers.3.mlp.gate") is None
    assert config.recipe_for("model.layers.3.mlp.router") is None
    assert config.recipe_for("model.layers.3.mlp.gate_proj").name == "fp8"


def test_first_matching_rule_wins_and_none_excludes():
    w4 = get_recipe("w4a16_gptq", group_size=64)
    config = QuantConfig(rules=((r"\.down_proj$", None), (r"mlp\.", get_recipe("fp8")),
                                (r".*", w4)))
    plan, unmatched = config.resolve(LLAMA_PATHS)
    assert plan["model.layers.0.mlp.down_proj"] is None
    assert plan["model.layers.0.mlp.gate_proj"].name == "fp8"
    assert plan["model.layers.0.self_attn.q_proj"] == w4
    assert plan["lm_head"] is None
    assert unmatched == [r"(^|\.)embed_tokens$", r"(^|\.)mlp\.gate$", r"(^|\.)router$"]


def test_rules_that_match_nothing_are_reported():
    config = QuantConfig(rules=((r"q_porj", get_recipe("fp8")),))
    _, unmatched = config.resolve(LLAMA_PATHS)
    assert "q_porj" in unmatched


def test_invalid_regex_is_a_clear_error():
    with pytest.raises(ValueError, match=r"invalid module regex '\(q'"):
        QuantConfig(rules=(("(q", None),))


def test_json_round_trip():
    config = QuantConfig(rules=((r"\.o_proj$", None),
                                (r".*", get_recipe("w4a8_gptq", symmetric=False))),
                         kv_cache="fp8", exclusions=(r"lm_head",))
    assert QuantConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        Recipe.from_dict({**get_recipe("fp8").to_dict(), "bits": 8})
