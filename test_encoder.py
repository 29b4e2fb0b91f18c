"""Tests for encoder.py (CPU, pytest): the encoder's logits against transformers, the strict HF-folder loader,
the sentence-pair encoding and truncation against tokenizers, WordPiece tokenizer.json files, and what encoder.py
imports. transformers and tokenizers are test-only oracles: the tests that need them skip where they are absent."""
import ast
import json
from pathlib import Path

import pytest
import torch

import encoder as enc
from fileio import read_safetensors, write_safetensors

TOL = 1e-4  # float32 logits of two implementations (different kernels and summation orders), values O(1)
PINNED = (0, 23, 3)  # the tokenizers release whose sentence-pair truncation encode_example follows


def tokenizers_pinned():
    """The tokenizers module, if it is PINNED or newer; else the test skips (0.23.2 truncates pairs differently:
    max length 9, a = 10 words, b = 9: it keeps 2 words of a where 0.23.3 and encode_example keep 3)."""
    tokenizers = pytest.importorskip("tokenizers")
    version = tuple(int(x) for x in tokenizers.__version__.split(".")[:3] if x.isdigit())
    if version < PINNED:
        pytest.skip(f"tokenizers {tokenizers.__version__}: these oracle tests pin 0.23.3's longest_first "
                    f"truncation (0.23.2 splits some pair budgets differently)")
    return tokenizers


def _randomize(model, seed=0):
    """Every parameter random, LayerNorms included, so that a misplaced tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + name.endswith("LayerNorm.weight"))
    return model


def _batch(vocab, pad, lengths, seed=0):
    """Right-padded ids (real tokens avoid the pad id), types (second half 1), mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = (torch.randint(vocab - 4, (n,), generator=g) + 3)
        ids[i, :n][ids[i, :n] == pad] = pad + 2
        mask[i, :n] = 1
    types = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        types[i, n // 2:n] = 1
    return ids, types, mask


# ----------------------------------------------------------------------------------------------- the encoder
@pytest.mark.parametrize("num_labels", [3, 1])
def test_roberta_logits_match_transformers(tmp_path, num_labels):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40, type_vocab_size=1,
                                     pad_token_id=1, layer_norm_eps=1e-5, num_labels=num_labels)
    torch.manual_seed(0)
    ref = _randomize(transformers.RobertaForSequenceClassification(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = enc.load_model(tmp_path).eval()  # the file's own head (its config's id2label)
    assert ours.config.num_labels == num_labels and ours.config.max_position_embeddings == 40
    ids, types, mask = _batch(99, 1, [9, 17, 3, 12])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, torch.zeros_like(ids), mask)
    assert got.shape == (4, num_labels) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_roberta_masked_lm_file_loads_with_a_new_head(tmp_path):
    """The Hub's roberta-base / roberta-large files are RobertaForMaskedLM: roberta.* (no pooler) and lm_head.*."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40, type_vocab_size=1,
                                     pad_token_id=1, layer_norm_eps=1e-5, num_labels=3)
    torch.manual_seed(0)
    mlm = _randomize(transformers.RobertaForMaskedLM(cfg)).eval()
    mlm.save_pretrained(tmp_path)
    assert any(k.startswith("lm_head.") for k in read_safetensors(tmp_path / "model.safetensors"))
    ours = enc.load_model(tmp_path, num_labels=3).eval()
    ref = transformers.RobertaForSequenceClassification(cfg).eval()
    ref.roberta.load_state_dict(mlm.roberta.state_dict(), strict=False)  # the MLM model has no pooler
    ref.classifier.load_state_dict(ours.classifier.state_dict())
    ids, _, mask = _batch(99, 1, [6, 13])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, torch.zeros_like(ids), mask), expected, atol=TOL, rtol=0)


def test_bert_logits_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=24, type_vocab_size=2, num_labels=2)
    torch.manual_seed(0)
    ref = _randomize(transformers.BertForSequenceClassification(cfg)).eval()
    ref.save_pretrained(tmp_path / "cls")
    ids, types, mask = _batch(97, 0, [5, 20, 11])
    ours = enc.load_model(tmp_path / "cls").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, types, mask), ref(input_ids=ids, token_type_ids=types,
                                                                attention_mask=mask).logits, atol=TOL, rtol=0)
    # a bare BertModel file (keys without "bert.", BERT's old LayerNorm gamma / beta names): with an identity
    # classifier our logits are its pooler output
    bare = ref.bert
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in bare.state_dict().items()}
    (tmp_path / "bare").mkdir()
    write_safetensors(tmp_path / "bare" / "model.safetensors", state)
    hf = json.loads((tmp_path / "cls" / "config.json").read_text())
    hf.pop("id2label", None), hf.pop("label2id", None)
    (tmp_path / "bare" / "config.json").write_text(json.dumps(hf))
    ours = enc.load_model(tmp_path / "bare", num_labels=32).eval()
    with torch.no_grad():
        ours.classifier.weight.copy_(torch.eye(32))
        ours.classifier.bias.zero_()
        torch.testing.assert_close(ours(ids, types, mask), bare(input_ids=ids, token_type_ids=types,
                                                                attention_mask=mask).pooler_output, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------- the loader
def _tiny_roberta_folder(path, **changes):
    cfg = enc.EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=20)
    torch.manual_seed(0)
    state = {k: v for k, v in enc.SequenceClassifier(cfg).state_dict().items() if not k.startswith("classifier.")}
    state["lm_head.bias"] = torch.zeros(50)
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    path.mkdir(parents=True, exist_ok=True)
    hf = {k: v for k, v in vars(cfg).items() if k != "num_labels"}
    (path / "config.json").write_text(json.dumps(hf))
    write_safetensors(path / "model.safetensors", state)
    return path


def test_loader_is_strict(tmp_path):
    model = enc.load_model(_tiny_roberta_folder(tmp_path / "ok"), num_labels=2)  # lm_head: reported, not used
    assert model.classifier["out_proj"].weight.shape == (2, 16)
    key = "roberta.encoder.layer.1.attention.self.value.weight"
    with pytest.raises(ValueError, match="missing"):
        enc.load_model(_tiny_roberta_folder(tmp_path / "a", **{key: None}), num_labels=2)
    with pytest.raises(ValueError, match=r"shape \(16, 8\)"):
        enc.load_model(_tiny_roberta_folder(tmp_path / "b", **{key: torch.zeros(16, 8)}), num_labels=2)
    with pytest.raises(ValueError, match="holds layers 0..2; config.json's num_hidden_layers 2 needs 0..1"):
        enc.load_model(_tiny_roberta_folder(tmp_path / "c", **{"roberta.encoder.layer.2.output.dense.bias":
                                                               torch.zeros(16)}), num_labels=2)
    with pytest.raises(ValueError, match="classifier.*missing"):  # no head in a base file: give num_labels
        enc.load_model(tmp_path / "ok")
    bad = tmp_path / "gpt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        enc.read_config(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        enc.read_config(bad)


def test_truncation_matches_tokenizers_longest_first():
    tokenizers = tokenizers_pinned()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(40)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.post_processor = tokenizers.processors.RobertaProcessing(("</s>", 2), ("<s>", 0))

    class Words:  # encode() as tokenizer.py's: plain ids, no specials
        def encode(self, text, bos, eos):
            return [vocab[w] for w in text.split()]

    for max_len in (8, 9, 12):
        tok.enable_truncation(max_len)
        for la in range(0, 14):
            for lb in range(0, 14):
                a, b = " ".join(f"w{i}" for i in range(la)), " ".join(f"w{20 + i}" for i in range(lb))
                ids, types = enc.encode_example(Words(), 0, 2, "roberta", a, b, max_len)
                assert ids == tok.encode(a, b).ids, (max_len, la, lb)
                assert types == [0] * len(ids)
        ids, _ = enc.encode_example(Words(), 0, 2, "roberta", " ".join(f"w{i}" for i in range(20)), None, max_len)
        assert ids == tok.encode(" ".join(f"w{i}" for i in range(20))).ids
    ids, types = enc.encode_example(Words(), 101, 102, "bert", "w1 w2", "w3", 16)
    assert ids == [101, 5, 6, 102, 7, 102] and types == [0, 0, 0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------- tokenizers
WORDPIECE_TEXTS = ["Hello, world! Isn't this a test?", "Crème brûlée à la carte: 3.50$ ^_^",
                   "  many   spaces\tand\ttabs\n", "东京大学は日本の大学です。中文字符", "emoji 🙂👍🏽 and symbols ©®™ § ¶",
                   "under_score hy-phen a/b (paren) [brak]", "control\x00char\x07s and \ufffd replacement\u200b zero",
                   "line\u2028sep and nbsp\u00a0here", "x" * 120 + " long word", "",
                   "antidisestablishmentarianism unbelievable ÉCOLE Ωmega İstanbul",
                   "The quick brown fox jumps over the lazy dog. 12345 67.89"]


@pytest.mark.parametrize("lowercase,strip_accents", [(True, None), (False, None), (False, True)])
def test_wordpiece_matches_tokenizers(tmp_path, lowercase, strip_accents):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizer import load_tokenizer
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=lowercase, strip_accents=strip_accents)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(WORDPIECE_TEXTS * 3 + ["a brown dog jumps, the fox is quick."] * 5, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.n_words) == (2, 3, 0, tok.get_vocab_size())
    for text in WORDPIECE_TEXTS + ["unseen wordz q", "Ünïcödé ñ"]:
        assert ours.encode(text, bos=False, eos=False) == tok.encode(text, add_special_tokens=False).ids, text
    assert ours.decode(ours.encode("the quick fox", bos=False, eos=False)) == "the quick fox"




def test_imports_only_torch_numpy_fileio_tokenizer():
    """encoder.py reads like a model file: no harness, no training script, nothing of the run."""
    tree = ast.parse(Path(enc.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"json", "shutil", "dataclasses", "pathlib", "torch", "numpy", "fileio", "tokenizer"}, names


def test_targets_checked_on_a_weightless_model():
    cfg = enc.EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=20)
    enc.check_targets(cfg, ["query", "value", "attention.output.dense", "intermediate.dense"])
    for bad in (["qeury"], ["q_proj"], ["out_proj"], ["classifier.dense"]):
        with pytest.raises(ValueError, match=rf"--targets {bad[0]}: .*valid names.*attention.self.query"):
            enc.check_targets(cfg, bad)


# ----------------------------------------------------------------------------------- hostile files (issue 22)
@pytest.mark.parametrize("change,match", [
    ({"vocab_size": 50.0}, "field 'vocab_size' is 50.0 (float), expected an integer >= 1"),
    ({"num_hidden_layers": True}, "field 'num_hidden_layers' is True (bool), expected an integer >= 1"),
    ({"intermediate_size": 0}, "field 'intermediate_size' is 0 (int), expected an integer >= 1"),
    ({"type_vocab_size": "1"}, "field 'type_vocab_size' is '1' (str), expected an integer >= 1"),
    ({"attention_probs_dropout_prob": -0.1}, "field 'attention_probs_dropout_prob' is -0.1 (float), expected a "
                                             "number >= 0 < 1"),
    ({"classifier_dropout": "0.1"}, "field 'classifier_dropout' is '0.1' (str), expected a number >= 0 < 1"),
    ({"initializer_range": 0}, "field 'initializer_range' is 0 (int), expected a number > 0"),
    ({"pad_token_id": -1}, "field 'pad_token_id' is -1 (int), expected an integer >= 0 < 50"),
    ({"label2id": []}, "field 'label2id' is [] (list), expected a JSON object"),
    ({"finetuning_task": 5}, "field 'finetuning_task' is 5 (int), expected a string"),
    ({"hidden_act": 1}, "field 'hidden_act' is 1 (int), expected one of ['gelu', 'gelu_new', 'gelu_pytorch_tanh']"),
    ({"max_position_embeddings": 4}, "max_position_embeddings 4 leaves 2 positions for tokens (pad_token_id 1); "
                                     "at least 5 are needed"),
    ({"hidden_size": None}, "no field 'hidden_size'"),
])
def test_config_fields_are_checked(tmp_path, change, match):
    """Issue 22.2: each field config.json gives the forward, checked for type and range: one error naming file,
    field, the value found and what is expected (a ValueError, the script's one `error:` line)."""
    folder = _tiny_roberta_folder(tmp_path / "m")
    hf = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
    with pytest.raises(ValueError) as e:
        enc.read_config(folder)
    assert str(e.value) == f"{folder / 'config.json'}: {match}"


@pytest.mark.parametrize("case,match", [
    ("vocab_1e12", r"'roberta.embeddings.word_embeddings.weight' has shape \(50, 16\); config.json's vocab_size "
                   r"1000000000000 and hidden_size 16 need \(1000000000000, 16\)"),
    ("layers_1e6", r"holds layers 0..1; config.json's num_hidden_layers 1000000 needs 0..999999"),
    ("no_embedding", r"weight 'roberta.embeddings.word_embeddings.weight' is missing"),
    ("i32_safetensors", r"tensor 'roberta.encoder.layer.1.output.dense.weight' is stored as torch.int32"),
    ("i64_bin", r"pytorch_model.bin: tensor 'roberta.embeddings.LayerNorm.weight' is stored as torch.int64"),
    ("bin_not_a_state_dict", r"pytorch_model.bin: not a state dict of tensors"),
])
def test_weights_checked_against_config_before_building(tmp_path, case, match):
    """Issue 22.1 and 22.3: integer weights are refused; config.json's sizes are compared with the file's tensors
    (mapped, nothing allocated) before a model is built: 10^12 embedding rows or 10^6 layers fail at once."""
    key = "roberta.encoder.layer.1.output.dense.weight"
    folder = _tiny_roberta_folder(tmp_path / "m", **{
        "i32_safetensors": {key: torch.zeros(16, 32, dtype=torch.int32)},
        "no_embedding": {"roberta.embeddings.word_embeddings.weight": None}}.get(case, {}))
    hf = json.loads((folder / "config.json").read_text())
    hf.update({"vocab_1e12": {"vocab_size": 10 ** 12}, "layers_1e6": {"num_hidden_layers": 10 ** 6}}.get(case, {}))
    (folder / "config.json").write_text(json.dumps(hf))
    if case.endswith("bin") or case == "bin_not_a_state_dict":
        state = read_safetensors(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save([1, 2] if case == "bin_not_a_state_dict" else {
            **state, "roberta.embeddings.LayerNorm.weight": torch.ones(16, dtype=torch.int64)},
            folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=match):
        enc.load_model(folder, num_labels=2)


def test_field_accepts_what_fits():
    cfg = {"n": 3, "eps": 1, "name": "x", "d": {}, "none": None}
    assert enc.field(cfg, "c.json", "n", int, ge=1) == 3
    assert enc.field(cfg, "c.json", "eps", float, gt=0) == 1  # an int where a number belongs
    assert enc.field(cfg, "c.json", "none", float, 0.5) == 0.5 and enc.field(cfg, "c.json", "absent", str, "a") == "a"
    assert enc.field(cfg, "c.json", "name", str, choices=["x"]) == "x" and enc.field(cfg, "c.json", "d", dict) == {}
