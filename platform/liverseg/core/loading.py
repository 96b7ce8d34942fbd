"""Building a typed stage config from `pipelines/*.yaml`, a named profile, and `--set key=value` overrides.

Precedence, lowest first: defaults (`config`) < the named
profile's section (pipelines/profiles.yaml) < the stage file (pipelines/<stage>.yaml) < `--set`.
Values given with `--set` are parsed as YAML, keys are dotted paths (`train.lr=3e-4`,
`split.fractions=[0.8,0.1,0.1]`); an unknown key is an error that suggests the closest and lists the
valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from liverseg.core.errors import ConfigError
from liverseg.core.limits import MAX_METADATA_BYTES

Cfg = TypeVar("Cfg", bound=BaseModel)


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """All dotted keys of a config model, leaves only."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def did_you_mean(word: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def set_dotted(tree: dict[str, Any], key: str, value: Any, model: type[BaseModel]) -> None:
    """Set `a.b.c` in a nested dict, refusing keys the model does not have."""
    parts = key.split(".")
    node_model: type[BaseModel] | None = model
    node = tree
    for i, part in enumerate(parts):
        fields = node_model.model_fields if node_model else {}
        if node_model is not None and part not in fields:
            keys = valid_keys(model)
            raise ConfigError(f"unknown key '{key}'{did_you_mean(key, keys)}; valid keys: {', '.join(keys)}")
        last = i == len(parts) - 1
        if last:
            node[part] = value
            return
        ann = fields[part].annotation if node_model else None
        node_model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """`["a.b=1", "c=[1,2]"]` -> [("a.b", 1), ("c", [1, 2])]; values are YAML."""
    pairs = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value is not YAML: {str(e).splitlines()[0]}") from e
        pairs.append((key.strip(), value))
    return pairs


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's top-level mapping; ConfigError in one line for a missing, unreadable, oversized,
    non-YAML or non-mapping file."""
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise OSError(f"larger than {MAX_METADATA_BYTES} bytes: not a config file")
        data = yaml.safe_load(path.read_bytes()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: not UTF-8
        raise ConfigError(f"{path}: not valid YAML: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _flatten(tree: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of a nested dict as dotted pairs; free-form dict fields (like `space`) stay whole."""
    pairs = []
    for k, v in tree.items():
        field = model.model_fields.get(k)
        ann = field.annotation if field else None
        if isinstance(v, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            pairs += [(f"{prefix}{k}.{kk}", vv) for kk, vv in _flatten(v, ann)]
        else:
            pairs.append((f"{prefix}{k}", v))
    return pairs


PRECEDENCE = "defaults < profile < stage file < --set"  # the one rule, in README and --help


def default_profile(pipelines: str | Path = "pipelines") -> str | None:
    """The profile named in `pipelines/profile.yaml` (the one switch), or None without that file."""
    path = Path(pipelines) / "profile.yaml"
    return str(_read_yaml(path).get("profile") or "") or None if path.exists() else None


def _profile_layer(profile: str, ppath: Path, stage: str | None) -> dict[str, Any]:
    profiles = _read_yaml(ppath)
    if profile not in profiles:
        raise ConfigError(
            f"{ppath}: unknown profile '{profile}'{did_you_mean(profile, list(profiles))}; valid: {', '.join(profiles)}"
        )
    entry = profiles[profile] or {}
    section = (entry.get(stage or "") or {}) if isinstance(entry, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{ppath}: profile '{profile}' must map stage names to mappings of keys")
    return section


def load_config(
    model: type[Cfg],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
    profiles_path: str | Path | None = None,
    stage: str | None = None,
) -> Cfg:
    """Build a config: defaults < profile section for `stage` < YAML stage file < `--set` overrides.

    The stage file is what the user edits (`dvc exp run -S pipelines/tune.yaml:train.epochs=2`), so it
    wins over the profile, except where it says null (the profile's value, or the default); the profile picks the machine (demo laptop, paper GPU box). Raises ConfigError
    with one line naming the key and where its value came from (`--set`, the file, the profile).
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if profile:
        ppath = Path(profiles_path or Path(path or "pipelines/x").parent / "profiles.yaml")
        layers.append((f"profile '{profile}' ({ppath}: {profile}.{stage})", _profile_layer(profile, ppath, stage)))
    if path:
        layers.append((str(path), _read_yaml(Path(path))))
    # null in a stage file means "the profile's value": the file can name every key a user may set with
    # `dvc exp run -S` (DVC only overrides keys that exist) without taking them from the profile
    staged = [(w, [(k, v) for k, v in _flatten(lay, model) if v is not None or w != str(path)]) for w, lay in layers]
    for where, pairs in [*staged, ("--set", parse_overrides(overrides))]:
        try:
            for key, value in pairs:
                set_dotted(tree, key, value, model)
                sources[key] = where
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = next((w for k, w in sources.items() if loc == k or loc.startswith(f"{k}.")), "defaults")
        raise ConfigError(f"{where}: {loc}: {err['msg']} (got {err.get('input')!r})") from None


def describe_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, one-line reason) for every leaf of a config model, for `--help`."""
    rows: list[tuple[str, Any, str]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_keys(ann, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows


def to_flat_dict(cfg: BaseModel) -> dict[str, Any]:
    """Dotted leaves of a config, for MLflow params and hashing."""
    return dict(_flatten(cfg.model_dump(mode="json"), type(cfg)))
