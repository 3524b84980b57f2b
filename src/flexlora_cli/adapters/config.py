"""adapter_config.json as flexlora reads and writes it: PEFT's LoRA config, without importing PEFT.

`import peft` pulls in transformers (seconds of startup for every command). `AdapterConfig` holds what
a merge needs, with PEFT's defaults for missing fields and PEFT's rank_pattern/alpha_pattern matching.
Every other key is kept as read, so writing a config back loses nothing, also keys of PEFT versions
newer than the installed one (PEFT itself drops those with a warning). Pure Python: no torch, no PEFT.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora_cli.adapters.files import CONFIG_NAME, check_depth, read_json
from flexlora_cli.errors import AdapterError

# Every field of peft.LoraConfig (peft 0.21.2) with its default, as PEFT's to_dict() gives it for a
# missing field (peft_version: the installed PEFT's version). runtime_config is left out: PEFT never
# writes it and drops it when it reads a file. tests/test_config.py checks this table against the
# installed PEFT's dataclass, so a PEFT upgrade that adds or changes a field turns it red.
PEFT_LORA_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "LORA",
    "auto_mapping": None,
    "peft_version": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 8,
    "target_modules": None,
    "exclude_modules": None,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

# peft.utils.peft_types.TaskType: PEFT refuses any other task_type.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Nested sub-configs: PEFT accepts null or an object (whose fields it checks further; flexlora keeps
# them as read, and PEFT fills in their defaults when it loads the written config).
_SUBCONFIGS = ("velora_config", "kasa_config", "eva_config", "corda_config", "lora_ga_config", "arrow_config", "use_bdlora")

# What a trained LoRA can have. A rank is a tensor dimension; a scaling outside this range is no
# trained adapter's (PEFT's defaults give 1 or 2) and would overflow or vanish in float32 math.
MAX_RANK = 2**31 - 1
MIN_SCALING, MAX_SCALING = 1e-12, 1e12

_SET_FIELDS = ("target_modules", "exclude_modules")  # PEFT turns these lists into sets
_ORDERED_FIELDS = ("rank_pattern", "alpha_pattern")  # the first matching key wins: order is meaning


@dataclass(frozen=True)
class AdapterConfig:
    """A LoRA adapter's config: the fields a merge uses, typed, and every other key as read.

    Build it with `from_dict` (validates, with errors naming the file) or `read_config`; change it with
    `replace`; write it with `to_json` (PEFT's adapter_config.json, byte-identical on reruns).
    Lists become tuples and target_modules a frozenset; a null rank_pattern/alpha_pattern becomes {}.
    """

    r: int = 8
    lora_alpha: int | float = 8
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: frozenset[str] | str | None = None  # a str is a regex over full module names
    modules_to_save: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False  # read so that it can be refused; never True in a loaded config
    lora_bias: bool = False  # likewise
    target_parameters: tuple[str, ...] | None = None  # likewise (never non-empty)
    peft_type: str = "LORA"
    extras: dict[str, Any] = field(default_factory=dict)  # every other key, as read

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        put("rank_pattern", dict(self.rank_pattern or {}))
        put("alpha_pattern", dict(self.alpha_pattern or {}))
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            put("target_modules", frozenset(self.target_modules))
        for name in ("modules_to_save", "layers_to_transform", "layers_pattern", "target_parameters"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, int)):
                put(name, tuple(value))
        clash = sorted(set(self.extras) & _TYPED_FIELDS)
        if clash:
            raise ValueError(f"extras must not hold typed fields: {clash}")
        put("extras", copy.deepcopy(dict(self.extras)))
        problem = _range_problem(self)
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_dict(cls, raw: object, source: object) -> AdapterConfig:
        """The config in adapter_config.json's fields (`raw`), refusing what cannot be merged faithfully.

        Missing fields get PEFT's defaults. Raises AdapterError naming `source` (the file) and the problem.
        """
        if not isinstance(raw, dict):
            raise AdapterError(source, "expected a JSON object")
        check_depth(raw, source)
        peft_type = raw.get("peft_type")
        if peft_type != "LORA":
            raise AdapterError(source, f"peft_type is {_show(peft_type)}; only LORA adapters can be merged")
        if raw.get("use_dora"):
            raise AdapterError(source, "DoRA adapters cannot be merged as LoRA (the magnitude vector is not linear)")
        if raw.get("lora_bias"):
            raise AdapterError(source, "lora_bias=True is not supported")
        if raw.get("target_parameters"):
            raise AdapterError(source, "LoRA on target_parameters is not supported")
        _check_field_types(raw, source)
        _check_peft_rules(raw, source)
        typed = {name: raw.get(name, PEFT_LORA_DEFAULTS[name]) for name in _TYPED_FIELDS}
        typed["use_dora"], typed["lora_bias"] = False, False  # falsy, else refused above
        # runtime_config: PEFT drops it on reading (it is only valid at runtime) and never writes it.
        extras = {key: value for key, value in raw.items() if key not in _TYPED_FIELDS and key != "runtime_config"}
        try:
            return cls(**typed, extras=extras)
        except ValueError as error:  # ranks and scalings out of range (__post_init__)
            raise AdapterError(source, str(error)) from None

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) of one module (its full name), with rank_pattern/alpha_pattern matched as PEFT does."""
        rank = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return int(rank), float(alpha)

    def scaling(self, module: str) -> float:
        """PEFT's scaling of one module's delta: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed; fields that are not typed (e.g. lora_dropout) go to extras."""
        other = {key: value for key, value in changes.items() if key not in _TYPED_FIELDS and key != "extras"}
        typed = {key: value for key, value in changes.items() if key not in other}
        if other:
            typed["extras"] = {**typed.get("extras", self.extras), **other}
        return dataclasses.replace(self, **typed)

    def get(self, name: str, default: Any = None) -> Any:
        """Any field by its PEFT name: typed, kept from the file, or PEFT's default."""
        if name in _TYPED_FIELDS:
            return getattr(self, name)
        if name in self.extras:
            return copy.deepcopy(self.extras[name])
        if name == "peft_version":
            return _installed_peft_version()
        return copy.deepcopy(PEFT_LORA_DEFAULTS.get(name, default))

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values, like PEFT's LoraConfig.to_dict(), plus the unknown keys.

        Sets become sorted lists (PEFT keeps them as sets, which json cannot write).
        """
        data = copy.deepcopy(PEFT_LORA_DEFAULTS)
        data.update(copy.deepcopy(self.extras))
        for name in _TYPED_FIELDS:
            data[name] = _plain(getattr(self, name))
        for name in _SET_FIELDS:
            if isinstance(data[name], list):
                data[name] = sorted(set(data[name]))
        if data["peft_version"] is None:
            data["peft_version"] = _installed_peft_version()
        return data

    def to_json(self) -> str:
        """adapter_config.json's text: indent=2, keys sorted, sets sorted, so reruns write identical bytes.

        Only rank_pattern and alpha_pattern keep their key order: PEFT takes the first matching key, so
        sorting them could change a module's rank. (For a file PEFT wrote, they are already sorted and
        the text equals json.dumps(..., indent=2, sort_keys=True) of PEFT's to_dict.)
        """
        data = self.to_dict()
        ordered = {key: data[key] if key in _ORDERED_FIELDS else _sort_keys(data[key]) for key in sorted(data)}
        return json.dumps(ordered, indent=2)


_TYPED_FIELDS = frozenset(f.name for f in dataclasses.fields(AdapterConfig)) - {"extras"}


def read_config(folder: Path) -> AdapterConfig:
    """A folder's adapter_config.json (read with bounds, see files.read_json), validated."""
    path = Path(folder) / CONFIG_NAME
    if not path.exists() and not path.is_symlink():
        raise AdapterError(folder, f"missing {CONFIG_NAME}; is this a PEFT adapter folder?")
    return AdapterConfig.from_dict(read_json(path), path)


def _pattern_key(keys, module: str) -> str:
    """peft.utils.other.get_pattern_key: the first key (in order) whose regex matches the end of
    `module` at a dot boundary, else `module` itself (which then finds no key, or only an exact one)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _check_field_types(raw: dict, source: object) -> None:
    """Types of the fields the merge relies on: PEFT checks few of them, and a wrong one would surface
    later as a crash (or as a PEFT error when the output is loaded)."""

    def refuse(key_name: str, expected: str):
        raise AdapterError(source, f"{key_name} must be {expected}, got {_show(raw.get(key_name))}")

    if not _positive(raw.get("r", PEFT_LORA_DEFAULTS["r"]), integer=True):
        refuse("r", "a positive integer")
    if not _positive(raw.get("lora_alpha", PEFT_LORA_DEFAULTS["lora_alpha"])):
        refuse("lora_alpha", "a positive number")
    for key_name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = raw.get(key_name) or {}
        valid = isinstance(pattern, dict) and all(isinstance(k, str) and _positive(v, integer) for k, v in pattern.items())
        if not valid:
            refuse(key_name, f"an object mapping module names to positive {'integers' if integer else 'numbers'}")
        for key in pattern:
            try:
                re.compile(rf"(.*\.)?({key})$")  # how PEFT matches it against module names
            except (re.error, RecursionError, OverflowError) as error:
                reason = getattr(error, "msg", None) or type(error).__name__
                raise AdapterError(
                    source, f"{key_name} key {_show(key)} is not a valid regular expression (PEFT matches keys as regexes): {reason}"
                ) from None
    for key_name in ("fan_in_fan_out", "use_rslora"):
        if not isinstance(raw.get(key_name, False), bool):
            refuse(key_name, "true or false")
    for key_name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        if not _is_names(raw.get(key_name), allow_str=True):
            refuse(key_name, "a string or a list of strings")
    if not _is_names(raw.get("target_parameters"), allow_str=False):
        refuse("target_parameters", "a list of strings")
    layers = raw.get("layers_to_transform")
    if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
        refuse("layers_to_transform", "an integer or a list of integers")
    if not isinstance(raw.get("base_model_name_or_path", ""), (str, type(None))):
        refuse("base_model_name_or_path", "a string")


def _check_peft_rules(raw: dict, source: object) -> None:
    """What peft.LoraConfig refuses when it reads a config (so that PEFT can load what flexlora writes)."""

    def refuse(problem: str):
        raise AdapterError(source, f"not a valid LoRA config: {problem}")

    task_type = raw.get("task_type")
    if task_type is not None and task_type not in TASK_TYPES:
        refuse(f"task_type must be one of {', '.join(TASK_TYPES)}, got {_show(task_type)}")
    regex_targets = isinstance(raw.get("target_modules"), str)
    if regex_targets and raw.get("layers_to_transform") is not None:
        refuse("layers_to_transform cannot be used when target_modules is a str (a regex)")
    if regex_targets and raw.get("layers_pattern") is not None:
        refuse("layers_pattern cannot be used when target_modules is a str (a regex)")
    if raw.get("layers_pattern") and raw.get("layers_to_transform") is None:
        refuse("when layers_pattern is given, layers_to_transform must be given too")
    if raw.get("init_lora_weights") == "loftq" and not raw.get("loftq_config"):
        refuse("loftq_config must be given when init_lora_weights is 'loftq'")
    for name in _SUBCONFIGS:
        if not isinstance(raw.get(name), (dict, type(None))):
            refuse(f"{name} must be an object or null, got {_show(raw.get(name))}")


def _range_problem(config: AdapterConfig) -> str | None:
    """Ranks that cannot be a tensor dimension, alphas whose scaling would overflow or vanish."""
    ranks = [("r", config.r)] + [(f"rank_pattern[{_show(k)}]", v) for k, v in config.rank_pattern.items()]
    for label, rank in ranks:
        if not (_is_int(rank) and 0 < rank <= MAX_RANK):
            return f"{label} must be a positive integer below 2**31 (a LoRA rank), got {_show(rank)}"
    alphas = [("lora_alpha", config.lora_alpha)] + [(f"alpha_pattern[{_show(k)}]", v) for k, v in config.alpha_pattern.items()]
    for label, alpha in alphas:
        if not _positive(alpha):
            return f"{label} must be a positive number, got {_show(alpha)}"
    extremes = {min(ranks, key=lambda item: item[1]), max(ranks, key=lambda item: item[1])}
    for label, alpha in alphas:
        for rank_label, rank in sorted(extremes, key=lambda item: item[1]):
            scaling = _to_float(alpha) / (math.sqrt(rank) if config.use_rslora else rank)
            if not MIN_SCALING <= scaling <= MAX_SCALING:
                formula = "alpha/sqrt(r), rsLoRA" if config.use_rslora else "alpha/r"
                return (
                    f"{label} = {_show(alpha)} with {rank_label} = {rank} gives scaling {scaling:.3g} ({formula}); "
                    f"a LoRA scaling must lie between {MIN_SCALING:g} and {MAX_SCALING:g}"
                )
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: object, integer: bool = False) -> bool:
    if _is_int(value):
        return value > 0  # no float conversion: an int may have thousands of digits
    return not integer and isinstance(value, float) and value > 0 and math.isfinite(value)


def _is_names(value: object, allow_str: bool) -> bool:
    listed = isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value is None or listed or (allow_str and isinstance(value, str))


def _to_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf


def _show(value: object, limit: int = 60) -> str:
    """A value for an error message: short, one line (never thousands of digits)."""
    if _is_int(value) and abs(value) >= 10**18:
        try:
            return f"a {len(str(abs(value)))}-digit number"
        except ValueError:  # beyond Python's int-to-str limit
            return "a number with too many digits to print"
    try:
        text = repr(value)
    except ValueError:
        return "a value too large to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: object) -> object:
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _sort_keys(value: object) -> object:
    if isinstance(value, dict):
        return {key: _sort_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sort_keys(item) for item in value]
    return value


@functools.cache
def _installed_peft_version() -> str | None:
    """What PEFT writes as peft_version for a config without one (without importing PEFT)."""
    from importlib import metadata

    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return None
