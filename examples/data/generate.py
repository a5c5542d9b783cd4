"""Generate the tiny bundled datasets in this folder (deterministic; committed output).

    python examples/data/generate.py

They describe one small made-up world (animals, their colours, sounds, homes and foods) so that a
tiny model pretrained on `corpus.jsonl` can then be fine-tuned on questions about the same facts
(`alpaca.jsonl`, `chat.jsonl`), and preference-tuned to prefer true answers (`preference.jsonl`,
`prompts.jsonl`). Everything is learnable in a few dozen steps on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

ANIMALS = {
    "cat": ("orange", "meow", "house", "fish"),
    "dog": ("brown", "woof", "kennel", "bones"),
    "cow": ("black", "moo", "barn", "grass"),
    "duck": ("yellow", "quack", "pond", "bread"),
    "sheep": ("white", "baa", "field", "clover"),
    "horse": ("grey", "neigh", "stable", "hay"),
    "pig": ("pink", "oink", "pen", "apples"),
    "owl": ("tawny", "hoot", "tree", "mice"),
    "frog": ("green", "ribbit", "lily pad", "flies"),
    "lion": ("golden", "roar", "den", "meat"),
    "bee": ("striped", "buzz", "hive", "nectar"),
    "goat": ("spotted", "bleat", "hill", "weeds"),
}
NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Juno"]

SENTENCES = [
    "The {a} is {colour}.",
    "The {a} says {sound}.",
    "The {a} lives in the {home}.",
    "The {a} eats {food}.",
    "Every morning the {colour} {a} says {sound} and eats {food}.",
    "{name} saw the {a} near the {home}; it said {sound}.",
    "If you visit the {home}, you will meet the {colour} {a}.",
    "{name} fed {food} to the {a}, and the {a} said {sound}.",
]


def _facts(rng: random.Random, a: str) -> dict[str, str]:
    colour, sound, home, food = ANIMALS[a]
    return {"a": a, "colour": colour, "sound": sound, "home": home, "food": food, "name": rng.choice(NAMES)}


def corpus(rng: random.Random, n: int = 3000) -> list[dict[str, str]]:
    docs = []
    for _ in range(n):
        k = rng.randint(2, 5)
        parts = []
        for _ in range(k):
            a = rng.choice(list(ANIMALS))
            parts.append(rng.choice(SENTENCES).format(**_facts(rng, a)))
        docs.append({"text": " ".join(parts)})
    return docs


QUESTIONS = [
    ("What sound does the {a} make?", "The {a} says {sound}.", "sound"),
    ("What colour is the {a}?", "The {a} is {colour}.", "colour"),
    ("Where does the {a} live?", "The {a} lives in the {home}.", "home"),
    ("What does the {a} eat?", "The {a} eats {food}.", "food"),
]


def alpaca(rng: random.Random, n: int = 3000) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        a = rng.choice(list(ANIMALS))
        q, ans, _ = rng.choice(QUESTIONS)
        f = _facts(rng, a)
        if rng.random() < 0.3:
            rows.append(
                {
                    "instruction": "Answer the question about the animal.",
                    "input": q.format(**f),
                    "output": ans.format(**f),
                }
            )
        else:
            rows.append({"instruction": q.format(**f), "input": "", "output": ans.format(**f)})
    return rows


def chat(rng: random.Random, n: int = 400) -> list[dict[str, list[dict[str, str]]]]:
    rows = []
    for _ in range(n):
        a = rng.choice(list(ANIMALS))
        f = _facts(rng, a)
        turns = rng.sample(QUESTIONS, k=2)
        messages = [{"role": "system", "content": "You answer questions about animals."}]
        for q, ans, _ in turns:
            messages.append({"role": "user", "content": q.format(**f)})
            messages.append({"role": "assistant", "content": ans.format(**f)})
        rows.append({"messages": messages})
    return rows


def preference(rng: random.Random, n: int = 400) -> list[dict[str, str]]:
    """Chosen: the true answer. Rejected: a wrong fact, an evasion, or the right words jumbled —
    the last two give a tiny reward model an easy signal, the first a hard one."""
    rows = []
    animals = list(ANIMALS)
    for _ in range(n):
        a = rng.choice(animals)
        q, ans, slot = rng.choice(QUESTIONS)
        f = _facts(rng, a)
        kind = rng.random()
        if kind < 0.34:
            wrong = dict(f)
            other = rng.choice([x for x in animals if ANIMALS[x] != ANIMALS[a]])
            wrong[slot] = _facts(rng, other)[slot]
            rejected = ans.format(**wrong)
        elif kind < 0.67:
            rejected = rng.choice(["I do not know.", "No idea.", "I cannot say.", "Ask someone else."])
        else:
            words = ans.format(**f).rstrip(".").split()
            rng.shuffle(words)
            rejected = " ".join(words)
        rows.append({"prompt": q.format(**f), "chosen": " " + ans.format(**f), "rejected": " " + rejected})
    return rows


def prompts(rng: random.Random, n: int = 200) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        a = rng.choice(list(ANIMALS))
        q, _, _ = rng.choice(QUESTIONS)
        rows.append({"prompt": q.format(**_facts(rng, a))})
    return rows


def _write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    _write("corpus.jsonl", corpus(random.Random(1)))
    _write("corpus_eval.jsonl", corpus(random.Random(2), n=200))
    _write("alpaca.jsonl", alpaca(random.Random(3)))
    _write("chat.jsonl", chat(random.Random(4)))
    _write("preference.jsonl", preference(random.Random(5)))
    _write("prompts.jsonl", prompts(random.Random(6)))
    (HERE / "corpus.txt").write_text("\n".join(d["text"] for d in corpus(random.Random(7), n=1000)) + "\n")


if __name__ == "__main__":
    main()
