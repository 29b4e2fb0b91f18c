"""Tests for train_glue.py (CPU, pytest): the encoder against transformers, the loader, the GLUE readers,
truncation and metrics against their references, and the pipeline on the demo's files (adapter, merge, resume).
transformers, tokenizers and scipy are test-only oracles: the tests that need them skip where they are absent."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_glue as tg
from gift import add_gift, gift_state_dict, load_gift_state_dict
from train_common import read_safetensors, write_safetensors

TOL = 1e-4  # float32 logits of two implementations (different kernels and summation orders), values O(1)


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
    ours = tg.load_model(tmp_path).eval()  # the file's own head (its config's id2label)
    assert ours.config.num_labels == num_labels and ours.config.max_position_embeddings == 40
    ids, types, mask = _batch(99, 1, [9, 17, 3, 12])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, torch.zeros_like(ids), mask)
    assert got.shape == (4, num_labels) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_bert_logits_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=24, type_vocab_size=2, num_labels=2)
    torch.manual_seed(0)
    ref = _randomize(transformers.BertForSequenceClassification(cfg)).eval()
    ref.save_pretrained(tmp_path / "cls")
    ids, types, mask = _batch(97, 0, [5, 20, 11])
    ours = tg.load_model(tmp_path / "cls").eval()
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
    ours = tg.load_model(tmp_path / "bare", num_labels=32).eval()
    with torch.no_grad():
        ours.classifier.weight.copy_(torch.eye(32))
        ours.classifier.bias.zero_()
        torch.testing.assert_close(ours(ids, types, mask), bare(input_ids=ids, token_type_ids=types,
                                                                attention_mask=mask).pooler_output, atol=TOL, rtol=0)


def test_paper_parameter_counts():
    """GIFT_QV r=32: 98,304 trainable numbers on RoBERTa-Base, 131,072 on Large (REFERENCE section 2)."""
    for hidden, layers, heads, expected in ((768, 12, 12, 98_304), (1024, 24, 16, 131_072)):
        cfg = tg.EncoderConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=4 * hidden)
        with torch.device("meta"):
            model = tg.SequenceClassifier(cfg)
            tg.add_method(model, {"method": "gift", "targets": ["query", "value"], "rank": 32, "share": "type"})
        assert sum(p.numel() for p in model.gift.parameters()) == expected
        assert tg.paper_size(cfg) == ("RoBERTa-Base" if hidden == 768 else "RoBERTa-Large")
        assert len([n for n, p in model.named_parameters() if p.requires_grad]) == 4 + 4  # 2 Thetas, 2 head layers


# ----------------------------------------------------------------------------------------------- the loader
def _tiny_roberta_folder(path, **changes):
    cfg = tg.EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=20)
    torch.manual_seed(0)
    state = {k: v for k, v in tg.SequenceClassifier(cfg).state_dict().items() if not k.startswith("classifier.")}
    state["lm_head.bias"] = torch.zeros(50)
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    path.mkdir(parents=True, exist_ok=True)
    hf = {k: v for k, v in vars(cfg).items() if k != "num_labels"}
    (path / "config.json").write_text(json.dumps(hf))
    write_safetensors(path / "model.safetensors", state)
    return path


def test_loader_is_strict(tmp_path):
    model = tg.load_model(_tiny_roberta_folder(tmp_path / "ok"), num_labels=2)  # lm_head: reported, not used
    assert model.classifier["out_proj"].weight.shape == (2, 16)
    key = "roberta.encoder.layer.1.attention.self.value.weight"
    with pytest.raises(ValueError, match="missing"):
        tg.load_model(_tiny_roberta_folder(tmp_path / "a", **{key: None}), num_labels=2)
    with pytest.raises(ValueError, match=r"shape \(16, 8\)"):
        tg.load_model(_tiny_roberta_folder(tmp_path / "b", **{key: torch.zeros(16, 8)}), num_labels=2)
    with pytest.raises(ValueError, match="no place for.*layer.2"):
        tg.load_model(_tiny_roberta_folder(tmp_path / "c", **{"roberta.encoder.layer.2.output.dense.bias":
                                                               torch.zeros(16)}), num_labels=2)
    with pytest.raises(ValueError, match="classifier.*missing"):  # no head in a base file: give num_labels
        tg.load_model(tmp_path / "ok")
    bad = tmp_path / "gpt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        tg.read_config(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        tg.read_config(bad)


# ----------------------------------------------------------------------------------------------- GLUE files
GLUE_SAMPLES = {  # the official layouts (the GLUE download's train.tsv / dev.tsv), two rows each
    "cola": "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
            "gj04\t0\t*\tThey drank the pub.\n",
    "sst2": "sentence\tlabel\nhide new secretions from the parental units \t0\nthat loves its characters \t1\n",
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tAmrozi accused his brother .\t"
            "Referring to him as only \" the witness \" .\n0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa "
            "bought Dominick 's .\n",
    "qnli": "index\tquestion\tsentence\tlabel\n0\tWhen did it start?\tIt started in 1990.\tentailment\n"
            "1\tWho?\tNobody knows.\tnot_entailment\n",
    "rte": "index\tsentence1\tsentence2\tlabel\n0\tNo weapons were found.\tWeapons were found.\tnot_entailment\n"
           "1\tA cat sat.\tA cat sat down.\tentailment\n",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking "
            "off.\t5.000\n1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a flute.\tA man is "
            "playing a flute.\t3.800\n",
}
GLUE_EXPECTED = {
    "cola": [("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
             ("They drank the pub.", None, 0)],
    "sst2": [("hide new secretions from the parental units ", None, 0), ("that loves its characters ", None, 1)],
    "mrpc": [("Amrozi accused his brother .", 'Referring to him as only " the witness " .', 1),
             ("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .", 0)],
    "qnli": [("When did it start?", "It started in 1990.", 0), ("Who?", "Nobody knows.", 1)],
    "rte": [("No weapons were found.", "Weapons were found.", 1), ("A cat sat.", "A cat sat down.", 0)],
    "stsb": [("A plane is taking off.", "An air plane is taking off.", 5.0),
             ("A man plays a flute.", "A man is playing a flute.", 3.8)],
}


@pytest.mark.parametrize("task", list(tg.TASKS))
def test_read_tsv_official_layouts(tmp_path, task):
    path = tmp_path / "train.tsv"
    path.write_text(GLUE_SAMPLES[task], encoding="utf-8")
    assert tg.read_tsv(path, tg.TASKS[task]) == GLUE_EXPECTED[task]


def test_read_tsv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev.tsv:3: label 'maybe'"):
        tg.read_tsv(path, tg.TASKS["rte"])
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\textra\tentailment\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: 5 tab-separated fields, expected 4"):
        tg.read_tsv(path, tg.TASKS["rte"])
    with pytest.raises(ValueError, match=r"columns .* expected"):  # an RTE file given as QNLI
        tg.read_tsv(path, tg.TASKS["qnli"])
    path.write_text(GLUE_SAMPLES["stsb"].replace("3.800", "n/a"))
    with pytest.raises(ValueError, match=r"dev.tsv:3: score 'n/a'"):
        tg.read_tsv(path, tg.TASKS["stsb"])


def test_truncation_matches_tokenizers_longest_first():
    tokenizers = pytest.importorskip("tokenizers")
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
                ids, types = tg.encode_example(Words(), 0, 2, "roberta", a, b, max_len)
                assert ids == tok.encode(a, b).ids, (max_len, la, lb)
                assert types == [0] * len(ids)
        ids, _ = tg.encode_example(Words(), 0, 2, "roberta", " ".join(f"w{i}" for i in range(20)), None, max_len)
        assert ids == tok.encode(" ".join(f"w{i}" for i in range(20))).ids
    ids, types = tg.encode_example(Words(), 101, 102, "bert", "w1 w2", "w3", 16)
    assert ids == [101, 5, 6, 102, 7, 102] and types == [0, 0, 0, 0, 1, 1]


def test_metrics_against_references():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (200,), generator=g)
    p = torch.where(torch.rand(200, generator=g) < 0.7, y, 1 - y)
    # Matthews' coefficient of two binary vectors is their Pearson correlation (the phi coefficient)
    assert tg.score("mcc", p.tolist(), y.tolist()) == pytest.approx(100 * scipy_stats.pearsonr(p, y)[0], abs=1e-9)
    assert tg.score("mcc", [1] * 10, [0, 1] * 5) == 0.0  # a constant prediction scores 0, as sklearn
    assert tg.score("accuracy", p.tolist(), y.tolist()) == pytest.approx(100 * (p == y).double().mean().item())
    a, b = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    assert tg.score("pearson", a.tolist(), (a + b).tolist()) == pytest.approx(
        100 * scipy_stats.pearsonr(a, a + b)[0], abs=1e-9)


def test_lr_schedule_is_hf_linear():
    assert [tg.lr_factor(s, 2, 10) for s in range(11)] == [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0]
    assert tg.lr_factor(0, 0, 4) == 1.0


# ----------------------------------------------------------------------------------------------- tokenizers
WORDPIECE_TEXTS = ["Hello, world! Isn't this a test?", "Crème brûlée à la carte: 3.50$ ^_^", "  many   spaces\tand\ttabs\n",
                   "东京大学は日本の大学です。中文字符", "emoji 🙂👍🏽 and symbols ©®™ § ¶", "under_score hy-phen a/b (paren) [brak]",
                   "control\x00char\x07s and \ufffd replacement\u200b zero width", "line\u2028sep and nbsp\u00a0here",
                   "x" * 120 + " long word", "antidisestablishmentarianism unbelievable ÉCOLE Ωmega İstanbul", "",
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
