import yaml

from ream_modifiers.card import CardInputs, render_card, tool_version

SUMMARY = {
    "experts_per_layer_before": 128,
    "experts_per_layer_after": 96,
    "moe_layers": 48,
    "parameters_before": 30_000_000_000,
    "parameters_after": 23_000_000_000,
    "gib_before": 56.9,
    "gib_after": 12.1,
    "seconds": 3600.0,
}
QUANT = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "strategy": "group",
                "group_size": 128,
                "symmetric": True,
            },
            "input_activations": None,
        }
    },
    "ignore": ["lm_head", "model.layers.0.mlp.gate"],
}
RECIPE = "stage:\n  mods:\n    GPTQModifier:\n      scheme: W4A16\n"


def _inputs(**overrides) -> CardInputs:
    values = dict(
        model="Qwen/Qwen3-30B-A3B",
        output="out/qwen3-ream",
        reports=[
            {
                "method": "REAM",
                "paper": "https://arxiv.org/abs/2604.04356",
                "settings": {"sparsity": 0.25, "merge": "aligned", "ignore": []},
                "layers": {"model.layers.0.mlp": {"kept": [0], "groups": {"0": [1]}}},
            }
        ],
        summary=SUMMARY,
        calibration={
            "rows": {"code": 1536, "general": 614, "math": 922},
            "sources": {"code": "the-stack-smol"},
            "max_seq_length": 512,
        },
        config={"quantization_config": QUANT},
        recipe_yaml=RECIPE,
    )
    return CardInputs(**{**values, **overrides})


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_and_body():
    card = render_card(_inputs(command="ream-compress compress ream_w4a16 ..."))
    assert _front(card) == {
        "base_model": "Qwen/Qwen3-30B-A3B",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": [
            "moe",
            "expert-merging",
            "ream",
            "compressed-tensors",
            "w4a16",
            "llm-compressor",
            "ream-modifiers",
        ],
    }
    for text in (
        "# qwen3-ream\n",
        "| routed experts per MoE layer | 128 | 96 |",
        "| parameters | 30,000,000,000 | 23,000,000,000 |",
        "| size (GiB) | 56.9000 | 12.1000 (21.3%) |",
        '"REAM: Merging Improves Pruning of Experts in LLMs" '
        "([arXiv 2604.04356](https://arxiv.org/abs/2604.04356)); experts merged",
        '`{"merge": "aligned", "sparsity": 0.25}`',
        "`group_0` targets ['Linear']: weights int4, groups of 128, symmetric; "
        "input activations not quantized",
        "(routers included): `lm_head`, `model.layers.0.mlp.gate`",
        "mix of code 1536, general 614, math 922 rows (sources code: "
        "`the-stack-smol`), up to 512 tokens each",
        "vllm serve out/qwen3-ream\n",
        'llm = LLM(model="out/qwen3-ream")',
        "ream-compress compress ream_w4a16 ...",
        f"ream-modifiers {tool_version()}; llmcompressor ",
    ):
        assert text in card, text
    assert "expert_saliency.png" not in card  # no figure was drawn


def test_card_for_pruning_local_model_unquantized_remote_code():
    card = render_card(
        _inputs(
            model="/data/models/my-moe",
            reports=[
                {
                    "method": "AIMER",
                    "paper": "https://arxiv.org/abs/2603.18492",
                    "layers": {"a": {"kept": [0]}},
                }
            ],
            config={},
            recipe_yaml="",
            calibration={"source": "bundled", "rows": 64, "max_seq_length": 128},
            trust_remote_code=True,
            plot=True,
        )
    )
    front = _front(card)
    assert "base_model" not in front  # a path is not a Hub repository ID
    assert front["tags"] == [
        "moe",
        "expert-pruning",
        "aimer",
        "llm-compressor",
        "ream-modifiers",
    ]
    assert "- **Base model:** `/data/models/my-moe`" in card
    assert "experts removed" in card
    assert "- **Quantization:** none" in card
    assert "64 rows of `bundled`, up to 128 tokens each" in card
    assert "vllm serve out/qwen3-ream --trust-remote-code\n" in card
    assert 'LLM(model="out/qwen3-ream", trust_remote_code=True)' in card
    assert "![expert scores per layer](expert_saliency.png)" in card


def test_dern_is_tagged_as_pruning_and_merging():
    card = render_card(
        _inputs(reports=[{"method": "DERN", "layers": {"a": {"kept": [0]}}}])
    )
    tags = _front(card)["tags"]
    assert tags[:4] == ["moe", "expert-merging", "expert-pruning", "dern"]


def test_recipe_yaml_is_parsed_safely(tmp_path):
    marker = tmp_path / "ran"
    recipe = f'scheme: !!python/object/apply:os.system ["touch {marker}"]\n'
    card = render_card(_inputs(recipe_yaml=recipe))
    assert not marker.exists()
    assert "- **Quantization:** custom, compressed-tensors format" in card
