import pytest

from pipeline.config import ConfigError, load_config


def test_defaults_are_valid_and_overrides_apply(tmp_path):
    cfg = load_config(None, ["train.lr=1e-5", "sdg.query_types.claim=2", "ray.address=null"])
    assert cfg.train.lr == 1e-5 and cfg.ray.address is None
    assert cfg.sdg.query_types == {"question": 2, "keyword": 1, "claim": 2}  # merged into the default
    assert cfg.corpus.path == "sample"


def test_yaml_then_flags_and_profile(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("profile: gpu-h200\ntrain:\n  epochs: 5\n")
    cfg = load_config(f, ["train.queries_per_worker=64"])
    assert cfg.train.use_gpu is True          # from the profile
    assert cfg.train.epochs == 5              # the file beats the profile
    assert cfg.train.queries_per_worker == 64         # the flag beats both


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1", "train.lr"),
    ("sdg.backend=llama.cpp", "sdg.backend"),
    ("train.lerning_rate=1", "train.lerning_rate"),
    ("prep.test_fraction=0.95", "prep"),
    ("corpus.chunk_overlap=500", "corpus"),
    ("sdg.query_types.question=-1", "query_types"),
    ("sdg.query_types={question: 0, keyword: 0}", "query_types"),
])
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_section_hash_changes_only_with_its_section():
    a, b = load_config(None), load_config(None, ["train.lr=1e-4"])
    assert a.section_hash("sdg") == b.section_hash("sdg")
    assert a.section_hash("train") != b.section_hash("train")


def test_stage_hash_ignores_placement_and_defaults_but_not_real_settings():
    from pipeline.config import load_config

    base = load_config(None, []).section_hash("sdg")
    assert load_config(None, ["sdg.placement.num_actors=7", "sdg.placement.resources.gpu_node=1"]).section_hash("sdg") == base
    # A restarted LLM server on another port must not make a finished SDG stage run again.
    assert load_config(None, ["sdg.server.base_url=http://10.0.0.9:8123/v1"]).section_hash("sdg") == base
    assert load_config(None, ["sdg.temperature=0.7"]).section_hash("sdg") == base  # the default, spelled out
    assert load_config(None, ["sdg.temperature=0.3"]).section_hash("sdg") != base
    assert load_config(None, ["sdg.query_types.claim=1"]).section_hash("sdg") != base
    train = load_config(None, []).section_hash("train")
    assert load_config(None, ["train.placement.cpus_per_worker=4", "train.placement.max_failures=0"]
                       ).section_hash("train") == train
    assert load_config(None, ["train.num_workers=2"]).section_hash("train") != train  # a bigger contrastive batch


def test_placement_is_left_out_of_every_stage_identity_by_its_type():
    """What counts is the structure: every field whose value is a Placement (and only those) is left out."""
    from pipeline.config import Placement

    cfg = load_config(None, [])
    for name in ("corpus", "sdg", "prep", "train", "merge", "rerank", "eval", "export"):
        section = getattr(cfg, name)
        recorded = {k.split(".", 1)[1] for k in cfg.section_settings(name) if k != "seed"}
        placement = {k for k in type(section).model_fields if isinstance(getattr(section, k), Placement)}
        assert recorded == set(type(section).model_fields) - placement, name
    assert {"placement", "server"} <= set(type(cfg.sdg).model_fields)
    assert "sdg.placement" not in cfg.section_settings("sdg") and "sdg.server" not in cfg.section_settings("sdg")


def test_settings_are_checked_across_sections():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="corpus.chunk_tokens .300. is above train.max_passage_tokens .256."):
        load_config(None, ["corpus.chunk_tokens=300"])
    assert load_config(None, ["corpus.chunk_tokens=300", "train.max_passage_tokens=320"]).corpus.chunk_tokens == 300
    with pytest.raises(ConfigError, match="min_replicas .5. is above max_replicas .2."):
        load_config(None, ["serve.placement.min_replicas=5", "serve.placement.max_replicas=2"])


def test_val_off_is_refused_where_something_needs_the_val_score():
    """Without a val pass nothing can pick the best checkpoint or stop early: a config asking for either is an
    error naming the setting, not a silent 'last checkpoint'."""
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train: .*val_at_checkpoints false .*keep 'last'"):
        load_config(None, ["train.val_at_checkpoints=false"])  # keep 'best' is the default
    with pytest.raises(ConfigError, match="val_at_checkpoints false"):
        load_config(None, ["train.val_at_checkpoints=false", "train.keep=last", "train.early_stopping_patience=2"])
    assert not load_config(None, ["train.val_at_checkpoints=false", "train.keep=last"]).train.val_at_checkpoints


def test_a_changed_default_changes_the_stage_identity():
    """A release that changes a default must not reuse outputs made under the old one (schema 1 left
    defaults out of the hash, so this went unnoticed)."""
    from pipeline.config import TrainConfig

    class NextReleaseTrainConfig(TrainConfig):  # the same section, one default changed
        lr: float = 3e-5

    today = load_config(None, [])
    next_release = today.model_copy(update={"train": NextReleaseTrainConfig()})
    assert next_release.train.lr == 3e-5
    assert next_release.section_hash("train") != today.section_hash("train")
    assert next_release.section_hash("sdg") == today.section_hash("sdg")
    assert today.section_settings("train")["train.lr"] == 2e-5  # what the manifest records


@pytest.mark.parametrize("old, new", [("train.temperature=0.1", "train.loss_temperature"), ("train.seed=3", "seed"),
                                      ("train.lr_preset=half", "train.lr"),
                                      ("sdg.num_actors=2", "sdg.placement.num_actors"),
                                      ("sdg.openai_base_url=http://h:1/v1", "sdg.server.base_url"),
                                      ("sdg.openai_model=llama", "sdg.llm"),
                                      ("train.batch_size=8", "train.queries_per_worker"),
                                      ("serve.max_batch_size=8", "serve.requests_per_batch")])
def test_a_renamed_setting_names_its_new_name(tmp_path, old, new):
    """One name means one thing: the loss temperature is not the LLM's, the run has one seed, lr has no alias,
    placement lives in sub-sections, a batch size says its unit."""
    with pytest.raises(ConfigError, match=f"{old.split('=')[0]} was renamed or moved: use {new}"):
        load_config(None, [old])
    section, rest = old.split(".", 1)
    field, value = rest.split("=")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {field}: {value}\n")
    with pytest.raises(ConfigError, match=f"(?s)old.yaml.*{old.split('=')[0]} was renamed"):
        load_config(path, [])
    assert load_config(None, ["train.loss_temperature=0.1"]).train.loss_temperature == 0.1


@pytest.mark.parametrize("setting, words", [("prep.judge=crossencoder-typo", "prep.judge"),
                                            ("prep.query_judge=LLM", "must be 'none', 'llm'"),
                                            ("prep.mining_model=/no/such/model", "mining_model")])
def test_judge_and_mining_model_choices_fail_at_load(setting, words):
    """These were small string languages checked only when prep reached them, after hours of SDG."""
    with pytest.raises(ConfigError, match=words):
        load_config(None, [setting])
    from pipeline.config import JudgeChoice

    typed = load_config(None, ["prep.judge=llm", "prep.query_judge=llm:smollm2", "prep.mining_model=base"]).prep
    assert typed.judge == JudgeChoice(kind="llm") and typed.query_judge == JudgeChoice(kind="llm", model="smollm2")
    assert typed.mining_model is None  # train.base_model
    assert load_config(None, ["prep.judge.kind=llm", "prep.judge.model=gemma3"]).prep.judge.model == "gemma3"
    with pytest.raises(ConfigError, match="prep.judge: .*kind 'none' takes no model"):
        load_config(None, ["prep.judge.model=gemma3"])


def test_an_old_config_upgrades_to_todays_names():
    """What `retrofit migrate` does to a schema-1 config.yaml: same meaning, today's names."""
    from pipeline.config import RetrofitConfig, upgrade_config_data

    old = {"seed": 13, "train": {"temperature": 0.1, "seed": 13, "lr_preset": "half"}}
    assert upgrade_config_data(old) == {"seed": 13, "train": {"loss_temperature": 0.1, "lr": 1e-5}}
    assert old["train"]["temperature"] == 0.1  # the caller's mapping is left alone
    with pytest.raises(ConfigError, match="train.seed 7 differs from seed 13"):
        upgrade_config_data({"seed": 13, "train": {"seed": 7}})
    schema_2 = {"sdg": {"llm": "smollm2", "openai_model": None, "num_actors": 3, "openai_base_url": "http://h:1/v1",
                        "openai_concurrency": 4, "batch_size": 16, "fallback_backend": "transformers"},
                "train": {"batch_size": 8, "cpus_per_worker": 2, "max_failures": 0},
                "serve": {"max_batch_size": 4, "autoscaling": True, "min_replicas": 0}}
    assert upgrade_config_data(schema_2) == {
        "sdg": {"llm": "smollm2", "chunks_per_call": 16, "server": {"base_url": "http://h:1/v1", "concurrency": 4},
                "placement": {"num_actors": 3, "fallback_backend": "transformers"}},
        "train": {"queries_per_worker": 8, "placement": {"cpus_per_worker": 2, "max_failures": 0}},
        "serve": {"requests_per_batch": 4, "placement": {"autoscaling": True, "min_replicas": 0}}}
    # The name the server served the model under becomes the model's one name.
    assert upgrade_config_data({"sdg": {"llm": "smollm2", "openai_model": "llama-3"}}) == {"sdg": {"llm": "llama-3"}}
    RetrofitConfig.model_validate(upgrade_config_data(schema_2))  # every new name is a real field today
