"""kr3.settings: every setting typed and ranged once, and that one definition is what every door checks."""

import dataclasses
import types

import pytest
from fastapi.testclient import TestClient

from kr3 import load, repl, serve, settings
from kr3.config import compose
from kr3.errors import UserError


def test_every_config_group_and_block_has_its_schema(tmp_path):
    """The composed config is typed all the way down: each block turns into its settings class."""
    for overrides, model, tokenizer, logger in [([], "ModelShape", "SentencePieceTokenizer", "WandbLogger"),
                                                (["experiment=finetune", "logger=none"], "PretrainedModel",
                                                 "PretrainedTokenizer", "NoLogger")]:
        s = settings.typed(compose([*overrides, f"paths.output_dir={tmp_path}"], tmp_path))
        assert isinstance(s, settings.Settings)
        assert (type(s.model).__name__, type(s.tokenizer).__name__, type(s.logger).__name__) == (model, tokenizer, logger)
        for block, schema in [(s.data, settings.Data), (s.data.clean, settings.Clean), (s.trainer, settings.Trainer),
                              (s.trainer.profile, settings.Profile), (s.paths, settings.Paths),
                              (s.generate, settings.Generate), (s.evaluate, settings.Evaluate), (s.serve, settings.Serve),
                              (s.export, settings.Export), (s.report, settings.Report), (s.prepare, settings.Prepare)]:
            assert isinstance(block, schema)


def test_a_checkpoints_older_block_keeps_this_runs_values_for_what_it_lacks(tmp_path):
    s = settings.typed(compose([f"paths.output_dir={tmp_path}"], tmp_path))
    old = {k: v for k, v in settings.plain(s.data).items() if k != "condition"} | {"gone": 1, "val_ratio": 0.1}
    data = settings.saved_block(s.data, old)
    assert isinstance(data, settings.Data) and data.val_ratio == 0.1 and data.condition is None
    tokenizer = settings.saved_block(s.tokenizer, {"kind": "pretrained", "name_or_path": "/models/kogpt2"})
    assert isinstance(tokenizer, settings.PretrainedTokenizer) and tokenizer.name_or_path == "/models/kogpt2"


@pytest.fixture
def temperature_at_most_one_and_a_half(monkeypatch):
    """One bound changed in its one place, kr3.settings.Decoding."""
    field = next(f for f in dataclasses.fields(settings.Decoding) if f.name == "temperature")
    monkeypatch.setattr(field, "metadata", types.MappingProxyType({**field.metadata, "high": 1.5}))


def test_one_bound_changed_in_one_place_holds_for_the_api_the_repl_and_http(trained, temperature_at_most_one_and_a_half):
    m = load(trained[0], device="cpu", precision="fp32")
    m.complete("이 집", temperature=1.4, max_new_tokens=2)
    with pytest.raises(UserError, match=r"^generate\.temperature=1\.6 must be a number ≥ 0 and ≤ 1\.5$"):
        m.complete("이 집", temperature=1.6, max_new_tokens=2)
    g = types.SimpleNamespace(**m.defaults, show_next=0)  # the REPL's settings
    assert repl.command(g, ":temperature 1.6", m).startswith("generate.temperature=1.6 must be a number ≥ 0 and ≤ 1.5")
    assert repl.command(g, ":temperature 1.4", m) == "temperature=1.4"
    client = TestClient(serve.app(m))
    refused = client.post("/v1/completions", json={"prompt": "이 집", "temperature": 1.6, "max_tokens": 2})
    assert refused.status_code == 400 and refused.json()["error"] == {
        "message": "temperature: 1.6 must be a number ≥ 0 and ≤ 1.5", "type": "invalid_request_error",
        "param": "temperature", "code": None}
    assert client.post("/v1/completions", json={"prompt": "이 집", "temperature": 1.4, "max_tokens": 2}).status_code == 200


def test_a_trainer_rule_across_fields_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^trainer\.max_time=14m and trainer\.max_steps=100 both set how long"):
        settings.typed(compose(["experiment=cpu_15min", "trainer.max_steps=100", f"paths.output_dir={tmp_path}"],
                               tmp_path))
