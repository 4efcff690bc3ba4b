"""Writes this example's data files (run once; the files are shipped with it).

    python examples/arith/make_data.py

The target is 2-digit addition; the tasks are addition with the operands
swapped (helpful), multiplication (unrelated answers) and digit reversal
(neutral), 200 examples each, and `later.jsonl` (more addition) for a task
registered while a job runs. Each file is JSONL of {"prompt", "completion"}.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = {
    "target": lambda a, b: (f"{a}+{b}=", str(a + b)),
    "add": lambda a, b: (f"{b}+{a}=", str(a + b)),
    "mul": lambda a, b: (f"{a}*{b}=", str(a * b)),
    "rev": lambda a, b: (f"rev {a}{b}=", f"{a}{b}"[::-1]),
    "later": lambda a, b: (f"{a}+{b}+0=", str(a + b)),
}


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    rng = random.Random(0)
    for name, make in TASKS.items():
        rows = [make(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(200)]
        text = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows)
        (out / f"{name}.jsonl").write_text(text)


if __name__ == "__main__":
    main()
