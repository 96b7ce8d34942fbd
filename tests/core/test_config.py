import pytest

from liverseg.core.config import IngestConfig, ServeConfig, TrainConfig, TuneConfig
from liverseg.core.errors import ConfigError
from liverseg.core.loading import _flatten, load_config, parse_overrides, to_flat_dict
from support.paths import REPO


def test_overrides_are_yaml_and_dotted(tmp_path):
    cfg = load_config(TrainConfig, None, ["train.lr=3e-4", "data.window=[-100, 200]", "scaling.use_gpu=true"])
    assert cfg.train.lr == 3e-4 and cfg.data.window == (-100.0, 200.0) and cfg.scaling.use_gpu is True


def test_file_then_override(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("train:\n  epochs: 3\n  lr: 0.01\nmodel:\n  encoder: resnet18\n")
    cfg = load_config(TrainConfig, f, ["train.lr=0.002"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.encoder) == (3, 0.002, "resnet18")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'.*train.lr"):
        load_config(TrainConfig, None, ["train.lrr=1"])


def test_unknown_key_in_file_names_file(tmp_path):
    f = tmp_path / "ingest.yaml"
    f.write_text("sizes: [64, 64]\n")
    with pytest.raises(ConfigError, match=r"ingest.yaml.*unknown key 'sizes'.*size"):
        load_config(IngestConfig, f)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=-1", "train.lr"),
        ("split.fractions=[0.5,0.5,0.5]", "split.fractions"),
        ("model.in_channels=2", "model.in_channels"),
        ("data.window=[100,-100]", "data.window"),
    ],
)
def test_bad_values_name_the_field(override, field):
    model = IngestConfig if override.startswith("split") else TrainConfig
    with pytest.raises(ConfigError, match=field):
        load_config(model, None, [override])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_precedence_defaults_profile_file_set(tmp_path):
    """One rule: defaults < profile < stage file < --set (a `dvc exp run -S` on the file takes effect)."""
    (tmp_path / "profiles.yaml").write_text("demo:\n  train:\n    train: {epochs: 2, lr: 0.5, batch_size: 4}\n")
    (tmp_path / "train.yaml").write_text("train:\n  epochs: 5\n  lr: 0.25\n")
    cfg = load_config(TrainConfig, tmp_path / "train.yaml", ["train.lr=0.125"], profile="demo", stage="train")
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.seed) == (4, 5, 0.125, 0)
    (tmp_path / "train.yaml").write_text("train:\n  epochs: null\n  batch_size: 8\n")  # null: the profile's
    cfg = load_config(TrainConfig, tmp_path / "train.yaml", profile="demo", stage="train")
    assert (cfg.train.epochs, cfg.train.batch_size) == (2, 8)
    with pytest.raises(ConfigError, match="unknown profile 'dem'.*did you mean 'demo'"):
        load_config(TrainConfig, tmp_path / "train.yaml", profile="dem", stage="train")


def test_misspelled_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown key 'train.epoch' \\(did you mean 'train.epochs'\\?\\)"):
        load_config(TrainConfig, None, ["train.epoch=3"])


def test_bad_value_names_its_source(tmp_path):
    (tmp_path / "profiles.yaml").write_text("demo:\n  train:\n    train: {lr: -1}\n")
    (tmp_path / "train.yaml").write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"^--set: train.batch_size"):
        load_config(TrainConfig, None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"^\S*train.yaml: train.epochs"):
        load_config(TrainConfig, tmp_path / "train.yaml")
    with pytest.raises(ConfigError, match=r"^profile 'demo' \(\S*profiles.yaml: demo.train\): train.lr"):
        load_config(TrainConfig, tmp_path / "train.yaml", ["train.epochs=1"], profile="demo", stage="train")


def test_shipped_stage_files_leave_the_profiles_alone():
    """A key set (not null) in both a stage file and a profile would make the profile switch ineffective."""
    import yaml

    root = REPO / "pipelines"
    profiles = yaml.safe_load((root / "profiles.yaml").read_text())
    for stage, model in (("ingest", IngestConfig), ("train", TrainConfig), ("tune", TuneConfig)):
        mine = {k for k, v in _flatten(yaml.safe_load((root / f"{stage}.yaml").read_text()), model) if v is not None}
        for name, prof in profiles.items():
            theirs = {k for k, _ in _flatten(prof.get(stage, {}), model)}
            assert not mine & theirs, f"pipelines/{stage}.yaml repeats profile {name}'s {sorted(mine & theirs)}"


def test_repo_pipelines_load():

    root = REPO / "pipelines"
    load_config(IngestConfig, root / "ingest.yaml", profile="demo", stage="ingest")
    t = load_config(TuneConfig, root / "tune.yaml", profile="demo", stage="tune")
    assert "train.lr" in t.space
    paper = load_config(TrainConfig, root / "train.yaml", profile="paper", stage="train")
    assert (paper.model.encoder, paper.train.epochs, paper.train.batch_size) == ("resnet50", 5, 16)
    assert load_config(ServeConfig, root / "serve.yaml").serve == ServeConfig().serve  # the YAML states the defaults


def test_flat_dict_has_every_leaf():
    flat = to_flat_dict(TrainConfig())
    assert flat["train.lr"] == 1e-3 and flat["loss.dice_weight"] == 1.0 and "run.name" in flat


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("folder.yaml", None, "cannot read (Is a directory)"),
        ("latin1.yaml", b"train:\n  lr: \xe9\n", "not valid YAML"),
        ("deep.yaml", b"[" * 100_000, "not valid YAML"),
        ("huge.yaml", b"#" * (5 << 20), "larger than 4194304 bytes"),
        ("list.yaml", b"- 1\n", "top level must be a mapping"),
    ],
)
def test_a_bad_stage_file_is_one_line(tmp_path, name, content, says):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"{name}: ") as e:
        load_config(TrainConfig, path)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("profile", ["demo: [1, 2]\n", "demo:\n  train: 5\n", "demo:\n  train: [a]\n"])
def test_a_profile_of_the_wrong_shape_is_one_line(tmp_path, profile):
    (tmp_path / "profiles.yaml").write_text(profile)
    with pytest.raises(ConfigError, match="profile 'demo' must map stage names to mappings of keys"):
        load_config(TrainConfig, None, profile="demo", profiles_path=tmp_path / "profiles.yaml", stage="train")
