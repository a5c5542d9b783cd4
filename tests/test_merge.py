"""Adapter mixing (FineTuneJob method merge), for real: two tiny LoRA adapters learn two different
tasks, the merge job mixes them through the same path as `forgeline run` (Ray Jobs API →
`python -m forgeline_trainer`), and the numbers show the mix keeps a measured part of both skills.

The two adapters train in this process with plain PEFT (a few seconds; the recipe that trains
LoRA adapters has its own tests in test_trainer.py): a tiny llama with a tokenizer trained on
the bundled corpus, one adapter on `colour` ("What colour is the owl?" → "The owl is brown."),
one on `count` ("Count from 3 to 6." → "3, 4, 5, 6."). Held-out records of each task are the
merge job's spec.dataset: one source per task.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from forgeline_operator.api import parse_job
from forgeline_operator.cli.runlocal import RunResult, run_job
from forgeline_operator.rayclient.localray import LocalRay
from forgeline_operator.rayclient.rayjobs import RayJobs, local_python

from .conftest import EXAMPLES

pytestmark = pytest.mark.trainer

ANIMALS = {
    "owl": "brown",
    "duck": "yellow",
    "frog": "green",
    "crow": "black",
    "swan": "white",
    "fox": "red",
    "pig": "pink",
    "whale": "blue",
    "bee": "gold",
    "mouse": "grey",
    "bear": "dark",
    "sheep": "cream",
}
COLOUR_ASKS = (
    "What colour is the {a}?",
    "Tell me the colour of the {a}.",
    "Which colour does the {a} have?",
    "Say what colour the {a} is.",
)
R = 8  # both adapters: same rank, so linear and TIES/DARE apply


def _colour_records() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held out): every animal under three phrasings; the fourth phrasing is held out."""
    rows = [
        (k, {"instruction": ask.format(a=a), "input": "", "output": f"The {a} is {c}."})
        for k, ask in enumerate(COLOUR_ASKS)
        for a, c in ANIMALS.items()
    ]
    return [r for k, r in rows if k != 3], [r for k, r in rows if k == 3]


def _count_records() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held out): count from a to a+n-1 (a 1..15, n 3..5); a random quarter held out."""
    rows = [
        {
            "instruction": f"Count from {a} to {a + n - 1}.",
            "input": "",
            "output": ", ".join(str(i) for i in range(a, a + n)) + ".",
        }
        for a in range(1, 16)
        for n in (3, 4, 5)
    ]
    random.Random(0).shuffle(rows)
    return rows[12:], rows[:12]


@dataclass(frozen=True)
class Setup:
    base: Path
    adapters: dict[str, Path]
    eval_data: dict[str, Path]
    work: Path


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tiny_base(out: Path, texts: list[str], seed: int = 0, steps: int = 60) -> Path:
    """A 2-layer llama (hidden 64) from a config, with a BPE tokenizer trained on `texts`, then
    `steps` full-weight steps on word salad from `texts` (the words' embeddings, no task)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgeline_trainer import data as D

    tok = D.train_tokenizer(texts, 512, out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    words = sorted({w for t in texts for w in t.split()})
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        salad = [" ".join(rng.choices(words, k=24)) for _ in range(16)]
        batch = tok(salad, return_tensors="pt", padding=True, truncation=True, max_length=64)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def _train_adapter(base: Path, records: list[dict[str, str]], out: Path, steps: int = 150) -> Path:
    """A LoRA adapter (r 8, all linear layers) trained on the records' responses, plain PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from forgeline_trainer import data as D
    from forgeline_trainer import sft_data

    tok = D.load_tokenizer(str(base))
    examples = [sft_data.tokenize_example(r, "alpaca", tok, 96, False) for r in records]
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(
            r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(steps):
        batch = sft_data.collate(rng.sample(examples, 16), tok.pad_token_id, "cpu")
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    import torch

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("merge")
    colour_train, colour_eval = _colour_records()
    count_train, count_eval = _count_records()
    sample = [json.dumps(r) for r in colour_train + count_train]
    corpus = (EXAMPLES / "data/corpus.txt").read_text().splitlines()
    texts = corpus + [f"{r['instruction']} {r['output']}" for r in colour_train + count_train] + sample
    base = _tiny_base(root / "base", texts)
    return Setup(
        base=base,
        adapters={
            "colour": _train_adapter(base, colour_train, root / "adapter-colour"),
            "count": _train_adapter(base, count_train, root / "adapter-count"),
        },
        eval_data={
            "colour": _write_jsonl(root / "colour.jsonl", colour_eval),
            "count": _write_jsonl(root / "count.jsonl", count_eval),
        },
        work=root,
    )


@pytest.fixture(scope="module")
def ray_jobs() -> Iterator[RayJobs]:
    with LocalRay() as head:
        yield RayJobs(head.address, python=local_python(), token=head.token)


def _merge_job(s: Setup, name: str, combination: str, **merge: Any) -> Any:
    adapters = merge.pop(
        "adapters", [{"path": str(s.adapters[t]), "name": t, "weight": 0.5} for t in ("colour", "count")]
    )
    return parse_job(
        {
            "apiVersion": "forgeline.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"path": str(merge.pop("base", s.base))},
                "method": "merge",
                "merge": {"adapters": adapters, "combination": combination, **merge},
                "dataset": {
                    "sources": [{"uri": str(s.eval_data[t])} for t in ("colour", "count")],
                    "format": "alpaca",
                    "maxSequenceLength": 96,
                },
                "resources": {"workers": 1, "cpu": "1", "memory": "2Gi", "sharedMemory": "256Mi"},
                "output": {"uri": str(s.work / "out" / name)},
            },
        }
    )


def _run(ray_jobs: RayJobs, s: Setup, job: Any, expect_ok: bool = True) -> tuple[RunResult, dict[str, Any]]:
    console = Console(file=open(os.devnull, "w"), force_terminal=False)  # noqa: SIM115
    result = run_job(job, ray_jobs, console, output=None, done={}, work_dir=str(s.work), quiet=True)
    if expect_ok and not result.ok:
        log = "\n".join(ray_jobs.logs(result.submission_id).splitlines()[-60:])
        pytest.fail(f"{job.metadata.name} {result.status}:\n{log}")
    path = Path(result.output) / "metrics.json"
    return result, json.loads(path.read_text()) if result.ok else {}


def _losses(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        task: {who: round(m["eval_loss"], 3) for who, m in row.items()}
        for task, row in metrics["evaluation"].items()
    }


KEPT = 0.4
"""The part of each adapter's gain over the base (held-out loss) the mix must keep, at least."""


def _assert_keeps_both_skills(metrics: dict[str, Any]) -> None:
    """On each task the mix keeps at least KEPT of the task's own adapter's gain over the base,
    and is nearer that adapter than the other adapter is: a measured part of both skills."""
    losses = _losses(metrics)
    print(f"\n{metrics['combination']}: held-out response loss per task {losses}")
    for task, other in (("colour", "count"), ("count", "colour")):
        row = losses[task]
        own, foreign, base, mix = row[f"adapter:{task}"], row[f"adapter:{other}"], row["base"], row["merge"]
        assert own < 0.7 * base and own < foreign, (
            f"{task}: the adapters did not learn distinct skills ({row})"
        )
        kept = (base - mix) / (base - own)
        assert kept >= KEPT, f"{task}: the mix keeps {kept:.0%} of the adapter's gain ({row})"
        assert mix - own < foreign - own, (
            f"{task}: the mix is no nearer the task's adapter than the other ({row})"
        )


def test_linear_merge_keeps_both_skills_and_reloads(ray_jobs: RayJobs, setup: Setup) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, metrics = _run(ray_jobs, setup, _merge_job(setup, "mix-linear", "linear", mergeIntoBase=True))
    _assert_keeps_both_skills(metrics)
    evals = [r for r in result.records if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 1]  # base before → mix after (the Eval column)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    assert result.last("done")["output"] == result.output
    assert metrics["method"] == "merge" and metrics["merged_rank"] == R
    assert metrics["initial_eval"]["eval_loss"] == pytest.approx(evals[0]["eval_loss"], abs=1e-5)
    out = Path(result.output)
    # the mixed adapter is a plain PEFT adapter: it reloads on the base and gives the recipe's logits
    probe = load_file(str(out / "probe.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.base), out).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)
    # mergeIntoBase: the full model under merged/ loads with plain transformers, same logits
    full = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            full(input_ids=probe["input_ids"]).logits, probe["logits"], atol=1e-4, rtol=1e-4
        )
    assert (out / "merged" / "tokenizer.json").exists() and (out / "tokenizer.json").exists()


@pytest.mark.soak  # the linear mix runs every suite: TIES is the same job with PEFT's ties combination
def test_ties_merge_keeps_both_skills(ray_jobs: RayJobs, setup: Setup) -> None:
    _, metrics = _run(ray_jobs, setup, _merge_job(setup, "mix-ties", "ties", density=0.5))
    _assert_keeps_both_skills(metrics)
    assert not (Path(setup.work / "out/mix-ties") / "merged").exists()


def test_adapter_of_another_base_fails_naming_the_field(ray_jobs: RayJobs, setup: Setup) -> None:
    """An adapter trained on a different base (same architecture, other weights) fails in the
    driver's check, before any worker starts, with a ConfigError naming the adapter."""
    other = _tiny_base(
        setup.work / "other-base", [setup.eval_data["colour"].read_text()] * 5, seed=1, steps=0
    )
    result, _ = _run(ray_jobs, setup, _merge_job(setup, "mix-bad-base", "cat", base=other), expect_ok=False)
    assert result.status == "FAILED"
    (error,) = [r for r in result.records if r["type"] == "error"]
    assert error["reason"] == "ConfigError", error
    assert error["message"].startswith("spec.merge.adapters[0]: the adapter at "), error
    assert "fix: set spec.baseModel to the model the adapters were trained on" in error["message"]
    assert not any(r.get("message") == "adapters loaded" for r in result.records)
