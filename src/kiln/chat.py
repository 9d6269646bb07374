"""`kiln chat`: an interactive conversation that streams tokens and keeps its history.

Commands: /reset forgets the conversation, /exit (or end of input) leaves. When the history no longer
fits the context, the oldest exchanges are dropped. Ctrl-C while a reply streams stops that reply only: what
was shown of it stays in the history and the conversation goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from kiln.engine.generate import Generator
from kiln.engine.sampler import SamplingParams
from kiln.errors import ContextLengthError, KilnError
from kiln.model.load import LoadedModel
from kiln.model.tokenizer import Message


def system_messages(system: str | None) -> list[Message]:
    """The system turn for --system. An empty one is kept, not dropped: a template that adds its own system
    prompt when none is given (SmolLM2's does) renders an empty one instead, so "" is how a user turns it off."""
    return [] if system is None else [{"role": "system", "content": system}]


HELP = "Type a message. /reset forgets the conversation, /exit leaves."


class ChatSession:
    """A conversation with one model: history in, streamed replies out."""

    def __init__(self, loaded: LoadedModel, params: SamplingParams, system: str | None = None,
                 model: object | None = None) -> None:
        # model: what the engine calls (an ONNX Runtime session for --runtime onnxruntime); kiln's graph by default
        self.generator = Generator(model or loaded.model, loaded.tokenizer)  # type: ignore[arg-type]
        self.tokenizer = loaded.tokenizer
        self.params = params
        self.system: list[Message] = system_messages(system)
        self.history: list[Message] = []
        self._check_system()

    def _check_system(self) -> None:
        """Refuse a system message that leaves no room in the context: no history can be dropped to fit it, so
        every message was refused with "shorten the prompt", which the user's own text could not fix."""
        if not self.system:
            return
        tokens = len(self.tokenizer.encode_chat([*self.system, {"role": "user", "content": ""}]))
        if tokens >= self.generator.context:
            raise ContextLengthError(f"--system takes {tokens} tokens in the chat template but the model's context "
                                     f"is {self.generator.context}; shorten it")

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str, on_text: Callable[[str], None]) -> str:
        """Add the user's message, stream the assistant's answer, and keep both in the history.

        A message the model cannot take (KilnError) leaves the history as it was. Ctrl-C (KeyboardInterrupt)
        mid-reply keeps the part of the answer that was shown, as the answer, and is raised again for the caller;
        with nothing shown yet, the history is left as it was."""
        before = self.history
        self.history = [*before, {"role": "user", "content": text}]
        shown: list[str] = []

        def show(delta: str) -> None:
            on_text(delta)
            shown.append(delta)  # after on_text returned: the user saw it

        try:
            prompt, dropped = self._fit_prompt()
            if dropped:
                on_text(f"[dropped the {dropped} oldest messages to fit the context]\n")
            out = self.generator.generate([prompt], self.params, on_text=lambda _row, delta: show(delta))[0]
        except KilnError:
            self.history = before
            raise
        except KeyboardInterrupt:  # the generator has already cancelled the request and freed its cache
            if shown:
                self.history.append({"role": "assistant", "content": "".join(shown)})
            else:
                self.history = before
            raise
        self.history.append({"role": "assistant", "content": out.text})
        return out.text

    def _fit_prompt(self) -> tuple[list[int], int]:
        dropped = 0
        limit = self.generator.context - min(self.params.max_tokens, self.generator.context // 2)
        while True:
            prompt = self.tokenizer.encode_chat(self.system + self.history)
            if len(prompt) <= limit or len(self.history) <= 1:
                return prompt, dropped
            self.history = self.history[2:]  # one user message and its answer
            dropped += 2


def run_repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    interactive = stdin.isatty()
    exit_code = 0  # a message refused on the way (the conversation goes on) makes it non-zero
    if interactive:
        print(HELP, file=stdout)

    def write(delta: str) -> None:
        stdout.write(delta)
        stdout.flush()

    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            return exit_code
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return exit_code
        if text == "/reset":
            session.reset()
            print("[conversation reset]", file=stdout)
            continue
        try:
            session.reply(text, write)
        except KilnError as exc:  # one message too long for the context must not end the conversation
            print(f"kiln: error: {exc}", file=sys.stderr)
            exit_code = exc.exit_code
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat (at the prompt it still leaves)
            stdout.write("\n[reply stopped]\n")
            stdout.flush()
            continue
        stdout.write("\n")
        stdout.flush()
