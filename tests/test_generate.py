import json
import os
import re
import sys
import textwrap

import pytest
import torch

import kr3
from kr3 import checkpoint
from kr3.config import ROOT, compose
from kr3.sampling import Completer, sample_tokens
from kr3.tracking import read_metrics


def gen_cfg(root, *overrides):
    return compose(root=root, overrides=["stage=generate", *overrides]).generate


def loaded(run_dir):
    return checkpoint.load_model(run_dir, "cpu")


def test_cached_sampling_equals_full_forward_greedy(trained):
    model, tok, _ = loaded(trained[0])
    prompt = tok.encode("이 집 짜장면은")
    fast = list(sample_tokens(model, prompt, 20, eos_id=-1, temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert fast == ids[len(prompt) :]


def test_greedy_stops_at_eos(trained):
    model, tok, _ = loaded(trained[0])
    prompt = tok.encode("여기 냉면")
    out = list(sample_tokens(model, prompt, 200, tok.eos_id, temperature=0))
    assert 0 < len(out) < 200
    with torch.no_grad():
        assert int(model(torch.tensor([prompt + out]))[0, -1].argmax()) == tok.eos_id


def test_same_seed_same_sample(trained):
    model, tok, state = loaded(trained[0])
    c = Completer(model, tok, gen_cfg(trained[1], "generate.temperature=1.0"), state.config["data"]["clean"])
    a, b = c.complete("이 가게", 0), c.complete("이 가게", 0)
    assert a["completion"] == b["completion"] and a["tokens"] == b["tokens"]
    assert len({c.complete("이 가게", s)["completion"] for s in range(6)}) > 1


def test_long_and_odd_prompts(trained, caplog):
    model, tok, state = loaded(trained[0])
    c = Completer(model, tok, gen_cfg(trained[1], "generate.max_new_tokens=8"), state.config["data"]["clean"])
    ids, total = c.prompt_ids("맛있어요 " * 100)
    assert len(ids) == 63 and total > 63 and ids == tok.encode(("맛있어요 " * 100).strip())[-63:]
    kr3.load(trained[0], device="cpu").complete("맛있어요 " * 100, max_new_tokens=2)
    assert "the prompt has" in caplog.text and "the model is given its last 63 (model.block_size)" in caplog.text
    for odd in ["🍜🍜 龍 \x07\x1b[31m", "ㅋㅋㅋㅋ", "a"]:
        assert isinstance(c.complete(odd)["completion"], str)
    assert abs(sum(p for _, p in c.next_tokens("이 집", 500)) - 1) < 1e-3


def test_next_tokens_are_text(trained):
    from kr3.sampling import END_OF_REVIEW

    model, tok, state = loaded(trained[0])
    c = Completer(model, tok, gen_cfg(trained[1]), state.config["data"]["clean"])
    texts = [text for text, _ in c.next_tokens("이 집", tok.vocab_size)]
    assert texts.count(END_OF_REVIEW) == 1 and not any("▁" in t or t == "</s>" for t in texts)
    spaced = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("▁") and len(tok.id_to_piece(i)) > 1)
    assert c.token_text(tok.encode("이 집"), spaced) == " " + tok.id_to_piece(spaced)[1:]  # its space kept


@pytest.mark.e2e
def test_a_long_prompt_is_said_before_its_completion_and_echoed_as_kept(trained):
    """On a terminal (stdout and stderr one stream): the note on a line of its own, then the part of the prompt the
    model was given, then its completion."""
    pexpect = pytest.importorskip("pexpect")
    prompt = " ".join(f"{i}번째 맛있어요" for i in range(60))
    child = pexpect.spawn(sys.executable, [str(ROOT / "run.py"), f"paths.root_dir={trained[1]}", "stage=generate",
                                           f"checkpoint={trained[0]}", "generate.max_new_tokens=5",
                                           f"generate.prompt={prompt}"], encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    lines = child.before.replace("\r\n", "\n").splitlines()
    note = next(i for i, line in enumerate(lines) if "the model is given its last 63 (model.block_size)" in line)
    echo = lines[note + 1]
    assert echo.startswith(kr3.load(trained[0], device="cpu").given(prompt)[0]) and not echo.startswith("0번째")
    assert "59번째 맛있어요" in echo


@pytest.mark.e2e
def test_pipe_and_exit(run_kr3, trained):
    """Completions from a pipe until `exit`; the REPL keeps no run folder (its work was on the terminal)."""
    before = set(trained[0].rglob("generate/*"))
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", f"checkpoint={trained[0]}", "generate.max_new_tokens=10",
                   stdin="이 집 짜장면은\n\n사장님\nexit\n이건 읽지 않아요\n")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("(seed ")]
    assert lines[-2].startswith("이 집 짜장면은") and lines[-1].startswith("사장님")
    assert proc.stdout.count("(seed ") == 2  # each completion says its fresh seed
    assert set(trained[0].rglob("generate/*")) == before
    assert "이건" not in proc.stdout


@pytest.mark.e2e
def test_terminal_session(trained):
    """prompt_toolkit on a terminal: ↑ recalls, Backspace removes one whole Hangul syllable, `:` commands work."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, [str(ROOT / "run.py"), f"paths.root_dir={trained[1]}", "stage=generate",
                                           "checkpoint=latest", "generate.max_new_tokens=10"], encoding="utf-8",
                          timeout=120, env={**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"})  # pexpect answers no CPR
    answer_starts = r"\r\n(?:\x1b\[[0-9;?]*[A-Za-z])*"  # a new line, past prompt_toolkit's mode switches
    child.expect(r"checkpoint \S+/checkpoints/best\.pt")  # `latest` resolved to a file
    child.expect("Ctrl-D quits")
    echo = answer_starts + "이 집 짜장면도"  # the answer begins with the prompt the model got
    for keys, shown in [("이 집 짜장면은\x7f도\r", echo), ("\x1b[A\r", echo), (":temperature 0\r", "temperature=0\r\n"),
                        (":temperature -1\r", "generate.temperature=-1 must be a number ≥ 0; temperature stays 0\r\n"),
                        (":help\r", "settings: temperature=0 top_k=50 "), (":nope\r", "unknown command :nope — use one of: ")]:
        child.expect(">")  # the next prompt is drawn: the terminal is in prompt_toolkit's raw mode
        child.send(keys)
        child.expect(shown)
    child.expect(">")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# python -c SLOW_STREAM <kr3's arguments>: stage=generate whose completions never end by themselves
SLOW_STREAM = textwrap.dedent("""
    import sys, time
    from kr3 import api, cli

    def stream(self, prompt, sample=0, **options):
        while True:
            time.sleep(0.02)
            yield "맛"

    api.Model.stream = stream
    sys.argv = ["run.py", *sys.argv[1:]]
    cli.main()
""")


@pytest.mark.e2e
def test_ctrl_c_stops_a_completion_and_the_repl_goes_on(trained):
    """Ctrl-C during a completion returns to the prompt, history and settings kept; Ctrl-D quits."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-c", SLOW_STREAM, f"paths.root_dir={trained[1]}", "stage=generate",
                                           "checkpoint=latest"], cwd=str(ROOT), encoding="utf-8", timeout=120,
                          env={**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"})
    child.expect("Ctrl-D quits")
    for keys in (":temperature 0.5\r", "이 집\r"):
        child.expect(">")
        child.send(keys)
    child.expect("맛맛맛")
    child.sendintr()
    child.expect(r"\(stopped\)")
    child.expect(">")
    child.send("\x1b[A\r")  # ↑ recalls the prompt: the history is kept
    child.expect("이 집맛맛")
    child.sendintr()
    child.expect(r"\(stopped\)")
    child.expect(">")
    child.send(":temperature\r")
    child.expect("temperature=0.5")  # so are the settings
    child.expect(">")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.e2e
def test_the_repl_samples_afresh_until_a_seed_is_given(trained):
    """On a terminal, two completions of one prompt differ by default, each naming its seed; after `:seed 42` they
    match; `:seed null` returns to fresh seeds."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, [str(ROOT / "run.py"), f"paths.root_dir={trained[1]}", "stage=generate",
                                           f"checkpoint={trained[0]}", "generate.max_new_tokens=30",
                                           "generate.temperature=1.0"], encoding="utf-8", timeout=120,
                          env={**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"})
    child.expect("Ctrl-D quits")

    def complete() -> tuple[str, str]:
        child.expect(">")
        child.send("이 집\r")
        child.expect(r"\r\n(?:\x1b\[[0-9;?]*[A-Za-z])*(이 집[^\r\n]*)\r\n\(seed (\d+): `:seed \2` repeats it\)")
        return child.match[1], child.match[2]

    def say(command: str, answer: str) -> None:
        child.expect(">")
        child.send(command + "\r")
        child.expect(re.escape(answer))

    (first, seed1), (second, seed2) = complete(), complete()
    say(":seed 42", "seed=42")
    (third, seed3), (fourth, seed4) = complete(), complete()
    say(":seed null", "seed=null (a fresh seed for each prompt)")
    assert seed1 != seed2 and first != second
    assert seed3 == seed4 == "42" and third == fourth
    child.expect(">")
    child.sendeof()
    child.expect(pexpect.EOF)


@pytest.mark.e2e
def test_pipe_commands_and_control_characters(run_kr3, trained):
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", f"checkpoint={trained[0]}", "generate.max_new_tokens=10",
                   stdin=":temperature abc\n:top_k 20\n:TOP_P none\n:help\n:nope\n:rating positive\n:)\n\x1b[31m이 집\x07은\n")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("(seed ")]  # each completion's seed
    assert "generate.temperature=abc must be a number ≥ 0; temperature stays 0.8" in lines
    assert "top_k=20" in lines and "top_p=null" in lines and "unknown command :nope" in proc.stdout
    offers = [line for line in lines if line.startswith(("commands:", "unknown command"))]
    assert len(offers) == 2 and not any(":rating" in line for line in offers)  # not offered
    assert ":rating steers a rating, and this checkpoint was trained without them" in proc.stdout
    assert "guidance" not in proc.stdout  # nor guidance: the checkpoint has no ratings
    assert "settings: temperature=0.8 top_k=20 top_p=null " in proc.stdout
    assert lines[-2].startswith(":)")  # `:` and no letter: a prompt
    assert lines[-1].startswith("[31m이 집은") and "\x1b" not in proc.stdout  # echoed as the model got it


def test_terminal_output_escapes_control_characters_and_names_next_tokens(tmp_path):
    import io
    import types

    from kr3.repl import answer
    from kr3.sampling import END_OF_REVIEW

    model = types.SimpleNamespace(
        given=lambda p, rating=None: (p, 3, 3),  # strip_control=false, a short prompt
        next_tokens=lambda p, k, rating=None, guidance=None: [(" 좋은", 0.5), (END_OF_REVIEW, 0.25), ("\x1b", 0.000123)],
        stream=lambda p, s, **options: iter(["\x1b[31m맛", "\x07\n"]))
    out = io.StringIO()
    answer(model, gen_cfg(tmp_path, "generate.show_next=3"), "\x1b[2J집", out)
    assert out.getvalue().splitlines() == [
        "most likely next tokens (text in quotes, so its spaces show):",
        '     50.0%  " 좋은"', "     25.0%  <end of review>", '    0.012%  "\\x1b"',  # small: not 0.0%
        "\\x1b[2J집\\x1b[31m맛\\x07\\x0a",
    ]


@pytest.mark.e2e
def test_one_shot_show_next_and_batch(run_kr3, trained, tmp_path):
    # the prompt as typed in a shell: unquoted for Hydra (run.py quotes it)
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", f"checkpoint={trained[0] / 'checkpoints' / 'best.pt'}",
                   "generate.prompt=여기 치킨", "generate.show_next=3", "generate.num_samples=2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len([line for line in lines if "%" in line]) == 3 and sum(line.startswith("여기 치킨") for line in lines) == 2
    assert "most likely next tokens (text in quotes, so its spaces show):" in lines
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("이 집\n\n사장님 정말\n", encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", f"checkpoint={trained[0]}",
                   f"generate.prompts_file={prompts}", f"generate.output={out}")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["이 집", "사장님 정말"]
    assert all({"completion", "tokens", "seconds", "first_token_s", "tokens_per_s"} <= r.keys() for r in rows)


class PieceTokenizer:
    """Token id i is PIECES[i]: a tokenizer whose pieces this test chooses."""

    PIECES = ["이", " 집", "은 ", "정", "말 ", "맛", "있"]
    eos_id = -1
    vocab_size = len(PIECES)

    def encode(self, text):
        return [self.PIECES.index(c) for c in ["이", " 집"]] if text == "이 집" else []

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


@pytest.mark.parametrize("stop, completion", [
    (["정말"], "은 "),          # spans two tokens: "정" is held back, never shown
    ("정말", "은 "),            # one string is one stop string
    ("맛집", "은 정말 맛있"),    # not its characters: "맛" alone does not stop it
    (["말 맛", "정"], "은 "),    # the earliest of several
    (["있다"], "은 정말 맛있"),   # a held-back end ("있") is shown when the completion ends
])
def test_stop_strings_are_never_shown(monkeypatch, stop, completion):
    import types

    vocab = len(PieceTokenizer.PIECES)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(block_size=16, vocab_size=vocab))
    g = types.SimpleNamespace(stop=stop, seed=0, max_new_tokens=5, temperature=0, top_k=None, top_p=None,
                              repetition_penalty=1.0, guidance=1.0, min_new_tokens=0)
    generation = Completer(model, PieceTokenizer(), g, {}).generation("이 집")
    for token in [2, 3, 4, 5, 6]:
        if not generation.done:
            generation.take(token)
    *pieces, stats = generation.taken()
    assert generation.done and "".join(pieces) == stats["completion"] == completion


@pytest.mark.e2e
@pytest.mark.parametrize("args, message", [
    (["generate.prompt=' '"], "generate.prompt is empty"),
    (["generate.temperature=-1"], "generate.temperature=-1 must be a number ≥ 0"),
    (["checkpoint=/nope/x.pt"], "checkpoint /nope/x.pt does not exist"),
    ([], "this stage needs a checkpoint"),
])
def test_generate_errors(run_kr3, trained, args, message):
    if args and args[0].startswith("generate"):
        args = [f"checkpoint={trained[0]}", *args]
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"error: {message}" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("generate.top_p=1.5", "generate.top_p=1.5 must be a number > 0 and ≤ 1, or null"),
    ("generate.top_k=-3", "generate.top_k=-3 must be an integer ≥ 0, or null"),
    ("generate.repetition_penalty=0", "generate.repetition_penalty=0 must be a number > 0"),
    ("generate.num_samples=0", "generate.num_samples=0 must be an integer ≥ 1"),
    ("generate.temperature=inf", "generate.temperature=inf must be a number ≥ 0"),
    ("generate.guidance=1000", "generate.guidance=1000 must be a number ≥ 1 and ≤ 100.0"),
    ("generate.seed=1180591620717411303424", "generate.seed=1180591620717411303424 must be an integer ≥ 0 and ≤ 922"),
    ("generate.stop=['']", "generate.stop=[''] must be non-empty strings"),
])
def test_bad_decoding_values(tmp_path, override, message):
    from kr3.errors import UserError
    from kr3.stages.generate import check_generate

    with pytest.raises(UserError, match=re.escape(message)):
        check_generate(gen_cfg(tmp_path, override))
    check_generate(gen_cfg(tmp_path, "generate.top_k=0", "generate.top_p=1", "generate.temperature=0"))  # all allowed


@pytest.mark.e2e
def test_a_stdin_line_that_is_not_utf8_gets_a_message(run_kr3, trained):
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", f"checkpoint={trained[0]}", "generate.max_new_tokens=4",
                   stdin=b"\xff\xfe\n" + "사장님\n".encode())  # a bad line, then a good one (a strict UTF-8 reader)
    assert proc.returncode == 0, proc.stderr
    assert "not UTF-8 text" in proc.stdout and proc.stdout.splitlines()[-2].startswith("사장님")


@pytest.mark.e2e
def test_a_bad_output_path_is_one_line_before_any_work(run_kr3, trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("이 집\n")
    (tmp_path / "folder").mkdir()
    for out, words in ((tmp_path / "folder", "is a folder"), (prompts / "x.jsonl", "cannot write")):
        proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", f"checkpoint={trained[0]}",
                       f"generate.prompts_file={prompts}", f"generate.output={out}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr
        assert "generate:" not in proc.stderr  # refused before the first prompt
    assert list((tmp_path / "folder").iterdir()) == []


def test_sampling_survives_a_tiny_temperature_and_refuses_nan_scores():
    from kr3.decoder import Sampler, choose
    from kr3.errors import UserError
    from kr3.model import GPT, GPTConfig

    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    cold = Sampler([3], 4, -1, 8, temperature=1e-300, generator=torch.Generator().manual_seed(0))  # 1e-300: 0 in fp32
    assert choose([cold], logits, [[0]]) == [1]
    diverged = GPT(GPTConfig(vocab_size=16, n_layers=1, n_heads=1, d_model=8, d_ffn=16, block_size=8))
    with torch.no_grad():
        diverged.blocks[0].mlp.fc.weight.fill_(float("nan"))  # what a diverged run's checkpoint holds
    with pytest.raises(UserError, match="scores are NaN"):
        next(sample_tokens(diverged, [1, 2], 4, eos_id=0))


@pytest.mark.e2e
@pytest.mark.parametrize("edit, words", [
    (lambda s: s["model_config"].update(foo=1), "unexpected keyword argument 'foo'"),
    (lambda s: s["model"].pop("head.weight"), "Error(s) in loading state_dict"),
    (lambda s: s["tokenizer"]["files"].clear(), "no tokenizer saved"),
    (lambda s: s.update(config=None), "holds config of the wrong kind"),
])
def test_a_checkpoint_edited_after_training_is_one_line(run_kr3, trained, tmp_path, edit, words):
    state = torch.load(checkpoint.list_steps(trained[0])[-1], weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "edited.pt")
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", f"checkpoint={tmp_path / 'edited.pt'}",
                   "generate.prompt=이 집")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr


@pytest.mark.e2e
def test_corrupt_checkpoint_is_one_line(run_kr3, trained, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(checkpoint.list_steps(trained[0])[-1].read_bytes()[:1000])
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=evaluate", f"checkpoint={bad}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is corrupt or not a kr3 checkpoint" in proc.stderr


@pytest.mark.e2e
def test_evaluate_matches_trainer_and_reads_files(trained, tmp_path, make_reviews):
    from kr3.stages import evaluate

    run_dir, root = trained
    logged = [r["val/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r][-1]
    result = evaluate.run(compose(root=root, overrides=["stage=evaluate", f"checkpoint={run_dir}", "evaluate.precision=fp32",
                                                        f"paths.output_dir={tmp_path / 'e'}"]))
    logged_review_bpc = [r["val/review_bpc"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r][-1]
    assert result["loss"] == pytest.approx(logged, rel=1e-5)
    assert result["review_bpc"] == pytest.approx(logged_review_bpc, rel=1e-4)  # the trainer's final evaluation: all of val
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert saved["bpc"] == pytest.approx(result["bpc"]) and saved["review_bpc"] == pytest.approx(result["review_bpc"])
    (tmp_path / "reviews.txt").write_text("\n".join(t for _, t in make_reviews(50, seed=9)), encoding="utf-8")
    on_file = evaluate.run(compose(root=root, overrides=["stage=evaluate", f"checkpoint={run_dir}", "data=local",
                                              f"data.path={tmp_path / 'reviews.txt'}", f"paths.output_dir={tmp_path / 'f'}",
                                              "evaluate.max_tokens=300"]))
    assert on_file["tokens"] == 300 and 0 < on_file["bpc"] < 10


@pytest.mark.e2e
def test_evaluate_writes_beside_the_checkpoint_and_names_the_file_it_read(run_kr3, trained):
    run_dir, root = trained
    before = set(run_dir.glob("evaluate/*/eval.json"))  # other tests evaluate the shared checkpoint too
    proc = run_kr3(f"paths.root_dir={root}", "stage=evaluate", "checkpoint=latest", "evaluate.max_tokens=500",
                   "evaluate.precision=fp32")
    assert proc.returncode == 0, proc.stderr
    (found,) = set(run_dir.glob("evaluate/*/eval.json")) - before
    assert json.loads(found.read_text())["checkpoint"] == str((run_dir / "checkpoints" / "best.pt").resolve())
