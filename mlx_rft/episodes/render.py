"""The token ids an environment's reply is fed as: the chat template's own text between the end of
a model turn and the start of the next one.

The model's turns are never re-rendered: their tokens are the ones it sampled. Only the part the
template adds after an assistant turn (its end marker, the reply messages, the next generation
prompt) is rendered, from a probe conversation whose assistant content is a sentinel string:

    render([user, assistant(SENTINEL)] + reply, add_generation_prompt=True)
        = <anything> SENTINEL <end marker> <reply messages> <generation prompt>
                              \\_________________ fed as the reply __________/

If the turn ended with the tokenizer's EOS and the end marker starts with that EOS's text (ChatML's
`<|im_end|>`), the sampled EOS already wrote it, so it is not fed twice.
"""

from __future__ import annotations

from ..errors import MlxRftError

SENTINEL = "\u2063mlx-rft-turn\u2063"


class ReplyRenderer:
    """Renders environment replies into token ids with a tokenizer's chat template."""

    def __init__(self, tokenizer, tools: list[dict] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools or None
        self.eos_ids = {int(t) for t in tokenizer.eos_token_ids}
        self.eos_texts = sorted({tokenizer.decode([t]) for t in self.eos_ids} - {""}, key=len, reverse=True)
        self._probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": SENTINEL}]

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        kw = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kw
        )

    def reply_text(self, reply: list[dict], ended_with_eos: bool) -> str:
        text = self.render(self._probe + list(reply), add_generation_prompt=True)
        at = text.find(SENTINEL)
        if at < 0:
            raise MlxRftError(
                "the chat template drops the assistant's content when a reply follows it, so the "
                "environment's reply cannot be rendered after a model turn; use a model whose chat "
                "template renders assistant messages"
            )
        tail = text[at + len(SENTINEL) :]
        if ended_with_eos:
            for eos in self.eos_texts:
                if tail.startswith(eos):
                    tail = tail[len(eos) :]
                    break
        return tail

    def reply_ids(self, reply: list[dict], last_token: int | None) -> list[int]:
        """Token ids to feed after a turn whose last sampled token is `last_token`."""
        text = self.reply_text(reply, ended_with_eos=last_token in self.eos_ids)
        return list(self.tokenizer.encode(text, add_special_tokens=False))
