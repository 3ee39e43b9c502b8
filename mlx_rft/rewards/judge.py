"""RLAIF: an LLM judge as a reward. A rubric (rubric.py) makes the judge's prompts and reads its
scores; a back end answers batches of chat messages.

Back ends implement one small protocol, `async complete(messages_batch) -> list[str | None]`
(None = no answer), plus a `cache_key` string naming the judge model and its settings:

- `MLXJudge`: a local MLX model (another model folder, or the policy itself with its LoRA
  adapters switched off), batched through the rollout engine.
- `OpenAIJudge`: any OpenAI-compatible `/v1/chat/completions` endpoint (mlx_lm.server, vLLM,
  llama.cpp, hosted APIs), with a concurrency limit, timeouts, and retries with exponential backoff
  on connection errors, timeouts, 429 and 5xx. The API key is read at request time from an
  environment variable whose NAME is configured; the key itself is never stored, logged or cached.
  Uses only the standard library (urllib in a thread pool).

`make_judge_reward(rubric, backend)` returns an async reward whose result carries per-criterion
scores (RewardOutput.details) and counters (requests, cache hits, back-end failures, parse
failures) as metrics. Identical judge prompts (e.g. duplicate completions in a GRPO group, or the
same pair in a later epoch) are asked once: a cache keyed by (judge, messages) keeps the judge's
raw replies in memory and, optionally, in a JSONL file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any, Protocol

from ..errors import MlxRftError
from .base import RewardOutput
from .judge_cache import JudgeCache, Messages
from .rubric import Rubric

log = logging.getLogger(__name__)


class JudgeBackend(Protocol):
    cache_key: str

    async def complete(self, messages_batch: Sequence[Messages]) -> list[str | None]: ...


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIJudge:
    """A judge behind an OpenAI-compatible chat endpoint.

    base_url: up to the API version, e.g. "http://127.0.0.1:8080/v1" (requests go to
        base_url + "/chat/completions").
    api_key_env: NAME of the environment variable holding the API key (None: no key sent).
    max_concurrency: requests in flight at once; timeout: seconds per request (connect and each
        read); max_retries: extra attempts after a retryable failure, waiting backoff * 2^k
        seconds (with jitter, at most max_backoff; a 429's Retry-After is honoured up to that cap).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        temperature: float = 0.0,
        max_tokens: int = 256,
        extra_body: dict[str, Any] | None = None,
    ):
        if not re.match(r"^https?://", base_url):
            raise MlxRftError(f"judge base_url {base_url!r} must start with http:// or https://")
        if max_concurrency < 1 or timeout <= 0 or max_retries < 0:
            raise MlxRftError("judge max_concurrency >= 1, timeout > 0 and max_retries >= 0 are required")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self.cache_key = f"openai|{self.url}|{model}|t={temperature}|max={max_tokens}|{sorted(self.extra_body.items())}"
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "bad_responses": 0}
        self.last_error: str | None = None  # the newest failure, for the unscored-rows message
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise MlxRftError(
                    f"the judge API key variable ${self.api_key_env} is not set; export it, or set "
                    "api_key_env to the variable that holds the key (None for no key)"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        """One HTTP POST (runs on a pool thread): (status, body, headers)."""
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as e:
            try:
                data = e.read()
            except Exception:
                data = b""
            return e.code, data, dict(e.headers or {})

    async def complete(self, messages_batch: Sequence[Messages]) -> list[str | None]:
        if not messages_batch:
            return []
        headers = self._headers()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="mlx-rft-judge")
        sem = asyncio.Semaphore(self.max_concurrency)
        answers = list(await asyncio.gather(*(self._one(m, headers, sem) for m in messages_batch)))
        failed = sum(a is None for a in answers)
        if failed:  # one line per batch, so the console shows an unreachable judge at once
            log.warning("judge: %d of %d requests failed (%s)", failed, len(answers), self.last_error)
        return answers

    async def _one(self, messages: Messages, headers: dict[str, str], sem: asyncio.Semaphore) -> str | None:
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        body = json.dumps(payload).encode()
        loop = asyncio.get_running_loop()
        for attempt in range(self.max_retries + 1):
            wait = None
            async with sem:
                self.stats["requests"] += 1
                try:
                    status, data, resp_headers = await asyncio.wait_for(
                        loop.run_in_executor(self._pool, self._post, body, headers), self.timeout * 2 + 5
                    )
                except (urllib.error.URLError, HTTPException, OSError, asyncio.TimeoutError) as e:
                    # Connection refused/reset, DNS, socket timeout (TimeoutError is an OSError).
                    log.debug("judge request failed (attempt %d): %s", attempt + 1, e)
                    self.last_error = f"{self.url}: {type(e).__name__}: {e}"
                    status, data, resp_headers = None, b"", {}
            if status == 200:
                text = _content(data)
                if text is None:
                    self.stats["bad_responses"] += 1
                    log.warning("judge endpoint %s returned an unreadable body: %r", self.url, data[:200])
                return text
            if status in (401, 403):
                raise MlxRftError(
                    f"judge endpoint {self.url} refused the request (HTTP {status}); check the API key "
                    f"in ${self.api_key_env}" if self.api_key_env else
                    f"judge endpoint {self.url} refused the request (HTTP {status}); it needs an API "
                    "key: set api_key_env to the name of the variable that holds it"
                )
            if status == 404:
                raise MlxRftError(
                    f"judge endpoint {self.url} returned 404 for model {self.model!r}; check that "
                    "base_url ends with the API version (e.g. /v1) and that the model name is served"
                )
            if status is not None and status not in _RETRY_STATUS and status < 500:
                # 400/413/422...: this prompt will not work however often we ask.
                log.warning("judge endpoint %s rejected a request (HTTP %s): %r", self.url, status, data[:200])
                self.last_error = f"{self.url} answered HTTP {status}"
                self.stats["failures"] += 1
                return None
            if attempt < self.max_retries:
                self.stats["retries"] += 1
                wait = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                retry_after = _retry_after(resp_headers)
                if retry_after is not None:
                    wait = min(self.max_backoff, max(wait, retry_after))
                await asyncio.sleep(wait)
        self.stats["failures"] += 1
        if status is not None:
            self.last_error = f"{self.url} answered HTTP {status}"
        return None


def _retry_after(headers: dict[str, str]) -> float | None:
    for k, v in headers.items():
        if k.lower() == "retry-after":
            try:
                return max(0.0, float(v))
            except ValueError:
                return None
    return None


def _content(data: bytes) -> str | None:
    """choices[0].message.content of a chat-completions body, or None if it is not one."""
    try:
        obj = json.loads(data)
        content = obj["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


# ---------------------------------------------------------------------------------------------
# Local MLX model


class MLXJudge:
    """A local MLX model as judge: prompts rendered with its chat template, batched generation.

    model, tokenizer: as returned by `mlx_rft.models.load_model` (or mlx-lm's load). Pass the
        policy itself to judge with the base model: `disable_adapters=True` (default) zeroes every
        LoRA scale while judging, so the judge is the frozen base model, not the moving policy.
    chat_template_kwargs: extra template variables, e.g. {"enable_thinking": False} for Qwen3.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str = "mlx-judge",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        batch_size: int = 16,
        disable_adapters: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = max(1, batch_size)
        self.disable_adapters = disable_adapters
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.seed = seed
        self.cache_key = f"mlx|{name}|t={temperature}|max={max_new_tokens}|{sorted(self.chat_template_kwargs.items())}"
        self.stats = {"requests": 0}

    @classmethod
    def from_path(cls, path: str | os.PathLike | None, *, dtype: str | None = None, **kwargs) -> MLXJudge:
        """Load a judge model folder (None: the default model)."""
        from ..models import load_model

        model, tokenizer = load_model(path, dtype=dtype)
        kwargs.setdefault("name", str(path or "default"))
        return cls(model, tokenizer, **kwargs)

    async def complete(self, messages_batch: Sequence[Messages]) -> list[str | None]:
        # Runs on the event loop's thread: MLX evaluation stays on the thread that owns the model;
        # other rewards' HTTP and sandbox threads keep running meanwhile.
        texts: list[str | None] = []
        for start in range(0, len(messages_batch), self.batch_size):
            texts.extend(self.generate(messages_batch[start : start + self.batch_size]))
            await asyncio.sleep(0)
        return texts

    def generate(self, messages_batch: Sequence[Messages]) -> list[str]:
        prompt_ids = [self._encode(m) for m in messages_batch]
        self.stats["requests"] += len(prompt_ids)
        if self.disable_adapters:
            from ..policy.adapters import adapters_disabled

            with adapters_disabled(self.model):
                return self._generate(prompt_ids)
        return self._generate(prompt_ids)

    def _encode(self, messages: Messages) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **self.chat_template_kwargs)
        except Exception:
            if not messages or messages[0]["role"] != "system":
                raise
            # Some templates (e.g. Gemma's) reject a system role: fold it into the first user turn.
            first = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
            ids = self.tokenizer.apply_chat_template(
                [first, *messages[2:]], add_generation_prompt=True, **self.chat_template_kwargs
            )
        return list(ids)

    def _generate(self, prompt_ids: list[list[int]]) -> list[str]:
        from ..rollout import generate_rollouts
        from ..types import SamplingConfig

        sampling = SamplingConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        batch = generate_rollouts(self.model, self.tokenizer, prompt_ids, 1, sampling, seed=self.seed)
        return list(batch.texts)


# ---------------------------------------------------------------------------------------------
# The reward

_CHAT_MARKUP = [
    # ChatML (Qwen, SmolLM): <|im_start|>role\n...<|im_end|>
    re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.DOTALL),
    # Llama 3: <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>
    re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\s*(.*?)(?:<\|eot_id\|>|$)", re.DOTALL),
]


def plain_question(prompt: str) -> str:
    """The last user message of a chat-templated prompt (ChatML or Llama 3), else the prompt."""
    for pattern in _CHAT_MARKUP:
        users = [content for role, content in pattern.findall(prompt) if role == "user"]
        if users:
            return users[-1].strip()
    return prompt


def _as_text(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):  # chat messages
        return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in value)
    return str(value)


def make_judge_reward(
    rubric: Rubric | str | os.PathLike,
    backend: JudgeBackend,
    *,
    name: str = "judge",
    question_column: str | None = None,
    reference_column: str | None = None,
    cache: bool = True,
    cache_path: str | os.PathLike | None = None,
) -> Callable:
    """An async reward: the judge's rubric score in [0, 1] (None when unanswered or unparseable).

    rubric: a Rubric or a YAML path. backend: MLXJudge, OpenAIJudge, or anything with
        `async complete(messages_batch)` and `cache_key`.
    question_column: a column holding the raw question (text or chat messages); by default the
        judge sees the last user message of the chat-templated prompt.
    reference_column: a column with reference answers to show the judge (default: the rubric's).
    The function returns a RewardOutput: per-criterion scores as details, counters as metrics;
    they are also kept on `.last_details` / `.last_metrics`. It is marked `is_judge` so the
    RewardSet reports judge/mean and judge/std (the health monitor watches judge/std).
    """
    if not isinstance(rubric, Rubric):
        from .rubric import load_rubric

        rubric = load_rubric(rubric)
    if not callable(getattr(backend, "complete", None)):
        raise MlxRftError(f"judge backend {backend!r} has no complete(messages_batch) method")
    reference_column = reference_column or rubric.reference_column
    store = JudgeCache(cache_path) if cache else None
    backend_key = getattr(backend, "cache_key", type(backend).__name__)

    async def judge(prompts: list[str], completions: list[str], **columns) -> RewardOutput:
        n = len(completions)
        if question_column is not None and question_column not in columns:
            raise MlxRftError(f"judge {name!r}: question_column {question_column!r} is not in the dataset")
        if reference_column is not None and reference_column not in columns:
            raise MlxRftError(
                f"judge {name!r}: the rubric shows the judge the column {reference_column!r}, which "
                "the dataset lacks; add it or remove reference_column from the rubric"
            )
        messages = []
        for i in range(n):
            question = _as_text(columns[question_column][i]) if question_column else plain_question(prompts[i])
            ref = columns[reference_column][i] if reference_column else None
            messages.append(rubric.messages(question, completions[i], None if ref is None else _as_text(ref)))
        keys = [JudgeCache.key(backend_key, m) for m in messages]
        texts: list[str | None] = [store.get(k) if store else None for k in keys]
        hits = sum(t is not None for t in texts)
        # Ask once per distinct prompt (GRPO groups often hold identical completions).
        todo: dict[str, int] = {}
        for i, t in enumerate(texts):
            if t is None and keys[i] not in todo:
                todo[keys[i]] = i
        answers = await backend.complete([messages[i] for i in todo.values()]) if todo else []
        if len(answers) != len(todo):
            raise MlxRftError(
                f"judge backend {backend!r} returned {len(answers)} answers for {len(todo)} prompts"
            )
        fresh = dict(zip(todo, answers))
        backend_failures = sum(a is None for a in answers)
        for k, a in fresh.items():
            if a is not None and store is not None:
                store.put(k, a)
        for i in range(n):
            if texts[i] is None:
                texts[i] = fresh.get(keys[i])
        scores: list[float | None] = []
        details: dict[str, list[float | None]] = {c.name: [] for c in rubric.criteria}
        parse_failures = 0
        for t in texts:
            parsed = rubric.parse(t)
            if parsed is None:
                parse_failures += t is not None
                scores.append(None)
                for c in rubric.criteria:
                    details[c.name].append(None)
            else:
                scores.append(parsed.score)
                for c in rubric.criteria:
                    details[c.name].append(parsed.normalized[c.name])
        metrics = {
            "requests": float(len(todo)),
            "cache_hits": float(hits),
            "backend_failures": float(backend_failures),
            "parse_failures": float(parse_failures),
        }
        judge.last_texts = texts
        judge.last_details = details
        judge.last_metrics = metrics
        reason = None
        if backend_failures:
            last = getattr(backend, "last_error", None)
            reason = f"{backend_failures} of {len(todo)} judge requests failed" + (f" ({last})" if last else "")
        elif parse_failures:
            reason = f"{parse_failures} judge replies could not be parsed as rubric scores"
        return RewardOutput(scores=scores, details=details, metrics=metrics, reason=reason)

    judge.__name__ = judge.__qualname__ = name
    judge.is_judge = True
    judge.rubric = rubric
    judge.backend = backend
    judge.cache = store
    judge.last_texts, judge.last_details, judge.last_metrics = [], {}, {}
    return judge


def judge_from_spec(
    rubric: str,
    *,
    url: str | None = None,
    model: str | None = None,
    local_model: str | None = None,
    api_key_env: str | None = None,
    cache_path: str | None = None,
    question_column: str | None = None,
    name: str = "judge",
    **backend_kwargs,
) -> Callable:
    """The `judge(...)` reward spec: a rubric file plus an endpoint (url + model) or a local model
    folder (local_model), e.g.
    `judge(rubric='examples/rubrics/helpfulness.yaml', url='http://127.0.0.1:8080/v1', model='default_model')`.
    Extra arguments go to the back end (timeout, max_concurrency, max_tokens / max_new_tokens, ...)."""
    if (url is None) == (local_model is None):
        raise MlxRftError(
            "judge(...) needs exactly one back end: url='http://HOST:PORT/v1' (with model=...) for an "
            "OpenAI-compatible server, or local_model='path/to/model' for a local MLX model"
        )
    try:
        if url is not None:
            backend = OpenAIJudge(url, model or "default_model", api_key_env=api_key_env, **backend_kwargs)
        else:
            backend = MLXJudge.from_path(local_model, **backend_kwargs)
    except TypeError as e:
        raise MlxRftError(f"judge(...): {e}") from None
    return make_judge_reward(rubric, backend, name=name, question_column=question_column, cache_path=cache_path)
