"""Judge replies cached by (judge, messages) hash, so identical judge prompts are asked once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

Messages = list[dict[str, str]]


class JudgeCache:
    """Judge replies by (judge, messages) hash: in memory, and appended to a JSONL file if given."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path else None
        self._mem: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            with self.path.open() as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self._mem[row["key"]] = row["text"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line from an interrupted run

    @staticmethod
    def key(backend_key: str, messages: Messages) -> str:
        blob = json.dumps([backend_key, messages], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, key: str) -> str | None:
        return self._mem.get(key)

    def put(self, key: str, text: str) -> None:
        if key in self._mem:
            return
        self._mem[key] = text
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
