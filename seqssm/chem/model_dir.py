"""Finding and loading a chemical LM: a bundled name or a model directory (config.json with
model_type "s4-chem", model.safetensors, vocab.json, optional info.json)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from seqssm.errors import SeqssmError

MODEL_TYPE = "s4-chem"
DEFAULT_MODEL = "s4-chem-moses"


@dataclass
class ChemModel:
    model: torch.nn.Module
    tokenizer: object
    info: dict
    name: str
    path: Path


def is_chem_model_dir(d: Path) -> bool:
    try:
        cfg = json.loads((Path(d) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == MODEL_TYPE


def bundled_chem_models() -> dict[str, Path]:
    from seqssm.models import bundled_models

    return {k: v for k, v in bundled_models().items() if is_chem_model_dir(v)}


def resolve_chem_model(name_or_path: str | os.PathLike | None) -> tuple[str, Path]:
    """(name, directory) of a chemical LM; the default bundled one when ``None``."""
    text = os.fspath(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    bundled = bundled_chem_models()
    if text in bundled:
        return text, bundled[text]
    path = Path(text).expanduser()
    if not path.exists():
        names = ", ".join(bundled) or "none"
        raise SeqssmError(f"no chemical model '{text}': not a bundled one (bundled: {names}) and no such directory")
    if not path.is_dir():
        raise SeqssmError(f"{path}: a chemical model is a directory (config.json, model.safetensors, vocab.json)")
    if not (path / "config.json").is_file():
        raise SeqssmError(f"{path}: no config.json; not a model directory")
    if not is_chem_model_dir(path):
        try:
            kind = json.loads((path / "config.json").read_text()).get("model_type", "unknown")
        except (OSError, ValueError, AttributeError):
            kind = "unreadable"
        raise SeqssmError(f"{path}: model_type '{kind}' is not a chemical language model ('{MODEL_TYPE}')")
    return path.resolve().name, path


def load_chem_model(name_or_path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> ChemModel:
    """Load a chemical LM with its vocabulary and training record, in eval mode on ``device``."""
    from seqssm.chem.tokenizer import SmilesTokenizer
    from seqssm.models.s4_chem import S4ChemLM

    name, path = resolve_chem_model(name_or_path)
    model = S4ChemLM.from_pretrained(path)
    tokenizer = SmilesTokenizer.load(path)
    if len(tokenizer) != model.cfg.vocab_size:
        raise SeqssmError(f"{path}: vocab.json has {len(tokenizer)} tokens but the model expects {model.cfg.vocab_size}")
    info = {}
    if (path / "info.json").is_file():
        try:
            info = json.loads((path / "info.json").read_text())
        except ValueError as e:
            raise SeqssmError(f"{path / 'info.json'}: not valid JSON ({e})") from None
    model.to(device).eval()
    return ChemModel(model, tokenizer, info, name, path)
