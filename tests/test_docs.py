"""The commands and Python blocks of README.md and docs/: each one a user would copy runs here, in a project folder of
its own (a small corpus for the downloaded KR3, the paths in the examples substituted, training cut to a few steps), or
says what it needs that this machine lacks (`# needs: Hub`); every setting the pages name exists."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from kr3 import cli, config, overrides

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS = {"Hub", "GPU", "Slurm", "Docker", "W&B account", "internet"}
MARKER = re.compile(r"#\s*needs:\s*(.*?)\s*$")
THIS_SUITE = {"uv sync", "uv sync --frozen", "uv run pytest"}  # the environment these tests run in, and themselves
WRONG_ON_PURPOSE = {"trainer.lrr"}  # the pages' example of a typo and its error
GROUPS = ("data", "tokenizer", "model", "trainer", "logger", "paths", "prepare", "generate", "evaluate", "export",
          "serve", "report")


@dataclass
class Command:
    page: str
    line: str  # as written, `\` continuations joined
    needs: str | None

    def __str__(self):
        return f"{self.page}: {self.line.strip()}"


@dataclass
class Snippet:
    page: str
    code: str  # a ```python block, whole
    needs: str | None

    def __str__(self):
        return f"{self.page}: the Python block {self.code.splitlines()[0]!r}…"


def documented_steps() -> list[Command | Snippet]:
    """The ```bash lines and ```python blocks of every page, in page order."""
    found = []
    for page in PAGES:
        for kind, block in re.findall(r"^```(bash|python)\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M):
            if kind == "python":
                marker = MARKER.search(block.splitlines()[0])
                found.append(Snippet(page.name, block, marker and marker.group(1)))
                continue
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip():
                    marker = MARKER.search(line)
                    found.append(Command(page.name, line, marker and marker.group(1)))
    return found


SEPARATORS, REDIRECTIONS = {"&&", "|", ";"}, {">", ">>", "<"}


def shell_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return list(lexer)


def parts(line: str) -> list[list[str]]:
    """The simple commands of a line (split at &&, | and ;), each as its words."""
    commands = [[]]
    for word in shell_words(line):
        if word in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


def program_at(words: list[str]) -> int | None:
    """Where kr3 itself (`run.py` after python, or the `kr3` script) is among a command's words: None for another
    program."""
    for i, word in enumerate(words):
        program = word in ("run.py", "kr3") or word.endswith("/run.py")
        if program and (i == 0 or words[i - 1] in ("python", "--no-python", "run")):
            return i
    return None


def kr3_arguments(words: list[str]) -> list[str] | None:
    """What a kr3 command line gives `run.py` (or the `kr3` script): None for another program."""
    at = program_at(words)
    return None if at is None else words[at + 1:]


STEPS = documented_steps()
COMMANDS = [step for step in STEPS if isinstance(step, Command)]


def test_the_pages_have_commands_and_each_mark_names_a_need():
    assert len(COMMANDS) > 50 and {c.page for c in COMMANDS} >= {"README.md", "training.md", "serving.md"}
    for step in STEPS:
        text = step.line if isinstance(step, Command) else step.code.splitlines()[0]
        assert step.needs is None or step.needs in NEEDS, f"{step}: `# needs:` takes one of {sorted(NEEDS)}"
        assert step.needs or not re.search(r"#\s*needs?\b", text, re.I), f"{step}: write `# needs: WHAT`"


COMPOSED = {}


@pytest.mark.e2e  # fifty compositions of the config: ten seconds, so with the commands' runs
@pytest.mark.parametrize("command", [c for c in COMMANDS if any(kr3_arguments(w) for w in parts(c.line))], ids=str)
def test_every_documented_command_names_settings_that_exist(command, monkeypatch):
    """The check every command line gets before it runs: keys, options, types and ranges (marked ones too). The
    pages choose the same few groups again and again: each composition is made once here."""
    def compose_once(chosen=()):
        return COMPOSED.setdefault(tuple(chosen), config.compose(chosen))

    monkeypatch.setattr(overrides, "compose", compose_once)
    for words in parts(command.line):
        arguments = kr3_arguments(words)
        if arguments:
            overrides.check(cli.quote_free_text(["run.py", *arguments])[1:])


def setting_names() -> set[str]:
    """Every dotted key of the config and of every option of its groups, as the YAML files write them."""
    names = config.config_keys(config.OmegaConf.to_container(config.compose()))
    for option in (ROOT / "conf").glob("*/*.yaml"):
        group, text = option.parent.name, option.read_text(encoding="utf-8")
        if group != "hydra" and "@package _global_" not in text:
            keys = config.config_keys(config.OmegaConf.to_container(config.OmegaConf.create(text)))
            names |= {f"{group}.{key}" for key in keys}
    return names


def test_every_setting_the_pages_name_exists():
    """`trainer.lr`, `generate.temperature=0.7`: a setting named in the prose must still be one."""
    names = setting_names()
    span = re.compile(rf"`((?:{'|'.join(GROUPS)})\.[a-z_][a-z0-9_.]*[a-z0-9_])(?:=[^`]*)?`")
    named = {(page.name, m.group(1)) for page in PAGES for m in span.finditer(page.read_text(encoding="utf-8"))}
    files = re.compile(r"\.(py|yaml|md|json|jsonl|csv|pt|safetensors|log|png|txt)$")
    missing = sorted(f"{page}: {name}" for page, name in named
                     if name not in names | WRONG_ON_PURPOSE and not files.search(name))
    assert not missing, "settings the docs name that kr3 no longer has:\n" + "\n".join(missing)


# --- running them ---------------------------------------------------------------------------------------------------

MAIN_JOB = "uv sync && uv run python run.py stage=train && uv run python run.py stage=generate checkpoint=latest"
TINY = {"tokenizer.vocab_size": "380"}  # a tokenizer the small corpus can fill


class Project:
    """A project folder where the documented commands run one after another, as a user would type them there: kr3's
    own in this process (as `run.py` runs them), the rest (pipes, torchrun, curl) in bash."""

    def __init__(self, folder: Path, monkeypatch, run_kr3, pretrained: Path | None):
        self.folder, self.monkeypatch, self.run_kr3, self.pretrained = folder, monkeypatch, run_kr3, pretrained
        self.clock = time.time() - 3600  # each command its own second, so each gets its own run folder
        self.server = None

    def run(self, command: Command):
        line = self.substituted(command.line)
        simple = [w for w in parts(line) if w and " ".join(w) not in THIS_SUITE]
        started_by_another = any(w[0] == "torchrun" for w in simple)  # its processes, not this one, run kr3
        if "|" in line or started_by_another or any(kr3_arguments(w) is None for w in simple):
            return self.in_bash(line)
        for words in simple:
            self.in_process(words)

    def substituted(self, line: str) -> str:
        """The examples' placeholders, made real here; servers on loopback only."""
        line = line.replace("/path/to/kr3.parquet", str(self.folder / "kr3.parquet"))
        line = line.replace("serve.host=0.0.0.0", "serve.host=127.0.0.1")
        line = line.replace("/path/to/kogpt2", str(self.pretrained))
        for placeholder, pattern in (("multirun/DATE/TIME/N", "multirun/*/*/*"), ("outputs/2026-11-25/10-00-00", "outputs/*/*"),
                                     ("checkpoint=PATH", "*/*/*")):
            if placeholder in line:
                newest = self.newest(pattern)
                line = line.replace(placeholder, f"checkpoint={newest}" if placeholder.startswith("checkpoint") else newest)
        if "multirun/DATE/TIME" in line:
            line = line.replace("multirun/DATE/TIME", str(Path(self.newest("multirun/*/*/*")).parent))
        return line

    def newest(self, pattern: str) -> str:
        runs = {p.parents[1] for p in self.folder.glob(f"{pattern}/checkpoints/*.pt")}
        return str(max(runs, key=lambda run: max(f.stat().st_mtime for f in run.glob("checkpoints/*.pt"))))

    def arguments(self, words: list[str]) -> list[str]:
        """The command's arguments, training cut to a few steps of the tiny model, on a tokenizer the corpus fills."""
        arguments = kr3_arguments(words)
        given = dict(a.split("=", 1) for a in arguments if "=" in a and not a.startswith("-"))
        capped = {}
        from_checkpoint = given.get("experiment") == "finetune" or given.get("trainer.resume", "auto") != "auto"
        if given.get("stage") in ("prepare", "train") and not from_checkpoint:  # else its tokenizer is the one
            capped |= TINY
        if given.get("stage") == "train":
            if "trainer.max_time" in given:  # a budget of seconds, not minutes
                capped |= {"trainer.max_time": "3s"}
            else:  # without a budget, a preset's model.depth=auto has nothing to size to: the tiny model's shape
                capped |= {"trainer.max_steps": "4" if "trainer.max_steps" in given else "2", "trainer.max_time": "null",
                           **({} if "model.depth" in given or from_checkpoint else {"model.depth": "null"})}
            capped |= {k: v for k, v in (("logger", "none"), ("model", "tiny")) if k not in given}
            if from_checkpoint:
                capped.pop("model", None)
        kept = [a for a in arguments if a.split("=", 1)[0] not in capped]
        extra = [*(f"{k}={v}" for k, v in capped.items()), f"paths.root_dir={self.folder}"]
        # before a flag that follows the overrides (`--cfg job`): Hydra's parser reads overrides in one run
        at = next((i for i, a in enumerate(kept) if a.startswith("-") and any("=" in b for b in kept[:i])), len(kept))
        return [*kept[:at], *extra, *kept[at:]]

    def tick(self):
        self.clock += 2
        self.monkeypatch.setenv("KR3_RUN_TIME", repr(self.clock))

    def in_process(self, words: list[str]):
        self.tick()
        env = dict(w.split("=", 1) for w in words[:program_at(words)] if "=" in w)  # KR3_API_KEY=... python run.py
        arguments = self.arguments(words)
        if "stage=serve" in arguments:
            return self.serve(arguments, env=env)
        proc = self.run_kr3(*arguments, stdin="exit\n", env={"KR3_RUN_TIME": repr(self.clock), **env})
        assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"

    def in_bash(self, line: str):
        self.tick()
        if line.lstrip().startswith("curl "):
            line = self.curl(line)
        line = re.sub(r"(?<![\w/])run\.py\b", str(ROOT / "run.py"), line)
        commands, separators = parts(line), [w for w in shell_words(line) if w in SEPARATORS]
        script = " ".join(self.shell(words) + (f" {sep}" if sep else "")
                          for words, sep in zip(commands, [*separators, None], strict=True))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        proc = subprocess.run(["bash", "-c", script], cwd=self.folder, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, script + "\n" + proc.stdout + proc.stderr

    def shell(self, words: list[str]) -> str:
        """One simple command for bash, a kr3 one with this project's arguments."""
        if (at := program_at(words)) is not None:
            words = [*words[:at + 1], *self.arguments(words)]
        return " ".join(w if w in REDIRECTIONS else f'"{w}"' if "$(" in w else shlex.quote(w) for w in words)

    def serve(self, arguments: list[str], keep: bool = False, env: dict | None = None):
        """stage=serve until its page answers, then Ctrl-C, as a user would stop it."""
        arguments = [a for a in arguments if not a.startswith("serve.port=")] + ["serve.port=0"]
        log = self.folder / f"serve-{self.clock:.0f}.log"
        with log.open("w") as out:
            server = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *arguments], cwd=self.folder, stdout=out,
                                      stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + 120
        while not (found := re.search(r"http://127\.0\.0\.1:[1-9]\d*/", log.read_text())):
            assert server.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        while True:
            try:
                urllib.request.urlopen(found.group(0), timeout=5)
                break
            except urllib.error.HTTPError:  # it answers (a key is asked for)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.2)
        if keep:
            return server, found.group(0)
        self.stop(server)

    @staticmethod
    def stop(server):
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) in (0, 130)

    def curl(self, line: str) -> str:
        return self.to_server(line.replace("curl ", "curl --fail-with-body -sS ", 1))

    def to_server(self, text: str) -> str:
        """The docs' server address, made this project's: one serving the newest checkpoint, started for the page's
        requests."""
        if self.server is None:
            self.server = self.serve(self.arguments(["run.py", "stage=serve", "checkpoint=latest"]), keep=True)
        return text.replace("http://127.0.0.1:8000/", self.server[1]).replace("http://127.0.0.1:8000", self.server[1][:-1])

    def run_snippet(self, snippet: Snippet):
        """A Python block, run here as in a notebook opened in the project folder."""
        import kr3.api

        code = self.substituted(snippet.code)
        if "http://127.0.0.1:8000" in code:
            code = self.to_server(code)
        with self.monkeypatch.context() as m:
            m.setattr(kr3.api, "ROOT", self.folder)  # `latest`: the newest run of this project folder
            exec(compile(code, snippet.page, "exec"), {"__name__": "__docs__"})

    def close(self):
        if self.server:
            self.stop(self.server[0])


def pretrained_like_kogpt2(folder: Path) -> Path | None:
    """A tiny random GPT-2 with KoGPT2's real tokenizer, standing for `/path/to/kogpt2`."""
    tokenizer = ROOT.parent / "shared" / "tokenizers" / "kogpt2-v1"
    if not tokenizer.is_dir():
        return None
    transformers = pytest.importorskip("transformers")
    shutil.copytree(tokenizer, folder)
    tokens = transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.GPT2Config(vocab_size=len(tokens), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tokens.bos_token_id, eos_token_id=tokens.eos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.mark.e2e
def test_documented_commands_run_here(tmp_path, monkeypatch, make_reviews, write_parquet, run_kr3):
    """In page order (README.md first): a command that reads a checkpoint finds the one an earlier command trained."""
    assert MAIN_JOB in (ROOT / "README.md").read_text() and "(needs the Hub)" in (ROOT / "README.md").read_text()
    folder = tmp_path / "project"
    folder.mkdir()
    write_parquet(folder / "kr3.parquet", make_reviews(8000, seed=5))
    (folder / "reviews.txt").write_text("\n".join(t for _, t in make_reviews(300, seed=6)) + "\n", encoding="utf-8")
    (folder / "prompts.txt").write_text("이 집 짜장면은\n", encoding="utf-8")
    monkeypatch.chdir(folder)
    project = Project(folder, monkeypatch, run_kr3, pretrained_like_kogpt2(tmp_path / "kogpt2"))
    try:
        for step in STEPS:
            if isinstance(step, Snippet):
                if step.needs is None:
                    project.run_snippet(step)
            elif "/path/to/kogpt2" in step.line and project.pretrained is None:
                warnings.warn(f"not run: {step} (it needs ../shared/tokenizers/kogpt2-v1)", stacklevel=1)
            elif step.needs is None and step.line.strip() != MAIN_JOB:
                try:
                    project.run(step)
                except AssertionError as e:
                    raise AssertionError(f"{step}\n{e}") from None
    finally:
        project.close()
