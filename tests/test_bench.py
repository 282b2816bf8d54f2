"""The benchmark harness runs every algorithm (on a toy workload, so it cannot rot) and counts FLOPs right."""

from __future__ import annotations

import pytest
import torch

from bench.algorithms import STEPS, measure
from bench.workloads import SMOL, Workload, body_params, causal_lm, llama_config, train_flops

TOY = Workload("toy", {**SMOL, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 128},
               prompts=2, samples=2, prompt_len=4, response_len=3, micro_batch_size=2)


@pytest.mark.parametrize("algorithm", list(STEPS))
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-master"])
def test_every_algorithm_runs_and_reports_its_stages(algorithm, precision):
    result = measure(algorithm, TOY, "cpu", precision, steps=1, warmup=0)
    assert "update" in result["stages_s"] and all(s >= 0 for s in result["stages_s"].values())
    assert result["step_s"] == pytest.approx(sum(result["stages_s"].values()))
    assert result["update_flops"] > 0
    if algorithm in ("grpo", "ppo"):
        assert "generation" in result["stages_s"] and "reference" in result["stages_s"]


def test_train_flops_by_hand():
    model = causal_lm(TOY, "cpu")
    h, f, layers, vocab = 32, 64, 1, 128
    kv = 16  # 1 KV head of head_dim 16
    body = layers * (h * h + 2 * h * kv + h * h + 3 * h * f + 2 * h) + h  # attention, MLP, 2 norms; final norm
    assert body_params(model) == body
    rows, seq, scored = 3, 7, 3
    expected = rows * (seq * (6 * body + 6 * layers * h * seq) + 6 * vocab * h * scored)
    assert train_flops(model, llama_config(TOY), rows, seq, scored) == expected


def test_ragged_batch_and_positions_computed_by_hand():
    from bench.batching import positions_computed, ragged_batch
    from rlhf_core.batch import length_sorted

    batch = ragged_batch(TOY, "cpu")
    prompt_lens, response_lens = batch["prompt_mask"].sum(1), batch["response_mask"].sum(1)
    assert prompt_lens.tolist()[0::2] == prompt_lens.tolist()[1::2]  # a group's 2 samples share its prompt
    assert response_lens.min() >= 1 and response_lens.max() <= TOY.response_len
    order = torch.arange(4)
    by_hand = sum(2 * int(prompt_lens[rows].max() + response_lens[rows].max()) for rows in ([0, 1], [2, 3]))
    assert positions_computed(batch, order, 2) == by_hand
    assert positions_computed(batch, length_sorted(batch, order), 2) <= by_hand


@pytest.mark.slow
def test_the_gpu_check_runs_to_completion_in_its_dry_mode(tmp_path):
    """bench/gpu_check.sh is meant for a GPU lent once, for minutes: its dry mode on this CPU (tiny shapes) runs
    every step, so the script is known to work before then."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--dry", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in report["steps"]] == [0] * len(report["steps"]) and len(report["steps"]) >= 3
    assert {r["algorithm"] for r in json.loads((tmp_path / "bench" / "tiny.json").read_text())["results"]} == set(
        STEPS)
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check (dry run")


def test_compare_prints_speedups_of_matching_runs_by_hand():
    """Times: before / after; throughputs and MFU: after / before (> 1 is faster either way); runs only one file
    holds are left out; a different machine is flagged."""
    from bench.run import compare

    def result(algorithm, step, update, generated, mfu):
        return {"workload": "smol", "algorithm": algorithm, "precision": "bf16", "step_s": step,
                "stages_s": {"update": update}, "generated_tokens_per_s": generated, "mfu": mfu}

    machine = {"cpu": "Xeon", "gpu": None}
    before = {"machine": machine,
              "results": [result("grpo", 10.0, 8.0, 100.0, 0.1), result("dpo", 4.0, 4.0, None, 0.2)]}
    after = {"machine": machine,
             "results": [result("grpo", 5.0, 2.0, 300.0, 0.4), result("kto", 1.0, 1.0, None, 0.5)]}
    lines = compare(before, after).splitlines()
    (grpo,) = [line for line in lines if " grpo " in line]
    assert [cell.split()[-1] for cell in grpo.split("x")[:-1]] == ["2.00", "4.00", "3.00", "4.00"]
    assert not any(" dpo " in line or " kto " in line for line in lines)
    assert not lines[0].startswith("warning")
    other = {**after, "machine": {"cpu": "EPYC", "gpu": None}}
    assert compare(before, other).startswith("warning: different machines (Xeon vs EPYC)")


def test_ragged_generation_counts_tokens_up_to_the_first_eos_by_hand():
    from bench.generation import generated_tokens, ragged_eos_ids
    from bench.workloads import PAD_ID

    responses = torch.tensor([[5, 1, 7, 7], [9, 9, 9, 9], [2, 0, 0, 0]])  # EOS ids {1, 2}
    assert generated_tokens(responses, [1, 2]) == 2 + 4 + 1
    assert generated_tokens(responses, []) == 12
    eos = ragged_eos_ids(49152, 64)
    assert len(eos) == round(49152 * (1 - 0.5 ** (1 / 64))) == 529 and PAD_ID not in eos
    assert (1 - len(eos) / 49152) ** 64 == pytest.approx(0.5, abs=0.01)  # half the rows reach the end


def test_the_trl_comparison_feeds_texts_of_the_workloads_token_lengths(tokenizer_dir):
    """bench.trl_dpo gives TRL texts that tokenize to the workload's lengths (TRL then appends EOS to each
    response), so both sides train on sequences of the same shape; TRL itself is not needed for this."""
    from transformers import AutoTokenizer

    from bench.trl_dpo import pair_texts
    from bench.workloads import WORKLOADS

    w = WORKLOADS["smol"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = pair_texts(tokenizer, w)
    lengths = {k: len(tokenizer.encode(v, add_special_tokens=False)) for k, v in rows[0].items()}
    assert len(rows) == w.prompts
    assert lengths == {"prompt": w.prompt_len, "chosen": w.response_len - 1, "rejected": w.response_len - 1}
