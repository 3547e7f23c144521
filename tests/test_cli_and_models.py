"""What a user touches first: `from forkattn.models import ...`, the README's CPU example, the ICL
docstring example, and the training commands' handling of bad flags and files (issue 12 section 6,
issue 13 section 6): one error line and exit status 2, never a traceback; help with defaults; one
--dtype / --init-from vocabulary; train_log.json and plain log lines from gpt; 0644 weights."""
import doctest
import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "\n\n".join(["the cat sat on the mat.\nthe dog ran far.", "birds sing at dawn.\nwe read books at night.",
                    "a great film, a joy.\na dull film, far too long."] * 4)


def _env():
    return dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """runs/bert (BertForMaskedLM + WordPiece tokenizer) and runs/gpt (GPT + BPE tokenizer.json),
    tiny and untrained, as the training commands lay them out."""
    from forkattn.models.bert import BertConfig, BertForMaskedLM
    from forkattn.models.bert_tokenizer import BertTokenizer
    from forkattn.models.gpt import GPT, GPTConfig
    from forkattn.training.gpt import train_bpe

    root = tmp_path_factory.mktemp("runs")
    (root / "corpus.txt").write_text(TEXT)
    torch.manual_seed(0)
    tok = BertTokenizer.train([str(root / "corpus.txt")], vocab_size=120, min_frequency=1, model_max_length=32)
    bert = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(str(root / "runs" / "bert"))
    tok.save_pretrained(str(root / "runs" / "bert"))
    bpe = train_bpe([str(root / "corpus.txt")], 300)
    gpt = GPT(GPTConfig(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    gpt.save_pretrained(str(root / "runs" / "gpt"))
    bpe.save(str(root / "runs" / "gpt" / "tokenizer.json"))
    return root


# --- the package's model API ---------------------------------------------------------------------

def test_models_package_exports_the_model_classes():
    import forkattn.models as fm
    from forkattn.models import (GPT, BertConfig, BertForSequenceClassification, BertModel,  # noqa: F401
                                 BertTokenizer, GPTConfig, ICLClassifier)
    from forkattn.models.bert import BertModel as direct

    assert BertModel is direct
    for name in fm.__all__:
        assert getattr(fm, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fm.Nope  # noqa: B018


def test_outputs_read_as_attributes_and_keys():
    """One output type for every model (models/outputs.py): out.x and out["x"], as transformers'."""
    from forkattn.models.bert import BertConfig, BertForSequenceClassification
    from forkattn.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16)).eval()
    gpt = GPT(GPTConfig(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 30, (2, 7))
    for out, labels in ((bert(ids), bert(ids, labels=torch.tensor([0, 1]))), (gpt(ids), gpt(ids, labels=ids))):
        assert out["logits"] is out.logits and out.loss is None and out["loss"] is None
        assert list(out.keys()) == ["logits"] and "loss" not in out and out[0] is out.logits
        assert list(labels.keys()) == ["loss", "logits"] and labels["loss"] is labels.loss and labels.loss.dim() == 0
        with pytest.raises(KeyError, match="no field 'nope'"):
            out["nope"]
        with pytest.raises(AttributeError):
            out.nope  # noqa: B018


def test_model_backend_is_a_config_field_not_saved(tmp_path):
    """Both models read config.attention_backend (models/backend.py); it never reaches config.json."""
    from forkattn.models.bert import BertConfig, BertModel
    from forkattn.models.gpt import GPT, GPTConfig

    bert = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))
    gpt = GPT(GPTConfig(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2), backend="eager")
    assert (gpt.config.attention_backend, gpt.decode_backend, gpt.transformer.h[0].attn.backend) == ("eager",) * 3
    gpt.set_attention_backend("cpu")
    bert.set_attention_backend("cpu")
    assert (gpt.backend, gpt.decode_backend, bert.config.attention_backend) == ("cpu",) * 3
    with pytest.raises(TypeError, match="attention_backend must be None or"):
        bert.set_attention_backend(3)
    for name, m in (("b", bert), ("g", gpt)):
        m.save_pretrained(str(tmp_path / name))
        saved = json.load(open(tmp_path / name / "config.json"))
        assert "attention_backend" not in saved and "decode_backend" not in saved, saved


def test_generation_does_not_import_a_model():
    """generation.py drives a model through its interface: importing it loads no model module."""
    code = ("import sys, forkattn.models.generation as g; "
            "print(sorted(m for m in sys.modules if m.startswith('forkattn.models.')))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True).stdout
    assert "forkattn.models.gpt" not in out and "forkattn.models.bert" not in out, out


def test_icl_docstring_example_runs():
    """Its example `label, scores = clf.predict(...)` raised TypeError (issue 13); now a doctest."""
    from forkattn.models import icl

    torch.manual_seed(0)
    result = doctest.testmod(icl, verbose=False)
    assert result.attempted >= 5 and result.failed == 0, result


def test_readme_cpu_example_runs(folders, monkeypatch, capsys):
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("<!-- README-CPU-EXAMPLE", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(folders)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"torch.Size\(\[2, \d+, 32\]\) torch.Size\(\[2, 32\]\)", out[0]), out
    assert out[1].startswith("the cat"), out


# --- checkpoint files ------------------------------------------------------------------------------

def test_saved_weights_are_world_readable_like_the_other_files(tmp_path):
    from forkattn.models.bert import BertConfig, BertModel
    from forkattn.models.gpt import GPT, GPTConfig

    old = os.umask(0o022)
    try:
        BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=16)).save_pretrained(str(tmp_path / "b"))
        GPT(GPTConfig(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(str(tmp_path / "g"))
    finally:
        os.umask(old)
    for d in ("b", "g"):
        modes = {f: stat.S_IMODE(os.stat(tmp_path / d / f).st_mode) for f in ("config.json", "model.safetensors")}
        assert modes == {"config.json": 0o644, "model.safetensors": 0o644}, modes


# --- the training commands ---------------------------------------------------------------------------

def _run(argv, capsys):
    from forkattn.train import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _clean_error(rc, err, *needles):
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_help_exits_zero_and_shows_defaults():
    r = subprocess.run([sys.executable, "-m", "forkattn.train", "--help"], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "bert-mlm" in r.stdout and "gpt" in r.stdout, r.stderr
    from forkattn.training import bert_finetune, bert_pretrain
    from forkattn.training.gpt import build_parser

    gpt_help = build_parser().format_help()
    assert "(default: 4096)" in gpt_help and "(default: 0.0006)" in gpt_help
    assert "(default: None)" not in gpt_help
    assert "(default: 8000)" in bert_pretrain.build_parser().format_help()
    assert "(default: label)" in bert_finetune.build_parser().format_help()


def test_one_dtype_and_init_vocabulary_for_bert_and_gpt():
    from forkattn.training import bert_finetune, bert_pretrain
    from forkattn.training.gpt import build_parser

    base = ["--data", "x", "--out", "y"]
    for parse in (bert_pretrain.build_parser().parse_args, build_parser().parse_args):
        for spelling, canonical in (("fp32", "float32"), ("bfloat16", "bfloat16"), ("fp16", "float16"),
                                    ("float16", "float16")):
            assert parse(base + ["--dtype", spelling]).dtype == canonical
        for flag in ("--init", "--init-from"):
            a = parse(base + [flag, "some/dir"])
            assert (getattr(a, "init", None) or getattr(a, "init_from", None)) == "some/dir"
    ft = bert_finetune.build_parser().parse_args(["--model", "m", "--train", "t", "--out", "o", "--dtype", "bf16"])
    assert ft.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--dtype", "int8"])


def test_missing_files_and_folders_are_one_line_errors(tmp_path, capsys, folders):
    missing = str(tmp_path / "nope.txt")
    out = tmp_path / "out"
    rc, _, err = _run(["gpt", "--data", missing, "--out", str(out)], capsys)
    _clean_error(rc, err, "--data", missing)
    assert not out.exists()  # no empty --out folder left behind
    rc, _, err = _run(["gpt", "--data", str(folders / "corpus.txt"), "--out", str(out), "--init-from",
                       str(tmp_path / "nomodel")], capsys)
    _clean_error(rc, err, "--init-from", "nomodel")
    rc, _, err = _run(["bert-mlm", "--data", missing, "--out", str(out)], capsys)
    _clean_error(rc, err, "--data", missing)
    rc, _, err = _run(["bert-finetune", "--model", str(tmp_path / "nomodel"), "--train", missing, "--out", str(out)],
                      capsys)
    _clean_error(rc, err, "--model", "nomodel", "no such model folder")
    rc, _, err = _run(["bert-finetune", "--model", str(folders / "runs" / "bert"), "--train", missing, "--out",
                       str(out)], capsys)
    _clean_error(rc, err, "--train", missing)
    # a failure after the --out folder was made (too few tokens for the block) removes it again
    (tmp_path / "tiny.txt").write_text("the cat sat.")
    rc, _, err = _run(["gpt", "--data", str(tmp_path / "tiny.txt"), "--out", str(out), "--vocab-size", "260",
                       "--block-size", "64", "--no-progress", "--device", "cpu"], capsys)
    _clean_error(rc, err, "--block-size 64")
    assert not out.exists()
    rc, _, err = _run(["nonsense"], capsys)
    assert rc == 2 and "unknown command 'nonsense'" in err


def test_finetune_csv_errors_name_the_columns_and_the_flag(tmp_path, capsys, folders):
    model = str(folders / "runs" / "bert")
    (tmp_path / "nolabel.csv").write_text("sentence,sentiment\na joy,positive\ndull,negative\n")
    rc, _, err = _run(["bert-finetune", "--model", model, "--train", str(tmp_path / "nolabel.csv"), "--out",
                       str(tmp_path / "o")], capsys)
    line = _clean_error(rc, err, "'text'", "'sentence'", "'sentiment'", "--text-column")
    (tmp_path / "notext.csv").write_text("text,sentiment\na joy,positive\n")
    rc, _, err = _run(["bert-finetune", "--model", model, "--train", str(tmp_path / "notext.csv"), "--out",
                       str(tmp_path / "o")], capsys)
    _clean_error(rc, err, "no 'label' column", "'sentiment'", "--label-column")
    for empty in ("", "text,label\n"):
        (tmp_path / "empty.csv").write_text(empty)
        rc, _, err = _run(["bert-finetune", "--model", model, "--train", str(tmp_path / "empty.csv"), "--out",
                           str(tmp_path / "o")], capsys)
        _clean_error(rc, err, "empty.csv", "no examples")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    rc, _, err = _run(["bert-finetune", "--model", model, "--train", str(tmp_path / "bad.jsonl"), "--out",
                       str(tmp_path / "o")], capsys)
    _clean_error(rc, err, "bad.jsonl")
    assert not (tmp_path / "o").exists()
    del line


def test_finetune_reports_the_head_once_and_epochs_above_the_bar(tmp_path, capsys, caplog, folders):
    (tmp_path / "r.csv").write_text("text,label\n" + "a great film,positive\na dull film,negative\n" * 3)
    with caplog.at_level("WARNING", logger="forkattn.models"):
        rc, out, err = _run(["bert-finetune", "--model", str(folders / "runs" / "bert"), "--train",
                             str(tmp_path / "r.csv"), "--out", str(tmp_path / "ft"), "--epochs", "2",
                             "--batch-size", "4", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert out.count("classifier.weight") == 1 and "classifier.weight" not in caplog.text + err
    epoch_lines = [l for l in out.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(re.fullmatch(r"epoch [\d.]+: loss [\d.]+ accuracy [\d.]+", l)
                                         for l in epoch_lines), out
    assert "epoch" not in err  # the bar (stderr) carries no epoch lines


def test_gpt_no_progress_logs_lines_and_writes_train_log(tmp_path, capsys, folders):
    out = tmp_path / "run"
    rc, text, err = _run(["gpt", "--data", str(folders / "corpus.txt"), "--out", str(out), "--vocab-size", "280",
                          "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size",
                          "4", "--steps", "12", "--log-every", "5", "--no-progress", "--device", "cpu",
                          "--dtype", "fp32"], capsys)
    assert rc == 0, err
    steps = re.findall(r"^step (\d+)/12 loss [\d.]+ lr [\d.e+-]+$", text, re.M)
    assert steps == ["5", "10", "12"], text
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log] == list(range(1, 13))
    assert all(e["loss"] > 0 and e["lr"] > 0 and "seconds" in e for e in log)
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) == stat.S_IMODE(os.stat(out / "config.json").st_mode)


def test_finetune_with_other_labels_needs_the_flag(tmp_path, capsys, folders):
    """A fine-tuned 2-label classifier re-fine-tuned on 3 labels: the classifier's shapes differ, which
    is refused with the flag to pass, and accepted with it."""
    (tmp_path / "two.csv").write_text("text,label\n" + "a great film,positive\na dull film,negative\n" * 2)
    (tmp_path / "three.csv").write_text("text,label\n" + "a great film,positive\na dull film,negative\nok,mixed\n")
    args = ["--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    rc, _, err = _run(["bert-finetune", "--model", str(folders / "runs" / "bert"), "--train", str(tmp_path / "two.csv"),
                       "--out", str(tmp_path / "ft2"), *args], capsys)
    assert rc == 0, err
    rc, _, err = _run(["bert-finetune", "--model", str(tmp_path / "ft2"), "--train", str(tmp_path / "three.csv"),
                       "--out", str(tmp_path / "ft3"), *args], capsys)
    _clean_error(rc, err, "classifier.weight: checkpoint (2, 32), model (3, 32)", "--ignore-mismatched-sizes")
    rc, out, err = _run(["bert-finetune", "--model", str(tmp_path / "ft2"), "--train", str(tmp_path / "three.csv"),
                         "--out", str(tmp_path / "ft3"), "--ignore-mismatched-sizes", *args], capsys)
    assert rc == 0 and "re-initialized (other shape) ['classifier.bias', 'classifier.weight']" in out, out + err
