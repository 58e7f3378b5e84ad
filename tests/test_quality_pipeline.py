"""The task-quality study (benchmarks/quality) in miniature: tiny random Llama, 3 tasks, CPU.

Checks the parts whose mistakes would silently skew the study: the bank routes each row through its
own adapter exactly as PEFT applies a saved LoRA, JD factors reproduce the collection's updates,
training lowers each task's validation loss, and the zoo -> study -> report commands run end to end.
"""

from __future__ import annotations

import json

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

from benchmarks.quality import run  # noqa: E402
from benchmarks.quality.bank import LoraBank, merged  # noqa: E402
from benchmarks.quality.study import jd_factors, lora_factors  # noqa: E402
from benchmarks.quality.tasks import format_prompt, task_splits  # noqa: E402

N_TASKS = 3


def _byte_bpe(texts, vocab_size=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = []
    for task in run.zoo_tasks(N_TASKS):
        for split in task_splits(task, 16, 4, 4).values():
            texts += [format_prompt(e) + e.output for e in split]
    tokenizer = _byte_bpe(texts)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zoo_dir(tiny_model_dir, tmp_path_factory):
    zoo = tmp_path_factory.mktemp("zoo")
    run.main(["zoo", "--model-dir", str(tiny_model_dir), "--zoo-dir", str(zoo), "--tasks", str(N_TASKS),
              "--n-train", "16", "--n-val", "4", "--n-test", "4", "--max-epochs", "3", "--batch-per-adapter", "4",
              "--lr", "1e-2", "--patience", "3", "--device", "cpu"])
    return zoo


def test_training_lowers_every_tasks_validation_loss(zoo_dir):
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    assert zoo["tasks"] == [t.name for t in run.zoo_tasks(N_TASKS)]
    assert len(set(zoo["categories"])) == N_TASKS  # round robin over categories
    assert len(set(zoo["seeds"])) == N_TASKS  # each adapter its own seed
    for base, best in zip(zoo["base_val"], zoo["best_val"]):
        assert best < base


def test_bank_rows_match_peft_loading_each_saved_lora(tiny_model_dir, zoo_dir):
    from peft import PeftModel

    from benchmarks.quality.model import load
    from jdlora.sources import open_adapters

    model, tokenizer = load(tiny_model_dir)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    folders = [str(zoo_dir / f) for f in zoo["folders"]]
    prompts = ["### Instruction:\nSay it.\n### Input:\n1 2 3\n### Response:\n"] * 4
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    rows = [2, 0, -1, 1]  # a mixed batch, one row without adapter
    bank = LoraBank(lora_factors(open_adapters(folders)))
    bank.rows = torch.tensor(rows)
    with torch.no_grad(), bank.attached(model):
        mixed = model(**enc).logits
    base = model(**enc).logits  # the hooks are gone again
    assert torch.allclose(mixed[2], base[2])
    for i, a in enumerate(rows):
        if a < 0:
            continue
        peft_model = PeftModel.from_pretrained(load(tiny_model_dir)[0], folders[a]).eval()
        with torch.no_grad():
            expected = peft_model(**enc).logits[i]
        torch.testing.assert_close(mixed[i], expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(expected, base[i], atol=1e-4)  # the LoRA does change the output


def test_jd_factors_reproduce_the_collections_updates(zoo_dir):
    import jdlora

    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    folders = [str(zoo_dir / f) for f in zoo["folders"]]
    for clusters, sigma in ((1, "full"), (2, "diag")):
        collection = jdlora.compress(folders, rank=4, clusters=clusters, sigma=sigma, device="cpu", progress=False)
        factors = jd_factors(collection)
        for module in list(collection.modules)[:3]:
            A, B = factors[module]
            for k, name in enumerate(collection.adapter_names):
                torch.testing.assert_close(B[k] @ A[k], collection.delta_weight(name, module), rtol=1e-5, atol=1e-6)


def test_merged_deltas_are_removed_after_the_block(tiny_model_dir):
    from benchmarks.quality.model import load

    model, _ = load(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj"
    w = model.get_submodule(name).weight.detach().clone()
    with merged(model, {name: torch.ones_like(w)}):
        assert torch.allclose(model.get_submodule(name).weight, w + 1)
    assert torch.equal(model.get_submodule(name).weight, w)


# Patterns as in the rerun's command (benchmarks/RESULTS.md): the automatic settings with JD-Full and with both
# kinds, per-adapter SVD rank 1 and JD-Full with the same stored parameters.
METHODS = "JD-Full r16,JD-Diag r16,auto*,SVD r1,*=SVD r1,TIES"
METHOD_NAMES = ("JD-Full r16", "JD-Diag r16", "auto", "auto full+diag", "SVD r1", "JD-Full r16 c1 =SVD r1", "TIES")


def test_study_and_report_run_end_to_end(tiny_model_dir, zoo_dir, tmp_path):
    out = tmp_path / "study.json"
    run.main(["study", "--model-dir", str(tiny_model_dir), "--zoo-dir", str(zoo_dir), "--out", str(out),
              "--sizes", "2,3", "--methods", METHODS, "--test-examples", "4",
              "--added", "1", "--batch-size", "5", "--device", "cpu"])
    study = json.loads(out.read_text())
    assert [(r["n"], r["method"]) for r in study["runs"]] == [
        (n, m) for n in (2, 3) for m in METHOD_NAMES]
    for r in study["runs"]:
        assert len(r["scores"]) == r["n"] and all(0 <= s["rouge_l"] <= 1 for s in r["scores"])
        assert r["error"] >= 0 and (r["kind"] == "ties" or r["error"] <= 1)  # TIES can be worse than nothing
    # Rank 16 holds the stacked rank of 2-3 rank-16 adapters only partly; SVD r4 loses more than JD r16 keeps.
    by = {(r["n"], r["method"]): r for r in study["runs"]}
    assert by[(3, "JD-Full r16")]["error"] <= by[(3, "JD-Diag r16")]["error"] + 1e-6
    assert study["added"]["added"] == 1 and len(study["added"]["scores"]) == 3
    assert {"A_mean", "delta_mean"} <= set(study["similarity"])
    assert [(r["n"], r["rank"]) for r in study["trained_vs_random"]] == [(n, r) for n in (2, 3) for r in (16, 32, 64)]
    report_dir = tmp_path / "report"
    run.main(["report", "--zoo-dir", str(zoo_dir), "--study", str(out), "--out-dir", str(report_dir)])
    md = (report_dir / "report.md").read_text()
    assert "Table 4" in md and "JD-Full r16" in md and "G.9" in md and "the skill it keeps" in md
    assert "equal stored parameters: JD-Full r16 c1" in md and "auto full+diag settings, n=3" in md
    assert all(r["choice"]["reason"] for r in study["runs"] if r["method"].startswith("auto"))
    # The library's automatic settings as users get them: judged on several modules, said in the report.
    assert all(len(r["choice"]["modules"]) > 1 for r in study["runs"] if r["method"].startswith("auto"))
    assert "target met on" in md or "target NOT met on" in md
    for png in ("figure3.png", "figure5.png"):
        assert (report_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_studies_split_over_sizes_or_methods_merge_into_one():
    def part(sizes, seconds, method="auto"):
        return {"sizes": sizes, "runs": [{"n": n, "method": method} for n in sizes], "seconds": seconds,
                "trained_vs_random": [{"n": n, "rank": 16} for n in sizes], "added": {"n": max(sizes)} if 100 in sizes
                else None, "lora": [max(sizes)], "figure5": {"n": max(sizes)}}

    merged = run.merge_studies([part([100], 300.0), part([10, 50], 200.0)])
    assert merged["sizes"] == [10, 50, 100] and [r["n"] for r in merged["runs"]] == [10, 50, 100]
    assert merged["lora"] == [100] and merged["figure5"]["n"] == 100 and merged["added"] == {"n": 100}
    assert merged["seconds"] == 500.0 and [r["n"] for r in merged["trained_vs_random"]] == [10, 50, 100]
    with pytest.raises(SystemExit, match="overlap"):
        run.merge_studies([part([10, 50], 1.0), part([50, 100], 1.0)])
    # The same size, other methods (a call per method group when one call would pass the time limit).
    split = run.merge_studies([part([100], 1.0, "auto"), part([100], 2.0, "SVD r1")])
    assert [(r["n"], r["method"]) for r in split["runs"]] == [(100, "auto"), (100, "SVD r1")]
    assert split["sizes"] == [100] and len(split["trained_vs_random"]) == 1
