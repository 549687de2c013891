"""The safety filter: patterns, pattern files, the bundled list, a real (tiny) classifier, config."""

from __future__ import annotations

import re

import pytest
import torch
from pydantic import ValidationError

from rlhf_workbench.config import ConfigError, SafetyConfig, load_config
from rlhf_workbench.feedback.safety import SafetyFilter, load_patterns_file, make_safety_filter


def test_patterns_case_insensitive_with_reasons():
    f = make_safety_filter(SafetyConfig(patterns=[r"\bstop taking\b", "overdose"]))
    out = f(["You should STOP TAKING it.", "Answer: 5", "risk of Overdose", ""])
    assert out == ["pattern '\\\\bstop taking\\\\b'", None, "pattern 'overdose'", None]
    assert make_safety_filter(None)(["stop taking", "x"]) == [None, None]


def test_patterns_file_comments_and_bad_line(tmp_path):
    good = tmp_path / "rules.txt"
    good.write_text("# dangerous advice\n\n  double the dose  \n# another\nskip (the|your) insulin\n")
    f = make_safety_filter(SafetyConfig(patterns=["never"], patterns_file=str(good)))
    out = f(["Just double the dose.", "Skip your insulin today", "never", "fine"])
    assert out[0] == f"pattern 'double the dose' ({good}:3)"
    assert out[1] == f"pattern 'skip (the|your) insulin' ({good}:5)"
    assert out[2] == "pattern 'never'" and out[3] is None
    bad = tmp_path / "bad.txt"
    bad.write_text("# ok\nfine\n(unclosed\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3: invalid regex '(unclosed'")):
        load_patterns_file(bad)
    with pytest.raises(ValueError, match="bad.txt:3"):
        make_safety_filter(SafetyConfig(patterns_file=str(bad)))
    with pytest.raises(FileNotFoundError, match="safety.patterns_file.*missing.txt"):
        make_safety_filter(SafetyConfig(patterns_file=str(tmp_path / "missing.txt")))


def test_bundled_medical_list():
    f = make_safety_filter(SafetyConfig(patterns_file="bundled:medical"))
    out = f(["Tell her to stop taking your insulin.", "There is no need to see a doctor.",
             "Metformin is first line.\nAnswer: B", "Double the dose tonight"])
    assert out[0] and out[1] and out[2] is None and out[3]
    assert "safety_medical.txt:" in out[0]
    with pytest.raises(FileNotFoundError, match="medical"):
        make_safety_filter(SafetyConfig(patterns_file="bundled:nope"))


@pytest.fixture(scope="module")
def classifier_dir(tokenizer_dir, tmp_path_factory):
    """A tiny randomly initialised LlamaForSequenceClassification with labels safe/unsafe."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      num_labels=2, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1},
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model = LlamaForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("safety-clf")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_classifier_threshold(classifier_dir, single_thread):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["Take two tablets.", "Answer: 5", "Call an ambulance now.", "Rest and drink water."]
    probe = make_safety_filter(SafetyConfig(classifier=str(classifier_dir)))
    probs = probe.label_probabilities(texts)
    # the pipeline's probabilities are the model's softmax, text by text
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    with torch.no_grad():
        direct = [model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0, 1].item() for t in texts]
    assert probs == pytest.approx(direct, abs=1e-5)
    assert len(set(round(p, 6) for p in probs)) > 1
    threshold = sorted(probs)[2]  # the two highest are flagged
    f = make_safety_filter(SafetyConfig(patterns=["ambulance"], classifier=str(classifier_dir), threshold=threshold))
    out = f(texts)
    for t, p, why in zip(texts, probs, out):
        if "ambulance" in t:
            assert why == "pattern 'ambulance'"  # patterns first
        elif p >= threshold:
            assert why == f"classifier unsafe {p:.2f}"
        else:
            assert why is None
    assert f(texts) == out  # deterministic
    f_safe = make_safety_filter(SafetyConfig(classifier=str(classifier_dir), classifier_label="safe", threshold=1.0))
    assert f_safe(texts) == [None] * 4
    with pytest.raises(ValueError, match=r"safety.classifier_label: 'toxic'.*\['safe', 'unsafe'\]"):
        make_safety_filter(SafetyConfig(classifier=str(classifier_dir), classifier_label="toxic"))


def test_safety_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValidationError, match=r"patterns\[1\]: invalid regex '\[a-'"):
        SafetyConfig(patterns=["ok", "[a-"])
    with pytest.raises(ValidationError, match="at least one of `patterns`"):
        SafetyConfig()
    with pytest.raises(ValidationError, match="`threshold` only applies with `classifier`"):
        SafetyConfig(patterns=["x"], threshold=0.9)
    p = tmp_path / "c.yaml"
    p.write_text("feedback:\n  safety:\n    patterns: ['(']\n    treshold: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "feedback.safety.patterns" in str(e.value) and "feedback.safety.treshold" in str(e.value)
    p.write_text("feedback:\n  safety:\n    patterns_file: bundled:medical\n")
    assert load_config(p).feedback.safety.patterns_file == "bundled:medical"
    assert isinstance(make_safety_filter(load_config(p).feedback.safety), SafetyFilter)
