"""LoRA, written by hand (no peft).

Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685. A frozen weight W0 (out x in) gets a trainable low-rank update:

    h = W0 x + (alpha / r) * B A x        (Eq. 3, with the alpha/r scaling of Section 4.1)

A (r x in) starts random, B (out x r) starts at zero, so the adapted model starts out
*exactly* equal to the base model. Switching the adapters off gives back the base model,
which is what DPO's reference model is: one network in memory, not two.

The adapters are saved in our checkpoints (adapter_state_dict) and in peft's adapter folder
format (write_peft_folder, read_peft_folder), which the rest of the ecosystem reads; this file
knows that format, not the peft package, and nothing of DPO.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

# Which layers to adapt, by the last part of their module name, for the families we know by name.
DEFAULT_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # attention qkv, attention/MLP output, MLP input
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # also Gemma, Qwen2, Mistral
}


def known_targets(model: nn.Module) -> tuple[str, ...] | None:
    """GPT-2's Conv1D names, or the Llama/Gemma/Qwen2/Mistral projection names, when every layer
    of those names can take an adapter (fit); None for another family."""
    layers = {}
    for name, module in model.named_modules():
        layers.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    for targets in DEFAULT_TARGETS.values():
        if all(name in layers and all(fit(module) is None for module in layers[name]) for name in targets):
            return targets
    return None


def fit(module: nn.Module) -> str | None:
    """None when LoRA can wrap this layer: an nn.Linear or Conv1D whose forward gives one tensor
    of its output size, to which LoRALayer adds B A x. Else what it is instead, in words. Measured
    on the layer itself (a zero input: no random state is touched), not read off its class: a
    subclass may return anything (PhiMoE's router, an nn.Linear, returns routing weights and
    expert indices)."""
    if isinstance(module, nn.Linear):
        in_features, out_features = module.in_features, module.out_features
    elif isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
    else:
        return f"a {type(module).__name__}, not an nn.Linear or Conv1D"
    with torch.no_grad():
        try:
            output = module(torch.zeros(1, in_features, dtype=module.weight.dtype, device=module.weight.device))
        except Exception as error:  # a layer that cannot take a plain input
            return f"a {type(module).__name__} that fails on a plain input ({type(error).__name__})"
    if not isinstance(output, Tensor) or output.shape != (1, out_features):
        what = f"a {type(output).__name__}" if not isinstance(output, Tensor) else f"shape {tuple(output.shape)}"
        return f"a {type(module).__name__} whose forward returns {what}, not one tensor of its {out_features} outputs"
    return None


def block_linear_targets(model: nn.Module) -> tuple[tuple[str, ...], dict[str, str]]:
    """By module type, for any other family: the name of every nn.Linear or Conv1D inside the
    numbered transformer blocks (".../layers.3/...", ".../h.3/...") that can take an adapter
    (fit): attention and MLP projections, never the embeddings or the output layer, which sit
    outside the blocks. Also the names left out, each with why: (targets, {name: why})."""
    names, left_out = set(), {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and re.search(r"\.\d+\.", name):
            short = name.rsplit(".", 1)[-1]
            why = fit(module)
            if why is None:
                names.add(short)
            else:
                left_out[short] = why
    targets = tuple(sorted(names - set(left_out)))  # a name LoRA wraps must fit everywhere it is used
    if not targets:
        raise ValueError("found no linear layer inside numbered transformer blocks that can take an adapter: "
                         "pass the module names to adapt")
    return targets, left_out


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The layers to adapt when none are named: known_targets, else block_linear_targets."""
    return known_targets(model) or block_linear_targets(model)[0]


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8                 # rank of the update B A
    alpha: float = 16.0        # scale: the update is multiplied by alpha / r
    dropout: float = 0.0       # dropout on the adapter's input only (the base model's is off for DPO)
    targets: tuple[str, ...] = ()  # module names to adapt; () means the architecture's defaults

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


class LoRALayer(nn.Module):
    """Wraps one nn.Linear or transformers Conv1D with a low-rank update.

    nn.Linear stores W as (out, in) and computes x W^T; GPT-2's Conv1D stores it
    transposed, (in, out), and computes x W. A and B are the same for both: only merge()
    needs to know the layout.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            in_features, out_features = base.weight.shape  # Conv1D weight: (in, out)
        else:
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D, not {type(base).__name__}")
        self.base = base
        self.scaling = alpha / r
        # A, B in fp32 whatever the base dtype: the optimizer's small updates need it.
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=base.weight.device))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=base.weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises, and loralib
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.train(base.training)  # a new module starts in train mode: follow the model's mode

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # W0 x: (..., out)
        if self.enabled and not self.merged:
            x_in = self.dropout(x).to(self.lora_A.dtype)
            update = (x_in @ self.lora_A.T) @ self.lora_B.T  # (..., r) -> (..., out): B A x
            y = y + (self.scaling * update).to(y.dtype)
        return y

    def delta_weight(self) -> Tensor:
        """(alpha / r) * B A in the base weight's own layout, in fp32."""
        delta = self.scaling * (self.lora_B @ self.lora_A)  # (out, in)
        if isinstance(self.base, Conv1D):
            delta = delta.T  # Conv1D keeps W as (in, out) (docs/PITFALLS.md 12)
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha/r) B A: one matmul per layer at generation time instead of three.
        The sum is taken in fp32 and rounded once to the weight's dtype: adding a bf16-rounded
        update to bf16 weights would round twice (docs/PITFALLS.md 7)."""
        if not self.merged:
            self.base.weight.copy_(self.base.weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.copy_(self.base.weight.float() - self.delta_weight())
            self.merged = False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def add_lora(model: nn.Module, config: LoRAConfig) -> tuple[int, int]:
    """Freeze every weight of the model, then wrap each target module in a LoRALayer.

    Returns (trainable, total) parameter counts. Each adapted layer adds r * (in + out)
    trainable parameters.
    """
    targets = config.targets or default_targets(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    replaced = 0
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, (nn.Linear, Conv1D)):
            if (why := fit(module)) is not None:
                raise ValueError(f"LoRA target {name} is {why}: LoRA adds B A x to one tensor; leave "
                                 f"{name.rsplit('.', 1)[-1]!r} out of the targets")
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, LoRALayer(module, config.r, config.alpha, config.dropout))
            replaced += 1
    if replaced == 0:
        raise ValueError(f"no nn.Linear/Conv1D module matches the LoRA targets {list(targets)}")
    adapted = {name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)}
    for target in targets:
        if target not in adapted:  # a name that adapts nothing would be announced as adapted
            others = sorted({type(module).__name__ for name, module in model.named_modules()
                             if name.rsplit(".", 1)[-1] == target})
            raise ValueError(f"LoRA target {target!r} names no nn.Linear or Conv1D layer"
                             + (f" (only {', '.join(others)})" if others else " (no layer of that name)"))
    return count_parameters(model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights counted once."""
    parameters = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def train_mode(model: nn.Module) -> nn.Module:
    """The mode a run trains in: the adapters' own dropout on, everything else in eval mode.

    The base model is the reference (adapters off), so nothing in it may draw random numbers
    while the policy trains: not dropout only, which disable_dropout zeroes, but anything a
    family does in train mode (OPT's layerdrop skips whole layers, PhiMoE jitters its router's
    input and samples its experts). The reference log-probs are cached once, so a random base
    would make them one random draw and the step-0 loss other than log 2 (docs/PITFALLS.md 20)."""
    model.eval()
    for _, layer in lora_layers(model):
        layer.dropout.train()
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside this block the model IS the base model: DPO's reference, with no second copy."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters are merged into the weights: unmerge before switching them off")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, was_enabled in zip(layers, previous):
            layer.enabled = was_enabled


@contextlib.contextmanager
def adapters_merged(model: nn.Module) -> Iterator[None]:
    """Inside this block W = W0 + (alpha/r) B A in every adapted layer: one matmul per layer,
    for generation. The weights are restored on leaving."""
    merge_adapters(model)
    try:
        yield
    finally:
        unmerge_adapters(model)


def merge_adapters(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def fold_adapters(model: nn.Module) -> None:
    """Merge every adapter into its base weight for good and put the plain base module back
    in its place: the model is then an ordinary model again (its weights W0 + (alpha/r) B A),
    on which new adapters can be added. How an SFT stage's result becomes DPO's starting
    policy and reference, with no second copy of the network."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer.base)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the A and B tensors, keyed by their place in the model (a few MB, not the model), on the
    CPU whatever device trained them: a checkpoint from a GPU loads where no GPU is."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()
            if name.endswith((".lora_A", ".lora_B"))}


def load_adapter_state_dict(model: nn.Module, adapters: dict[str, Tensor]) -> None:
    """Copy saved A and B into a model that add_lora() gave the same LoRA shape."""
    own = {name: param for name, param in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}
    if set(own) != set(adapters):
        missing, unexpected = sorted(set(own) - set(adapters)), sorted(set(adapters) - set(own))
        raise ValueError(f"adapters do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in adapters.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"adapter {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(own[name].shape)}")
            own[name].copy_(tensor)


def lora_config_dict(config: LoRAConfig) -> dict:
    """Plain types only, so a checkpoint loads with torch.load(weights_only=True)."""
    settings = asdict(config)
    settings["targets"] = list(settings["targets"])
    return settings


def lora_config_from_dict(settings: dict) -> LoRAConfig:
    """The inverse of lora_config_dict."""
    return LoRAConfig(settings["r"], settings["alpha"], settings["dropout"], tuple(settings["targets"]))


PEFT_PREFIX = "base_model.model."        # peft's wrapper around the model, in every key
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------------------------------
# peft's adapter folder (adapter_config.json + adapter_model.safetensors): out, and in
# ---------------------------------------------------------------------------------------

def to_peft_key(name: str) -> str:
    """"transformer.h.0.attn.c_attn.lora_A" -> "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"."""
    return f"{PEFT_PREFIX}{name}.weight"


def from_peft_key(key: str) -> str:
    """The inverse of to_peft_key."""
    if not (key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
        raise ValueError(f"{key} is not a LoRA weight of a peft adapter")
    return key[len(PEFT_PREFIX):-len(".weight")]


def write_peft_folder(folder: str | Path, config: LoRAConfig, adapters: dict[str, Tensor],
                      fan_in_fan_out: bool, base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes them."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                "target_modules": sorted(config.targets), "fan_in_fan_out": fan_in_fan_out, "bias": "none",
                "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    (folder / PEFT_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    save_file({to_peft_key(name): tensor.contiguous() for name, tensor in adapters.items()}, str(folder / PEFT_WEIGHTS),
              metadata={"format": "pt"})


def read_peft_folder(folder: str | Path) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """A peft LoRA adapter folder (ours or anyone's) as our LoRA config and adapters, or one clear
    error saying what in it we cannot take: another PEFT method, rsLoRA's or DoRA's other update,
    per-layer ranks, or extra trained modules."""
    from safetensors.torch import load_file
    folder = Path(folder)
    config_file, weights_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    for path in (config_file, weights_file):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a peft adapter folder: {path.name} is missing")
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
        adapters = {from_peft_key(key): tensor.float() for key, tensor in load_file(str(weights_file)).items()}
        unsupported = [(settings.get("peft_type") != "LORA", f"peft_type {settings.get('peft_type')}, not LORA"),
                       (bool(settings.get("use_rslora")), "use_rslora (its update is scaled by alpha / sqrt(r))"),
                       (bool(settings.get("use_dora")), "use_dora (a magnitude vector besides A and B)"),
                       (bool(settings.get("rank_pattern") or settings.get("alpha_pattern")), "per-layer ranks or alphas"),
                       (bool(settings.get("modules_to_save")), "modules_to_save (whole trained modules)"),
                       (settings.get("bias", "none") != "none", f"bias {settings.get('bias')!r}")]
        # The adapted layers' names, from the weights themselves (target_modules may be a regex).
        config = LoRAConfig(int(settings["r"]), float(settings["lora_alpha"]), float(settings.get("lora_dropout", 0.0)),
                            tuple(sorted({name.rsplit(".", 2)[-2] for name in adapters})))
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as error:  # bad JSON, a cut file, a non-LoRA key
        raise ValueError(f"{folder}: cannot read the adapter ({type(error).__name__}: "
                         f"{' '.join(str(error).split())})") from None
    for found, what in unsupported:
        if found:
            raise ValueError(f"{folder}: {what} is not something lora.py trains")
    return config, adapters
