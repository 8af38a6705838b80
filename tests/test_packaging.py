"""The project's `tokenizers` must be ours, never HuggingFace's package of the same name."""
from pathlib import Path

import tokenizers

ROOT = Path(__file__).resolve().parent.parent


def test_import_tokenizers_is_ours():
    assert getattr(tokenizers, "IS_DMVAE_BENCH", False) is True
    assert Path(tokenizers.__file__).resolve().parent == ROOT / "tokenizers"
    assert hasattr(tokenizers, "build_tokenizer")


def test_no_transformers_dependency():
    import importlib.metadata as md
    reqs = md.requires("dmvae-prior-bench") or []
    assert not any(r.lower().startswith(("transformers", "tokenizers")) for r in reqs)
