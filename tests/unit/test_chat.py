"""Chat sessions keep their history, reset it, and drop the oldest turns when the context is full."""

from __future__ import annotations

import io

import pytest

from kiln.chat import ChatSession, run_repl
from kiln.engine.sampler import SamplingParams
from kiln.model.load import LoadedModel

PARAMS = SamplingParams(temperature=0.0, max_tokens=8)


def test_history_is_sent_with_each_turn(default_model: LoadedModel) -> None:
    session = ChatSession(default_model, PARAMS, system="Be brief.")
    first = session.reply("My name is Ada.", lambda _d: None)
    session.reply("What is my name?", lambda _d: None)
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first
    prompt = default_model.tokenizer.decode(session._fit_prompt()[0], skip_special_tokens=False)
    assert "Be brief." in prompt and "My name is Ada." in prompt and first in prompt


def test_reset_forgets(default_model: LoadedModel) -> None:
    session = ChatSession(default_model, PARAMS)
    session.reply("Hello", lambda _d: None)
    session.reset()
    assert session.history == []


def test_oldest_turns_are_dropped_to_fit(default_model: LoadedModel) -> None:
    session = ChatSession(default_model, SamplingParams(temperature=0.0, max_tokens=4000))
    long_text = "word " * 1500
    session.history = [{"role": "user", "content": long_text}, {"role": "assistant", "content": long_text}] * 2
    session.history.append({"role": "user", "content": "Hi"})
    prompt, dropped = session._fit_prompt()
    assert dropped == 2 and len(prompt) <= 8192 - 4000


def test_repl_streams_and_stops_at_exit(default_model: LoadedModel) -> None:
    out = io.StringIO()
    code = run_repl(ChatSession(default_model, PARAMS), io.StringIO("Hi\n/exit\nignored\n"), out)
    assert code == 0 and out.getvalue().strip()


def test_a_message_beyond_the_context_is_refused_and_the_conversation_goes_on(
        default_model: LoadedModel, capsys: pytest.CaptureFixture[str]) -> None:
    # it ended the whole chat (exit 2), and the refused message stayed in the history
    session = ChatSession(default_model, PARAMS)
    session.reply("Hello", lambda _d: None)
    kept = list(session.history)
    out = io.StringIO()
    code = run_repl(session, io.StringIO("word " * 9000 + "\nHi\n"), out)
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "context is 8192" in error
    assert out.getvalue().strip()  # "Hi" was answered after the refusal
    assert session.history[:2] == kept and [m["content"] for m in session.history[2::2]] == ["Hi"]
    assert code == 2  # the refusal still shows in the exit status


def test_a_system_message_over_the_context_is_refused_before_the_conversation(default_model: LoadedModel) -> None:
    # every message was refused instead, each with "shorten the prompt", which the user's text could not fix
    from kiln.errors import ContextLengthError

    system = "word " * (default_model.spec.max_position + 10)
    with pytest.raises(ContextLengthError, match=r"^--system takes \d+ tokens .* context is \d+; shorten it$"):
        ChatSession(default_model, SamplingParams(max_tokens=4), system=system)
    ChatSession(default_model, SamplingParams(max_tokens=4), system="Be brief.")  # one that fits is kept


class _CtrlCOnSecondDelta(io.StringIO):
    """A terminal where Ctrl-C is pressed while the first reply's second piece of text is being shown."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas = 0

    def write(self, text: str) -> int:
        if text.strip() and not text.startswith("["):
            self.deltas += 1
            if self.deltas == 2:
                raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_during_a_reply_stops_it_and_the_conversation_goes_on(default_model: LoadedModel) -> None:
    # KeyboardInterrupt left run_repl: Ctrl-C on a long answer ended the whole chat
    session = ChatSession(default_model, SamplingParams(temperature=0.0, max_tokens=12))
    out = _CtrlCOnSecondDelta()
    code = run_repl(session, io.StringIO("Tell me a story.\nHi\n"), out)
    assert code == 0 and "[reply stopped]" in out.getvalue()
    assert [m["content"] for m in session.history[::2]] == ["Tell me a story.", "Hi"]
    first_shown = out.getvalue().split("\n[reply stopped]")[0]
    assert session.history[1]["content"] == first_shown and first_shown  # what was shown is the answer kept
    engine = session.generator.engine
    assert engine is not None and not engine.has_work and engine.cache.used_blocks == 0


def test_an_empty_system_message_turns_off_the_templates_own(default_model: LoadedModel) -> None:
    # "" was taken as no --system, so SmolLM2's template put its default system prompt back in
    session = ChatSession(default_model, PARAMS, system="")
    session.history = [{"role": "user", "content": "hi"}]
    prompt = default_model.tokenizer.decode(session._fit_prompt()[0], skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi") and "SmolLM" not in prompt
    session = ChatSession(default_model, PARAMS)  # no --system at all: the template's default stays
    session.history = [{"role": "user", "content": "hi"}]
    assert "SmolLM" in default_model.tokenizer.decode(session._fit_prompt()[0], skip_special_tokens=False)
