"""export.py and --init-adapters: our adapters read by peft and transformers, anyone's peft adapters read by us.
peft (from bench/requirements.txt) is imported here only, to check what we write against the real reader."""
import json

import pytest
import torch

import checkpoints
import export
import lora
import models
import train
from conftest import gpt2_tokenizer, tiny_gpt2, tiny_llama

H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory, tiny_gpt2_dir):
    """A local model folder of a tiny random GPT-2 (Conv1D) or Llama (nn.Linear), with GPT-2's tokenizer."""
    if request.param == "gpt2":
        return tiny_gpt2_dir
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=50257).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    rows = [{"chosen": f"{H} Tell me about topic {i}.{A} Gladly, here it is.", "rejected": f"{H} Tell me about topic {i}.{A} No."}
            for i in range(12)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def trained_checkpoint(folder, data_file, model_dir, **settings) -> str:
    """A real checkpoint of train.py, its adapters then set to random values, so that they matter."""
    train.train(train.TrainConfig(data=data_file, model=model_dir, dtype="float32", val_size=4, test_size=4, max_length=48,
                                  max_prompt_length=24, batch_size=2, max_steps=1, checkpoint_dir=str(folder),
                                  progress=False, **settings))
    path = folder / "best.pt"
    checkpoint = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    checkpoint["adapters"] = {name: torch.randn(t.shape, generator=generator) * 0.1 for name, t in checkpoint["adapters"].items()}
    torch.save(checkpoint, path)
    return str(path)


IDS = torch.tensor([[50256, 15496, 11, 703, 389, 345, 30, 314, 716, 3734]])  # "Hello, how are you? I am fine"


def our_logits(checkpoint_path):
    model, _ = checkpoints.load_policy(checkpoints.load_checkpoint(checkpoint_path))
    with torch.no_grad():
        return model(IDS).logits


def test_peft_reads_our_adapter_folder_to_the_same_logits(tmp_path, data_file, model_dir):
    from peft import PeftModel
    checkpoint = trained_checkpoint(tmp_path / "run", data_file, model_dir)
    assert export.main([checkpoint, "--peft", str(tmp_path / "peft")]) == 0
    settings = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert settings["fan_in_fan_out"] == (model_dir.find("llama") < 0) and settings["r"] == 8
    base, _ = models.load_model_and_tokenizer(model_dir)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    ours = our_logits(checkpoint)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        assert not torch.allclose(peft_model(IDS).logits, ours, atol=1e-3)  # the adapters are what made it equal


def test_transformers_reads_our_merged_folder_to_the_same_logits(tmp_path, data_file, model_dir):
    from transformers import AutoModelForCausalLM
    sft = trained_checkpoint(tmp_path / "sft", data_file, model_dir, loss_type="sft")
    checkpoint = trained_checkpoint(tmp_path / "dpo", data_file, "gpt2", sft_checkpoint=sft)  # after an SFT stage
    assert export.main([checkpoint, "--merged", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not [name for name, _ in merged.named_parameters() if "lora" in name]
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, our_logits(checkpoint), rtol=0, atol=1e-5)
    assert export.main([checkpoint, "--peft", str(tmp_path / "peft")]) == 2  # its adapters need the SFT model


def test_training_starts_from_a_peft_folder_ours_or_peft_made(tmp_path, data_file, tiny_gpt2_dir):
    """--init-adapters: step 0 of the new run is the exported run's model; a folder peft itself
    wrote (random B, so not the identity) gives peft's own logits."""
    from peft import LoraConfig, get_peft_model
    checkpoint = trained_checkpoint(tmp_path / "first", data_file, tiny_gpt2_dir)
    assert export.main([checkpoint, "--peft", str(tmp_path / "ours")]) == 0
    peft_model = get_peft_model(tiny_gpt2(vocab_size=50257), LoraConfig(
        r=4, lora_alpha=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        peft_logits = peft_model.eval()(IDS).logits
    for folder, expected in (("ours", our_logits(checkpoint)), ("theirs", peft_logits)):
        run = tmp_path / f"from-{folder}"
        train.train(train.TrainConfig(data=data_file, model=tiny_gpt2_dir, dtype="float32", val_size=4, test_size=4, max_length=48,
                                      max_prompt_length=24, batch_size=2, max_steps=1, lr=1e-9, checkpoint_dir=str(run),
                                      progress=False, init_adapters=str(tmp_path / folder)))
        last = checkpoints.load_checkpoint(str(run / "last.pt"))
        model, _ = checkpoints.load_policy(last)
        with torch.no_grad():
            torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-4)  # lr 1e-9: one step moves nothing
    assert (last["lora"]["r"], last["lora"]["alpha"], last["lora"]["targets"]) == (4, 12.0, ["c_attn", "c_fc"])


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora"),
    ({"peft_type": "IA3"}, "peft_type IA3, not LORA"),
    ({"rank_pattern": {"c_attn": 2}}, "per-layer ranks"),
])
def test_an_adapter_folder_we_cannot_train_is_refused_in_one_line(tmp_path, change, message):
    model = tiny_gpt2()
    config = lora.LoRAConfig(r=2, targets=("c_attn",))
    lora.add_lora(model, config)
    lora.write_peft_folder(tmp_path, config, lora.adapter_state_dict(model), True, "tiny")
    settings = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**settings, **change}))
    with pytest.raises(ValueError, match=message):
        lora.read_peft_folder(tmp_path)


def test_init_adapters_refuses_a_contradicting_shape_or_another_model(tmp_path, data_file, tiny_gpt2_dir, capsys):
    model = tiny_llama()  # another architecture: its layers are not GPT-2's
    config = lora.LoRAConfig(r=2, targets=("q_proj",))
    lora.add_lora(model, config)
    lora.write_peft_folder(tmp_path / "llama", config, lora.adapter_state_dict(model), False, "tiny-llama")
    argv = ["--data", data_file, "--model", tiny_gpt2_dir, "--val-size", "4", "--test-size", "4", "--max-steps", "1", "--max-length", "48",
            "--max-prompt-length", "24", "--no-progress"]
    assert train.main([*argv, "--init-adapters", str(tmp_path / "llama"), "--lora-r", "4",
                       "--checkpoint-dir", str(tmp_path / "a")]) == 1
    assert "has lora r 2, not 4: drop --lora-r" in capsys.readouterr().err
    assert train.main([*argv, "--init-adapters", str(tmp_path / "llama"), "--lora-targets", "c_attn",
                       "--checkpoint-dir", str(tmp_path / "b")]) == 1
    assert "drop --lora-targets" in capsys.readouterr().err
    assert train.main([*argv, "--init-adapters", str(tmp_path / "llama"), "--checkpoint-dir", str(tmp_path / "c")]) == 1
    assert "no nn.Linear/Conv1D module matches the LoRA targets ['q_proj']" in capsys.readouterr().err
    assert train.main([*argv, "--init-adapters", str(tmp_path / "nothing"), "--checkpoint-dir", str(tmp_path / "d")]) == 2
    assert "is not a peft adapter folder: adapter_config.json is missing" in capsys.readouterr().err
