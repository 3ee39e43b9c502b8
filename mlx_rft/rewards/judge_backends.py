"""Judge back ends: who answers the judge's chat messages, as text or as option log-probs.

A back end has a `cache_key` string naming the judge model and its settings, and
`async complete(messages_batch) -> list[str | None]` (None = no answer). Back ends that can read
the judge's next-token distribution also have
`async option_logprobs(messages_batch, options, groups=None) -> list[OptionReply | None]`, the
log-probability that the reply starts with each option string ("1".."10", or "A", "B"), which
the probability and pairwise methods need (see judge_scoring.py for the maths).

- `MLXJudge`: a local MLX model (another model folder, or the policy itself with its LoRA
  adapters switched off). Text: batched through the rollout engine. Options: one teacher-forced
  forward pass per row, no decoding; the rows of a group share their judge prompt up to the
  response (system rubric, few-shot examples, question), which is prefilled once per batch and
  handed to each row through its KV cache (`PaddedKVCache.take`, as the training log-probs do).
- `OpenAIJudge`: any OpenAI-compatible `/v1/chat/completions` endpoint (mlx_lm.server, vLLM,
  llama.cpp, hosted APIs), with a concurrency limit, timeouts, and retries with exponential backoff
  on connection errors, timeouts, 429 and 5xx. The API key is read at request time from an
  environment variable whose NAME is configured; the key itself is never stored, logged or cached.
  Uses only the standard library (urllib in a thread pool). Options: a request for a few tokens
  with `logprobs: true, top_logprobs: K`; the reply text comes back too, for servers that ignore
  logprobs (the caller then parses it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any, Protocol

from ..errors import MlxRftError
from .judge_cache import Messages
from .judge_scoring import OptionTrie, option_logprobs_from_top

log = logging.getLogger(__name__)


@dataclass
class OptionReply:
    """The judge's answer as option log-probs: {option: log p} (options it gave no mass are
    absent; empty when the server returned no log-probs), and the reply text when there is one."""

    logprobs: dict[str, float] = field(default_factory=dict)
    text: str | None = None

    def to_json(self) -> str:
        return json.dumps({"logprobs": self.logprobs, "text": self.text}, ensure_ascii=False)

    @classmethod
    def from_json(cls, blob: str) -> OptionReply:
        obj = json.loads(blob)
        return cls({str(k): float(v) for k, v in obj["logprobs"].items()}, obj.get("text"))


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
    top_logprobs: K alternatives per token asked for by the option log-probs (mlx_lm.server
        accepts at most 11, OpenAI 20).
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
        top_logprobs: int = 10,
        extra_body: dict[str, Any] | None = None,
    ):
        if not re.match(r"^https?://", base_url):
            raise MlxRftError(f"judge base_url {base_url!r} must start with http:// or https://")
        if max_concurrency < 1 or timeout <= 0 or max_retries < 0:
            raise MlxRftError("judge max_concurrency >= 1, timeout > 0 and max_retries >= 0 are required")
        if not 1 <= top_logprobs <= 20:
            raise MlxRftError(f"judge top_logprobs={top_logprobs} must be between 1 and 20")
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
        self.top_logprobs = top_logprobs
        self.extra_body = dict(extra_body or {})
        self.cache_key = (
            f"openai|{self.url}|{model}|t={temperature}|max={max_tokens}|{sorted(self.extra_body.items())}"
            + (f"|top={top_logprobs}" if top_logprobs != 10 else "")  # the default keeps older cache keys
        )
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "bad_responses": 0, "tokens": 0}
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

    async def _batch(self, messages_batch: Sequence[Messages], read, **params) -> list:
        """One request per chat, concurrently; `read(choice) -> answer | None` per 200 reply."""
        if not messages_batch:
            return []
        headers = self._headers()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="mlx-rft-judge")
        sem = asyncio.Semaphore(self.max_concurrency)
        payloads = [{"model": self.model, "messages": m, "temperature": self.temperature, **params,
                     **self.extra_body} for m in messages_batch]
        answers = list(await asyncio.gather(*(self._one(p, headers, sem, read) for p in payloads)))
        failed = sum(a is None for a in answers)
        if failed:  # one line per batch, so the console shows an unreachable judge at once
            log.warning("judge: %d of %d requests failed (%s)", failed, len(answers), self.last_error)
        return answers

    async def complete(self, messages_batch: Sequence[Messages]) -> list[str | None]:
        return await self._batch(messages_batch, _content, max_tokens=self.max_tokens)

    async def option_logprobs(
        self, messages_batch: Sequence[Messages], options: Sequence[str], groups: Sequence | None = None
    ) -> list[OptionReply | None]:
        """Option log-probs from the top-K log-probs of a short reply (groups: unused here; the
        server's own prompt cache shares prefixes)."""
        options = [str(o) for o in options]
        # One token more than the longest option: room for a leading space token.
        max_tokens = max(len(o) for o in options) + 1

        def read(choice: dict) -> OptionReply | None:
            message = choice.get("message") or {}
            text = message.get("content") if isinstance(message.get("content"), str) else None
            content = (choice.get("logprobs") or {}).get("content") or []
            top, sampled = [], []
            for pos in content:
                alts = {a["token"]: float(a["logprob"]) for a in pos.get("top_logprobs") or []
                        if isinstance(a, dict) and "token" in a and a.get("logprob") is not None}
                top.append(alts)
                # At temperature 0 the generated token is the most likely one; mlx_lm.server's
                # per-position "token" field is just one of the top-K, not the generated token.
                sampled.append(max(alts, key=alts.get) if alts and self.temperature == 0 else pos.get("token", ""))
            if not top and text is None:
                return None
            return OptionReply(option_logprobs_from_top(top, sampled, options), text)

        return await self._batch(
            messages_batch, read, max_tokens=max_tokens, logprobs=True, top_logprobs=self.top_logprobs
        )

    async def _one(self, payload: dict, headers: dict[str, str], sem: asyncio.Semaphore, read):
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
                choice = self._choice(data)
                answer = read(choice) if choice is not None else None
                if answer is None:
                    self.stats["bad_responses"] += 1
                    log.warning("judge endpoint %s returned an unreadable body: %r", self.url, data[:200])
                return answer
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

    def _choice(self, data: bytes) -> dict | None:
        """choices[0] of a chat-completions body (usage tokens counted), or None."""
        try:
            obj = json.loads(data)
            choice = obj["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            tokens = usage.get("total_tokens") or (usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
            if isinstance(tokens, (int, float)):
                self.stats["tokens"] += int(tokens)
        return choice if isinstance(choice, dict) else None


def _retry_after(headers: dict[str, str]) -> float | None:
    for k, v in headers.items():
        if k.lower() == "retry-after":
            try:
                return max(0.0, float(v))
            except ValueError:
                return None
    return None


def _content(choice: dict) -> str | None:
    """message.content of a chat-completions choice, or None if it has none."""
    content = (choice.get("message") or {}).get("content")
    return content if isinstance(content, str) else None


# ---------------------------------------------------------------------------------------------
# Local MLX model


class MLXJudge:
    """A local MLX model as judge: prompts rendered with its chat template.

    model, tokenizer: as returned by `mlx_rft.models.load_model` (or mlx-lm's load). Pass the
        policy itself to judge with the base model: `disable_adapters=True` (default) zeroes every
        LoRA scale while judging, so the judge is the frozen base model, not the moving policy.
    batch_size: rows per forward pass (text: prompts per generation batch).
    chat_template_kwargs: extra template variables, e.g. {"enable_thinking": False} for Qwen3.

    Option log-probs read the reply's first tokens right after the template's generation prompt;
    options are tokenised as text that follows a newline, which is how ChatML, Llama 3, Gemma and
    Phi-3 generation prompts end.
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
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = max(1, batch_size)
        self.disable_adapters = disable_adapters
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.seed = seed
        self.cache_key = f"mlx|{name}|t={temperature}|max={max_new_tokens}|{sorted(self.chat_template_kwargs.items())}"
        self.stats = {"requests": 0, "tokens": 0}
        self._tries: dict[tuple[str, ...], OptionTrie] = {}

    def __repr__(self) -> str:
        return f"MLXJudge(model={self.name!r})"

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

    async def option_logprobs(
        self, messages_batch: Sequence[Messages], options: Sequence[str], groups: Sequence | None = None
    ) -> list[OptionReply | None]:
        """Option log-probs, one forward row per chat. Rows with equal `groups` entries (default:
        all rows) share their common prompt prefix; put a group's rows next to each other."""
        groups = [0] * len(messages_batch) if groups is None else list(groups)
        out: list[OptionReply | None] = []
        for start in range(0, len(messages_batch), self.batch_size):
            end = start + self.batch_size
            out.extend(self.score_options(messages_batch[start:end], options, groups[start:end]))
            await asyncio.sleep(0)
        return out

    def generate(self, messages_batch: Sequence[Messages]) -> list[str]:
        prompt_ids = [self._encode(m) for m in messages_batch]
        self.stats["requests"] += len(prompt_ids)
        with self._judging():
            return self._generate(prompt_ids)

    def score_options(
        self, messages_batch: Sequence[Messages], options: Sequence[str], groups: Sequence | None = None
    ) -> list[OptionReply]:
        """{option: log p} for each chat, from one batched forward pass (see option_logprobs)."""
        trie = self._trie(options)
        prompts = [self._encode(m) for m in messages_batch]
        groups = [0] * len(prompts) if groups is None else list(groups)
        self.stats["requests"] += len(prompts)
        with self._judging():
            per_row = _forward_options(self.model, prompts, groups, trie, self.stats)
        return [OptionReply({o: lp for o, lp in trie.logprobs(row).items() if math.isfinite(lp)}) for row in per_row]

    def _judging(self):
        import contextlib

        from .. import cpu

        stack = contextlib.ExitStack()
        stack.enter_context(cpu.speedups(self.model))
        if self.disable_adapters:
            from ..policy.adapters import adapters_disabled

            stack.enter_context(adapters_disabled(self.model))
        return stack

    def _trie(self, options: Sequence[str]) -> OptionTrie:
        key = tuple(str(o) for o in options)
        if key not in self._tries:
            newline = list(self.tokenizer.encode("\n", add_special_tokens=False))
            ids = {}
            for o in key:
                full = list(self.tokenizer.encode("\n" + o, add_special_tokens=False))
                ok = full[: len(newline)] == newline and len(full) > len(newline)
                ids[o] = full[len(newline) :] if ok else list(self.tokenizer.encode(o, add_special_tokens=False))
            self._tries[key] = OptionTrie.build(ids)
        return self._tries[key]

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
        from ..rollout import RolloutStats, generate_rollouts
        from ..types import SamplingConfig

        sampling = SamplingConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        stats = RolloutStats()
        batch = generate_rollouts(self.model, self.tokenizer, prompt_ids, 1, sampling, seed=self.seed, stats=stats)
        self.stats["tokens"] += stats.prompt_tokens + stats.completion_tokens
        return list(batch.texts)


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for k in range(n):
        if any(r[k] != first[k] for r in rows[1:]):
            return k
    return n


def _forward_options(model, prompts: list[list[int]], groups: list, trie: OptionTrie, stats: dict) -> list[list[dict]]:
    """Per row, per chain position k: {token id: log p} for trie.needed[k].

    Each row runs prompt + trie.chain. The common prefix of each group's rows (at least one
    token of every row left over) is prefilled once, left-padded; each row then runs only its own
    suffix, right-padded, on a gathered copy of its group's cache, and the LM head runs on the
    len(chain) + 1 positions that are read.
    """
    import mlx.core as mx

    from ..policy.head import split_model
    from ..policy.kv_cache import make_caches

    if any(len(p) < 2 for p in prompts):
        raise MlxRftError("a judge prompt rendered to fewer than 2 tokens; check the judge model's chat template")
    body, _, head = split_model(model)
    L = len(trie.chain)
    shared = {}
    for g in dict.fromkeys(groups):
        rows = [p for p, h in zip(prompts, groups) if h == g]
        shared[g] = min(_common_prefix(rows), min(len(p) for p in rows) - 1)
    order = list(dict.fromkeys(groups))
    prefixes = [prompts[groups.index(g)][: shared[g]] for g in order]
    width = max(len(p) for p in prefixes)
    pads = [width - len(p) for p in prefixes]
    cache = make_caches(model, pads)
    body(mx.array([[0] * pad + p for pad, p in zip(pads, prefixes)], dtype=mx.int32), cache=cache)
    mx.eval([c.keys for c in cache] + [c.values for c in cache])  # the prefix logits are never needed

    suffixes = [p[shared[g] :] + trie.chain for p, g in zip(prompts, groups)]
    S = max(len(s) for s in suffixes)
    rows = mx.array([s + [0] * (S - len(s)) for s in suffixes], dtype=mx.int32)
    taken = [c.take(mx.array([order.index(g) for g in groups])) for c in cache]
    hidden = body(rows, cache=taken)  # right padding comes after every position that is read
    positions = mx.array([[len(s) - 1 - L + k for k in range(L + 1)] for s in suffixes])
    picked = hidden[mx.arange(len(prompts))[:, None], positions]  # [n, L + 1, H] (or logits)
    logits = (head(picked) if head is not None else picked).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    reads = [logp[:, k, mx.array(ids)] for k, ids in enumerate(trie.needed)]
    mx.eval(reads)
    stats["tokens"] = stats.get("tokens", 0) + sum(len(p) for p in prefixes) + sum(len(s) for s in suffixes)
    values = [r.tolist() for r in reads]
    return [
        [dict(zip(trie.needed[k], values[k][i])) for k in range(L + 1)] for i in range(len(prompts))
    ]
