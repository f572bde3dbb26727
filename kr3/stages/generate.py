"""stage=generate: complete reviews from a checkpoint alone — interactive (a prompt, the completion
streamed token by token), one-shot (`generate.prompt`), or a file of prompts to JSONL. KV-cached."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.input import create_input
from prompt_toolkit.output import create_output

from kr3 import api, hardware
from kr3.atomic import replacing
from kr3.errors import UserError, check_values
from kr3.sampling import DECODING_RULES, END_OF_REVIEW, check_decoding, decoding, rating_control
from kr3.tracking import progress

log = logging.getLogger(__name__)
EXIT_WORDS = {"exit", "quit"}
# generate.<key>: (kind, low, high, null_ok) for check_values; in the REPL `:<key> VALUE` changes each
SETTINGS = {**DECODING_RULES, "show_next": ("int", 0, None, True)}
COMMAND = re.compile(r":([A-Za-z_]+)\s*(.*)")  # `:` and a letter: a prompt like ":)" stays a prompt
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_generate(g) -> None:
    check_decoding(g)
    check_values("generate", g, {"show_next": SETTINGS["show_next"]})
    if g.prompt is not None and not g.prompts_file and not str(g.prompt).strip():
        raise UserError('generate.prompt is empty — give the start of a review, e.g. generate.prompt="이 집 짜장면은"')


def run(cfg):
    g = cfg.generate
    check_generate(g)
    hardware.setup(g.device, g.precision)
    m = api.load(cfg.checkpoint, g.device, g.precision, cfg.paths.log_dir, **decoding(g))
    rating_control(g.rating, m.checkpoint.data.get("condition"))  # a bad rating stops before any output
    log.info(f"checkpoint {m.path}: step {m.checkpoint.step}, {m.model.num_params() / 1e6:.2f}M parameters, {m.device}, "
             f"{str(m.dtype).replace('torch.', '')}; vocabulary {m.tokenizer.vocab_size:,}")
    if g.prompts_file:
        return batch(cfg, m)
    if g.prompt is not None:
        return answer(m, g, str(g.prompt), sys.stdout)
    return repl(m, g, sys.stdin, sys.stdout)


def visible(text: str) -> str:
    """Text safe to write to a terminal: control characters shown escaped (ESC as \\x1b), so a prompt or a
    sampled byte cannot recolor the terminal or move its cursor."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def answer(m: api.Model, g, prompt: str, out) -> None:
    """Complete `prompt` on the terminal with settings `g`: it is echoed as the model is given it (cleaned),
    completions streamed."""
    if g.show_next:
        out.write(next_token_table(m.next_tokens(prompt, int(g.show_next), rating=g.rating)))
    options = decoding(g)
    for sample in range(int(g.num_samples)):
        out.write(visible(m.cleaned(prompt)))
        for piece in m.stream(prompt, sample, **options):
            out.write(visible(piece))
            out.flush()
        out.write("\n")
        out.flush()


def next_token_table(choices: list[tuple[str, float]]) -> str:
    """show_next's lines: a header, then each token's probability and text, quoted so its spaces show."""
    rows = [f"  {p:6.1%}  {text if text == END_OF_REVIEW else quoted(text)}" for text, p in choices]
    return "\n".join(["most likely next tokens (text in quotes, so its spaces show):", *rows]) + "\n"


def quoted(text: str) -> str:
    return '"' + visible(text) + '"'


def repl(m: api.Model, g, stdin, out) -> None:
    """Read prompts and `:` commands until `exit`/`quit`, end of input (Ctrl-D) or Ctrl-C. On a terminal with
    line editing and history; on a pipe line by line."""
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
                answer(m, g, text, out)
    except KeyboardInterrupt:
        out.write("\n")


def typed_lines(stdin, out):
    """Lines as typed: on a terminal through prompt_toolkit (arrow keys, history, Hangul and other wide characters
    edited whole); from a pipe or file as read."""
    if not (stdin.isatty() and out.isatty()):
        if hasattr(stdin, "reconfigure"):
            stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 gets a message, not a traceback
        yield from iter(stdin.readline, "")
        return
    out.write("Type the start of a review; `:help` lists the commands and settings; `exit` or Ctrl-D quits.\n")
    session = PromptSession(input=create_input(stdin), output=create_output(out))  # history in memory only
    while True:
        try:
            yield session.prompt("> ")
        except EOFError:
            return


def command(g, text: str, m: api.Model | None = None) -> str:
    """Run a `:command` line — `:help`, `:rating NAME`, or `:<setting> VALUE` checked like generate.<setting> —
    and say what it did."""
    name, arg = COMMAND.fullmatch(text).groups()
    name = name.lower()
    if name == "help":
        return help_text(g)
    if name == "rating" and m is not None:
        return rating_command(g, arg, m)
    if name not in SETTINGS:
        return f"unknown command :{name} — use one of: :help, {', '.join(':' + k for k in SETTINGS)}, exit"
    if not arg:
        return f"{name}={value_text(getattr(g, name))} (`:{name} VALUE` changes it)"
    value = parse_value(arg)
    try:
        check_values("generate", {name: value}, {name: SETTINGS[name]})
    except UserError as e:
        return f"{visible(str(e))}; {name} stays {value_text(getattr(g, name))}"
    setattr(g, name, value)
    return f"{name}={value_text(value)}"


def rating_command(g, arg: str, m: api.Model) -> str:
    """`:rating negative` (or 0/1/2, or null): the rating of the reviews completed from now on."""
    value = parse_value(arg) if arg else g.rating
    try:
        rating_control(value, m.checkpoint.data.get("condition"))
    except UserError as e:
        return f"{visible(str(e))}; rating stays {value_text(g.rating)}"
    g.rating = value
    return f"rating={value_text(value)}"


def help_text(g) -> str:
    commands = ", ".join(f":{k} VALUE" for k in (*SETTINGS, "rating"))
    settings = " ".join(f"{k}={value_text(getattr(g, k))}" for k in (*SETTINGS, "rating"))
    return f"commands: :help, {commands}; exit, quit or Ctrl-D ends\nsettings: {settings}"


def parse_value(arg: str):
    """`:<setting>`'s value: null, an integer or a number; other text is left for check_values to refuse."""
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


def batch(cfg, m: api.Model) -> Path:
    g = cfg.generate
    src = Path(g.prompts_file).expanduser()
    if not src.is_file():
        raise UserError(f"generate.prompts_file={src} {'is a folder' if src.is_dir() else 'does not exist'} — give a "
                        "text file with one prompt per line")
    try:
        prompts = [line.strip() for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{src} is not UTF-8 text — save it as UTF-8") from None
    if not prompts:
        raise UserError(f"{src} has no prompts — write one prompt per line")
    out = Path(g.output) if g.output else Path(cfg.paths.output_dir) / "generations.jsonl"
    with replacing(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for prompt in progress(prompts, desc="generate", unit="prompt"):
            for row in m.completions(prompt, **decoding(g)):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    log.info(f"{len(prompts)} prompts × {g.num_samples} → {out}")
    return out
