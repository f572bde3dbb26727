"""The terminal side of stage=generate: a prompt completed with its text streamed as decoded, and the REPL —
prompts and `:` commands (`:help`, `:rating NAME`, `:<setting> VALUE`) until `exit`, with line editing and
history on a terminal, line by line from a pipe. The REPL samples afresh each time (a new seed per prompt, said
after its completion) until `:seed N` pins one; Ctrl-C stops a completion and returns to the prompt."""

from __future__ import annotations

import logging
import re
import secrets
import signal

from prompt_toolkit import PromptSession
from prompt_toolkit.input import create_input
from prompt_toolkit.output import create_output

from kr3 import api, ratings
from kr3.errors import UserError
from kr3.sampling import DECODING, END_OF_REVIEW, cut_note, decoding
from kr3.settings import Generate, check_value

log = logging.getLogger(__name__)

EXIT_WORDS = {"exit", "quit"}
# generate.<key>s that `:<key> VALUE` changes (their ranges: kr3.settings.Generate's)
SETTINGS = (*(k for k in DECODING if k not in ("stop", "rating")), "show_next")
RATED = ("rating", "guidance")  # settings of a rating-conditioned checkpoint only
COMMAND = re.compile(r":([A-Za-z_]+)\s*(.*)")  # `:` and a letter: a prompt like ":)" stays a prompt
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Text safe to write to a terminal: control characters shown escaped (ESC as \\x1b), so a prompt or a
    sampled byte cannot recolor the terminal or move its cursor."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def answer(m: api.Model, g, prompt: str, out, say_seed: bool = False) -> None:
    """Complete `prompt` on the terminal with settings `g`: it is echoed as the model is given it (cleaned; a prompt
    longer than the context: said first, on its own line, then its part kept), completions streamed. `g.seed` None
    (the REPL's default): a fresh seed, which `say_seed` prints after it."""
    if g.show_next:
        out.write(next_token_table(m.next_tokens(prompt, int(g.show_next), rating=g.rating, guidance=g.guidance)))
    given, kept, total = m.given(prompt, g.rating)
    if kept < total:
        out.flush()
        log.warning(cut_note(total, kept))
    options = {**decoding(g), "seed": secrets.randbelow(2**31) if g.seed is None else g.seed}
    for sample in range(int(g.num_samples)):
        out.write(visible(given))
        for piece in m.stream(prompt, sample, **options):
            out.write(visible(piece))
            out.flush()
        out.write("\n")
        out.flush()
    if say_seed:
        seed = options["seed"]
        out.write(f"(seed {seed}{' + the sample' if int(g.num_samples) > 1 else ''}: `:seed {seed}` repeats it)\n")


def next_token_table(choices: list[tuple[str, float]]) -> str:
    """show_next's lines: a header, then each token's probability and text, quoted so its spaces show."""
    rows = [f"  {percent(p):>8}  {text if text == END_OF_REVIEW else quoted(text)}" for text, p in choices]
    return "\n".join(["most likely next tokens (text in quotes, so its spaces show):", *rows]) + "\n"


def percent(p: float) -> str:
    """A probability as a percentage, with two significant digits below 0.1 % (a weak model's are small, not 0.0 %)."""
    return f"{p:.1%}" if p >= 0.001 else f"{p * 100:.2g}%"


def quoted(text: str) -> str:
    return '"' + visible(text) + '"'


def repl(m: api.Model, g, stdin, out) -> None:
    """Read prompts and `:` commands until `exit`/`quit` or end of input (Ctrl-D); Ctrl-C stops a completion (or
    clears the line typed) and returns to the prompt. On a terminal with line editing and history; on a pipe line by
    line (where Ctrl-C ends it)."""
    try:
        for line in typed_lines(stdin, out):
            text = line.strip()
            if not text:
                continue
            try:
                text.encode("utf-8")  # undecodable input bytes arrive as surrogates
            except UnicodeEncodeError:
                out.write("(that line is not UTF-8 text: set your terminal to UTF-8)\n")
                continue
            if text.lower() in EXIT_WORDS:
                break
            if COMMAND.fullmatch(text):
                out.write(command(g, text, m) + "\n")
            else:
                interruptible(answer, m, g, text, out, say_seed=True)
    except KeyboardInterrupt:
        out.write("\n")


def interruptible(work, *args, **kwargs) -> None:
    """`work(*args)` (its output stream `args[-1]`), which Ctrl-C stops: back to the prompt, the REPL and its history as
    they were."""
    out = args[-1]
    try:
        work(*args, **kwargs)
    except KeyboardInterrupt:
        out.write("\n(stopped)\n")
        out.flush()


def typed_lines(stdin, out):
    """Lines as typed: on a terminal through prompt_toolkit (arrow keys, history, Hangul and other wide characters
    edited whole); from a pipe or file as read."""
    if not (stdin.isatty() and out.isatty()):
        if hasattr(stdin, "reconfigure"):
            stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 gets a message, not a traceback
        yield from iter(stdin.readline, "")
        return
    out.write("Type the start of a review; `:help` lists the commands and settings; `exit` or Ctrl-D quits.\n")
    # Ctrl-C stops a completion (KeyboardInterrupt) even where the launcher left SIGINT ignored, as a shell's
    # background job is
    signal.signal(signal.SIGINT, signal.default_int_handler)
    session = PromptSession(input=create_input(stdin), output=create_output(out))  # history in memory only
    while True:
        try:
            yield session.prompt("> ")
        except KeyboardInterrupt:
            continue  # the line typed is dropped, as a shell does
        except EOFError:
            return


def command(g, text: str, m: api.Model) -> str:
    """Run a `:command` line — `:help`, `:rating NAME`, or `:<setting> VALUE` checked like generate.<setting> —
    and say what it did."""
    name, arg = COMMAND.fullmatch(text).groups()
    name, known = name.lower(), commands(m)
    if name == "help":
        return help_text(g, known)
    if name in RATED and name not in known:
        return f":{name} steers a rating, and this checkpoint was trained without them (data.condition=rating has them)"
    if name not in known:
        return f"unknown command :{name} — use one of: :help, {', '.join(':' + k for k in known)}, exit"
    if name == "rating":
        return rating_command(g, arg, m)
    if not arg:
        return f"{name}={value_text(getattr(g, name))} (`:{name} VALUE` changes it)"
    value = parse_value(arg)
    if name == "seed" and value is None:
        g.seed = None
        return "seed=null (a fresh seed for each prompt)"
    try:
        check_value(Generate, name, value)
    except UserError as e:
        return f"{visible(str(e))}; {name} stays {value_text(getattr(g, name))}"
    setattr(g, name, value)
    return f"{name}={value_text(value)}"


def rating_command(g, arg: str, m: api.Model) -> str:
    """`:rating negative` (or 0/1/2, or null): the rating of the reviews completed from now on."""
    value = parse_value(arg) if arg else g.rating
    try:
        ratings.control(value, m.checkpoint.condition)
    except UserError as e:
        return f"{visible(str(e))}; rating stays {value_text(g.rating)}"
    g.rating = value
    return f"rating={value_text(value)}"


def commands(m: api.Model) -> tuple[str, ...]:
    """The settings `:` changes for this checkpoint: the rating ones only where it was trained with ratings."""
    rated = m.checkpoint.condition is not None
    return tuple(k for k in (*SETTINGS, "rating") if rated or k not in RATED)


def help_text(g, known: tuple[str, ...]) -> str:
    listed = ", ".join(f":{k} VALUE" for k in known)
    settings = " ".join(f"{k}={value_text(getattr(g, k))}" for k in known)
    return f"commands: :help, {listed}; exit, quit or Ctrl-D ends\nsettings: {settings}"


def parse_value(arg: str):
    """`:<setting>`'s value: null, an integer or a number; other text is left for the range check to refuse."""
    if arg.lower() in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(arg)
        except ValueError:
            continue
    return arg


def value_text(value) -> str:
    return "null" if value is None else str(value)
