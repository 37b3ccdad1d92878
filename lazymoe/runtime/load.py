"""Loading a merged model the way this runtime can afford (GPU, GPU in 4-bit, CPU, or not at all), chatting to it
and counting its routing: the notebook's Try step and the evaluations."""

from __future__ import annotations

import gc
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..io.folder import load_folder_tokenizer, read_folder_config, require_weights
from ..io.safetensors import NAME_TO_ST, dtype_bytes
from ..moe.arch import config_dtype
from ..units import human_bytes
from .machine import Runtime

_OVERHEAD = 600 * 1000**2  # CUDA context, activations and the KV cache of a short generation


@dataclass(frozen=True)
class LoadChoice:
    device: str | None  # "cuda", "cpu", or None: does not fit, skip
    reason: str
    dtype: str | None = None  # None: as stored
    four_bit: bool = False


def stored_dtype(folder: Path) -> str:
    config = read_folder_config(Path(folder))
    return config_dtype(config) or "float32"


def choose_loading(size: int, runtime: Runtime, *, dtype: str = "bfloat16",
                   bitsandbytes: bool | None = None) -> LoadChoice:
    """Where a ``size``-byte checkpoint stored in ``dtype`` can run here: GPU, GPU in 4-bit, CPU, or nowhere."""
    if bitsandbytes is None:
        bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    params = size // (dtype_bytes(dtype) if dtype in NAME_TO_ST else 2)
    vram, ram = runtime.vram_free or 0, runtime.ram_available
    if runtime.has_gpu:
        on_gpu = "float16" if dtype == "bfloat16" and not runtime.bf16 else None  # T4: no native bfloat16
        if size * 1.1 + _OVERHEAD <= vram:
            return LoadChoice("cuda", f"{human_bytes(size)} on {runtime.gpu_name}", on_gpu)
        four_bit = int(params * 0.56)  # 4-bit weights plus scales, embeddings and norms left in 16-bit
        if bitsandbytes and four_bit + _OVERHEAD <= vram:
            return LoadChoice("cuda", f"in 4-bit (about {human_bytes(four_bit)}) on {runtime.gpu_name}: "
                                      f"{human_bytes(size)} does not fit its {human_bytes(vram)} free", "float16", True)
    if ram is not None and size * 1.2 + _OVERHEAD <= ram:
        return LoadChoice("cpu", f"{human_bytes(size)} on the CPU" + (" (slow for big models)" if size > 4e9 else ""))
    gpu = f"{human_bytes(vram)} free GPU memory" if runtime.has_gpu else "no GPU"
    hint = "" if bitsandbytes or not runtime.has_gpu else " Installing bitsandbytes would allow a 4-bit test."
    return LoadChoice(None, f"the merged model ({human_bytes(size)}) does not fit this runtime ({gpu}, "
                            f"{human_bytes(ram or 0)} free RAM). The GGUF step makes smaller, quantised files.{hint}")


def load_merged(folder: Path, choice: LoadChoice):
    require_weights(folder)  # before torch: a folder whose shards went to the Hub says where they are
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {}
    if choice.dtype:
        kwargs["dtype"] = getattr(torch, choice.dtype)
    if choice.four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if not choice.four_bit:
        model = model.to(choice.device)
    return model.eval(), load_folder_tokenizer(folder)


def free_memory() -> None:
    """Give a dropped model's memory back now rather than at the next collection."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_chat(tokenizer, prompt: str):
    """The prompt as a user turn of the tokenizer's chat template (plain text where it has none), as tensors."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    return tokenizer(prompt, return_tensors="pt")


def routing_and_generation(model, tokenizer, prompts: list[str], experts_per_token: int,
                           max_new_tokens: int) -> list[dict]:
    """For each prompt: the greedy continuation and, per expert, the share of (token, layer) top-k picks it got."""
    import torch

    results = []
    for prompt in prompts:
        inputs = {k: v.to(model.device) for k, v in encode_chat(tokenizer, prompt).items()}
        with torch.no_grad():
            out = model(**inputs, output_router_logits=True)
            logits = torch.cat([r.reshape(-1, r.shape[-1]).float().cpu() for r in out.router_logits])
            picks = logits.topk(experts_per_token, dim=-1).indices.flatten()
            share = torch.bincount(picks, minlength=logits.shape[-1]).float() / picks.numel()
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        results.append({"prompt": prompt, "text": text, "share": share.tolist()})
    return results
