"""Properties of lora.py on real transformers architectures (tiny random GPT-2 and Llama)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora
from conftest import FAMILIES, tiny_gpt2, tiny_llama, tiny_phimoe

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def inputs(seed=1, batch=2, length=10, vocab=64):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_B(model, seed=2):
    """B starts at zero; give it values so the adapters actually change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", MODELS)
def test_output_equals_base_model_at_init_exactly(arch):
    base, adapted = MODELS[arch](), MODELS[arch]()
    lora.add_lora(adapted, lora.LoRAConfig(r=4))
    ids = inputs()
    assert torch.equal(base(ids).logits, adapted(ids).logits)


@pytest.mark.parametrize("arch", MODELS)
def test_adapters_off_is_the_base_model_exactly(arch):
    base, adapted = MODELS[arch](), MODELS[arch]()
    lora.add_lora(adapted, lora.LoRAConfig(r=4))
    randomise_B(adapted)
    ids = inputs()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, adapted(ids).logits)
        with lora.adapters_disabled(adapted):
            assert torch.equal(base(ids).logits, adapted(ids).logits)
        assert not torch.allclose(base(ids).logits, adapted(ids).logits)  # switched back on


@pytest.mark.parametrize("arch", MODELS)
def test_merged_equals_unmerged_and_unmerge_restores_weights(arch):
    model = MODELS[arch]()
    lora.add_lora(model, lora.LoRAConfig(r=4, alpha=8))
    randomise_B(model)
    ids = inputs()
    weights_before = {n: p.clone() for n, p in model.named_parameters() if "lora" not in n}
    with torch.no_grad():
        unmerged = model(ids).logits
        lora.merge_adapters(model)
        merged = model(ids).logits
        lora.unmerge_adapters(model)
        again = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if "lora" not in name:
            torch.testing.assert_close(param, weights_before[name], rtol=0, atol=1e-6)


def test_merged_adapters_cannot_be_switched_off():
    model = tiny_gpt2()
    lora.add_lora(model, lora.LoRAConfig(r=2))
    lora.merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lora.adapters_disabled(model):
            pass


@pytest.mark.parametrize("arch", MODELS)
def test_only_A_and_B_require_grad(arch):
    model = MODELS[arch]()
    lora.add_lora(model, lora.LoRAConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(list(MODELS)), st.integers(1, 8))
def test_trainable_count_is_r_times_in_plus_out_per_layer(arch, r):
    model = MODELS[arch]()
    total_before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    expected = 0
    targets = lora.default_targets(model)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            in_f, out_f = (module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1])
            expected += r * (in_f + out_f)
    trainable, total = lora.add_lora(model, lora.LoRAConfig(r=r))
    assert trainable == expected
    assert total == total_before + expected


def test_default_targets_by_name_for_known_families_and_by_module_type_for_others():
    llama_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert lora.default_targets(tiny_gpt2()) == ("c_attn", "c_proj", "c_fc")
    assert lora.default_targets(FAMILIES["llama"]()) == lora.default_targets(FAMILIES["qwen2"]()) == llama_names
    assert lora.known_targets(FAMILIES["gpt_neox"]()) is None
    assert lora.default_targets(FAMILIES["gpt_neox"]()) == ("dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value")
    assert lora.default_targets(FAMILIES["opt"]()) == ("fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj")
    with pytest.raises(ValueError, match="no linear layer inside numbered transformer blocks"):
        lora.default_targets(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_the_base_model_at_init_and_with_adapters_off(family):
    """Whatever the targets were chosen by: exact at init, exact when off, every linear layer of the
    blocks adapted, and never the embeddings or the output layer."""
    base, adapted = FAMILIES[family](), FAMILIES[family]()
    lora.add_lora(adapted, lora.LoRAConfig(r=4))
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(base(ids).logits, adapted(ids).logits)
        randomise_B(adapted)
        assert not torch.allclose(base(ids).logits, adapted(ids).logits)
        with lora.adapters_disabled(adapted):
            assert torch.equal(base(ids).logits, adapted(ids).logits)
    wrapped = {name for name, _ in lora.lora_layers(adapted)}
    block_linears = {name for name, m in base.named_modules()
                     if isinstance(m, (nn.Linear, Conv1D)) and (".layers." in name or ".h." in name)}
    assert wrapped == block_linears and adapted.get_output_embeddings() not in [m.base for _, m in lora.lora_layers(adapted)]


def test_layers_that_do_not_return_one_tensor_take_no_adapter_by_default_and_are_refused_by_name():
    """PhiMoE's router is an nn.Linear whose forward returns routing weights and expert indices:
    chosen by module type it was wrapped, and LoRA's B A x added to a tuple ended the run in a
    traceback. What a layer returns decides, measured on it: left out (and why), or, named as a
    target, one clear error."""
    model = tiny_phimoe()
    targets, left_out = lora.block_linear_targets(model)
    assert targets == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert set(left_out) == {"router"} and "returns a tuple" in left_out["router"]
    adapted, base = tiny_phimoe(), tiny_phimoe()
    lora.add_lora(adapted, lora.LoRAConfig(r=4))  # the defaults: block_linear_targets
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(base(ids).logits, adapted(ids).logits)
    with pytest.raises(ValueError, match=r"LoRA target model\.layers\.0\.mlp\.router is a PhimoeTopKRouter whose "
                                         r"forward returns a tuple.*leave 'router' out of the targets"):
        lora.add_lora(tiny_phimoe(), lora.LoRAConfig(r=4, targets=("q_proj", "router")))
    with pytest.raises(ValueError, match=r"LoRA target 'experts' names no nn.Linear or Conv1D layer \(only PhimoeExperts\)"):
        lora.add_lora(tiny_phimoe(), lora.LoRAConfig(r=4, targets=("q_proj", "experts")))  # not announced as adapted
    with pytest.raises(ValueError, match=r"LoRA target 'q_prj' names no nn.Linear or Conv1D layer \(no layer of that name\)"):
        lora.add_lora(tiny_phimoe(), lora.LoRAConfig(r=4, targets=("q_proj", "q_prj")))
    assert lora.fit(nn.Linear(3, 2)) is None and lora.fit(Conv1D(2, 3)) is None and "not an nn.Linear" in lora.fit(nn.ReLU())


def test_train_mode_leaves_only_the_adapters_dropout_in_train_mode():
    """The base model is the reference: in a run's train mode nothing of it draws random numbers."""
    model = tiny_phimoe()
    lora.add_lora(model, lora.LoRAConfig(r=4, dropout=0.5))
    randomise_B(model)
    lora.train_mode(model)
    assert {m.training for name, m in model.named_modules() if name.endswith(".dropout")} == {True}
    assert not any(m.training for name, m in model.named_modules() if not name.endswith(".dropout"))
    ids = inputs()
    with torch.no_grad(), lora.adapters_disabled(model):  # the reference: the same in train mode, every time
        assert torch.equal(model(ids).logits, model(ids).logits)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # the adapters' dropout still acts


def test_unknown_targets_are_a_clear_error():
    with pytest.raises(ValueError, match="no nn.Linear/Conv1D module matches"):
        lora.add_lora(tiny_gpt2(), lora.LoRAConfig(targets=("q_proj",)))


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(dropout=1.0), dict(dropout=-0.1)])
def test_bad_lora_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        lora.LoRAConfig(**kwargs)


def test_conv1d_and_linear_wrappers_agree():
    """The same W, stored in both layouts, gives the same adapted output and merge."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    conv = Conv1D(5, 6)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    a, b = lora.LoRALayer(linear, 3, 6.0, 0.0), lora.LoRALayer(conv, 3, 6.0, 0.0)
    with torch.no_grad():
        b.lora_A.copy_(a.lora_A)
        a.lora_B.normal_()
        b.lora_B.copy_(a.lora_B)
    x = torch.randn(4, 6)
    torch.testing.assert_close(a(x), b(x))
    a.merge(), b.merge()
    torch.testing.assert_close(a.base.weight, b.base.weight.T)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("arch", MODELS)
def test_save_and_load_round_trip_bit_exactly(arch, tmp_path):
    model = MODELS[arch](seed=0)
    config = lora.LoRAConfig(r=4, alpha=8, targets=lora.default_targets(model))
    lora.add_lora(model, config)
    randomise_B(model)
    path = tmp_path / "adapters.pt"
    torch.save({"lora": lora.lora_config_dict(config), "adapters": lora.adapter_state_dict(model)}, path)

    saved = torch.load(path, weights_only=True)
    fresh = MODELS[arch](seed=0)
    lora.add_lora(fresh, lora.LoRAConfig(**{**saved["lora"], "targets": tuple(saved["lora"]["targets"])}))
    lora.load_adapter_state_dict(fresh, saved["adapters"])
    for name, tensor in lora.adapter_state_dict(model).items():
        assert torch.equal(tensor, lora.adapter_state_dict(fresh)[name])
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_adapters_of_another_shape_are_refused():
    model, other = tiny_gpt2(), tiny_gpt2()
    lora.add_lora(model, lora.LoRAConfig(r=4))
    lora.add_lora(other, lora.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapter_state_dict(model, lora.adapter_state_dict(other))
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_adapter_state_dict(model, {"x.lora_A": torch.zeros(1)})


@pytest.mark.parametrize("arch", MODELS)
def test_a_training_step_changes_only_A_and_B(arch):
    model = MODELS[arch]()
    lora.add_lora(model, lora.LoRAConfig(r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs()
    for _ in range(2):  # B is zero at the first step, so A's gradient is zero then; two steps move both
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == name.endswith((".lora_A", ".lora_B")), name


def test_lora_dropout_is_active_only_in_train_mode():
    model = tiny_gpt2()
    lora.add_lora(model, lora.LoRAConfig(r=4, dropout=0.5))
    randomise_B(model)
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # eval: deterministic
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_adapters_leave_plain_modules_holding_w0_plus_the_update_rounded_once(arch, dtype):
    """fold_adapters: W0 + (alpha/r) B A summed in fp32, rounded once to the weight's dtype, and the
    wrapper gone, so that new adapters can go on top (DPO after SFT)."""
    model = MODELS[arch]().to(dtype)
    lora.add_lora(model, lora.LoRAConfig(r=4, alpha=8))
    randomise_B(model)
    expected = {name: (layer.base.weight.float() + layer.delta_weight()).to(dtype) for name, layer in lora.lora_layers(model)}
    with torch.no_grad():
        unmerged = model(inputs()).logits.float()
    lora.fold_adapters(model)
    assert not list(lora.lora_layers(model))
    assert all(torch.equal(model.get_submodule(name).weight, weight) for name, weight in expected.items())
    with torch.no_grad():
        folded = model(inputs()).logits.float()
    tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bf16: the merged weights lose what is below their precision
    torch.testing.assert_close(folded, unmerged, rtol=0, atol=tolerance)
    lora.add_lora(model, lora.LoRAConfig(r=2))
    with torch.no_grad():
        assert torch.equal(model(inputs()).logits.float(), folded)  # new adapters start at the folded model
