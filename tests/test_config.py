"""flexlora's own adapter_config.json type against PEFT, the reference: same fields, same defaults,
same rank_pattern/alpha_pattern matching, same JSON text; bounded reading of hostile config files;
and a command path that never imports PEFT or transformers."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import tiny_llama, write_client
from flexlora_cli.adapters.config import PEFT_LORA_DEFAULTS, TASK_TYPES, AdapterConfig, read_config
from flexlora_cli.adapters.files import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, parse_json, read_json
from flexlora_cli.errors import AdapterError

SRC = Path(__file__).resolve().parents[1] / "src"


def peft_config(raw: dict):
    """PEFT's reading of adapter_config.json's fields (what PeftModel.from_pretrained builds)."""
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys, ignored sub-configs
        return LoraConfig.from_peft_type(**copy.deepcopy(raw))


def peft_text(config) -> str:
    """The config text flexlora wrote before AdapterConfig (write.config_json on PEFT's LoraConfig)."""
    fields = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    return json.dumps(fields, indent=2, sort_keys=True)


def peft_rank_alpha(config, module: str) -> tuple[int, float]:
    """What peft.tuners.lora.LoraModel._create_and_replace gives a module (a null pattern, on which
    PEFT crashes, taken as {})."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.r)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
    return r, alpha


def one_line_error(call) -> str:
    with pytest.raises(AdapterError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# --- PEFT's fields, defaults and constants -------------------------------------------------------------


def test_defaults_are_peft_loraconfig_defaults():
    from peft import LoraConfig

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    assert set(fields) - {"runtime_config"} == set(PEFT_LORA_DEFAULTS), "PEFT added or removed a LoraConfig field"
    for name, spec in fields.items():
        if name in ("runtime_config", "peft_type"):  # never written; set to LORA by __post_init__
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        assert PEFT_LORA_DEFAULTS[name] == default and type(PEFT_LORA_DEFAULTS[name]) is type(default), name
    # the effective defaults, after PEFT's __post_init__ (peft_type, peft_version), as written
    assert AdapterConfig().to_json() == peft_text(LoraConfig())
    assert AdapterConfig.from_dict({"peft_type": "LORA"}, "x").to_json() == peft_text(LoraConfig())


def test_constants_are_peft_constants():
    from peft.utils import CONFIG_NAME as PEFT_CONFIG
    from peft.utils import SAFETENSORS_WEIGHTS_NAME as PEFT_SAFETENSORS
    from peft.utils import WEIGHTS_NAME as PEFT_WEIGHTS
    from peft.utils.peft_types import TaskType

    assert (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) == (PEFT_CONFIG, PEFT_SAFETENSORS, PEFT_WEIGHTS)
    assert TASK_TYPES == tuple(t.value for t in TaskType)


# --- property test: parse, pattern matching and text against PEFT --------------------------------------

# Keys that overlap (several match one module), regexes, and keys that match nothing.
PATTERN_KEYS = [
    "q_proj", "v_proj", "k_proj", "down_proj", "self_attn.q_proj", "layers.1.self_attn.q_proj",
    "model.layers.0.mlp.down_proj", "layers.0.mlp.down_proj", "mlp.down_proj", r"layers\.\d+\.self_attn\.v_proj",
    r".*\.1\.self_attn\.q_proj", "(q|v)_proj", "proj", "_proj", "q", "layers.1", "layers.[01].self_attn.k_proj",
    "model.layers.0.self_attn.q_proj", "layers.10.self_attn.q_proj", "embed_tokens", "lm_head", "c_attn",
    "h.0.attn.c_attn", "attn.c_.*", "model", "0.self_attn.q_proj",
]
MODULES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens", "lm_head",
    "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "q_proj", "self_attn.q_proj", "xq_proj",
    "model.layers.0.self_attn.xq_proj", "model.layers.1.self_attn.q_proj_extra", "model.layers.01.self_attn.k_proj",
]
NAME_PARTS = ["model", "layers", "0", "1", "10", "self_attn", "mlp", "q_proj", "v_proj", "down_proj", "h", "attn", "c_attn"]

json_leaf = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
names = st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "down_proj", "embed_tokens", "c_attn"]), max_size=5)
alpha_value = st.integers(1, 128) | st.floats(0.01, 512)
MISSING = object()


def rarely(strategy, otherwise=st.none()):
    """`strategy` one time in twenty: values PEFT refuses, kept rare so most examples are valid."""
    return st.integers(0, 19).flatmap(lambda i: strategy if i == 0 else otherwise)


@st.composite
def adapter_configs(draw) -> dict:
    """adapter_config.json fields as PEFT versions write them, and as people edit them."""
    fields = {
        "r": st.integers(1, 256),
        "lora_alpha": alpha_value,
        "use_rslora": st.booleans(),
        "fan_in_fan_out": st.booleans(),
        "rank_pattern": st.dictionaries(st.sampled_from(PATTERN_KEYS), st.integers(1, 64), max_size=6) | st.none(),
        "alpha_pattern": st.dictionaries(st.sampled_from(PATTERN_KEYS), alpha_value, max_size=6) | st.none(),
        "target_modules": names | st.sampled_from([r".*\.(q|v)_proj", "q_proj", r"model\.layers\.\d+\.mlp\..*"]) | st.none(),
        "exclude_modules": names | st.none(),
        "modules_to_save": names | st.none(),
        "layers_to_transform": rarely(st.integers(0, 3) | st.lists(st.integers(0, 3), max_size=3)),
        "layers_pattern": rarely(st.sampled_from(["layers", "h", ""]) | st.lists(st.sampled_from(["layers", "h"]), max_size=2)),
        "base_model_name_or_path": st.none() | st.text(max_size=12),
        "task_type": rarely(st.just("NOT_A_TASK"), st.none() | st.sampled_from(TASK_TYPES)),
        "lora_dropout": st.floats(0, 0.5),
        "bias": st.sampled_from(["none", "all", "lora_only"]),
        "inference_mode": st.booleans(),
        "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa"]),
        "use_dora": st.just(False),
        "lora_bias": st.just(False),
        "target_parameters": st.none() | st.just([]),
        "peft_version": st.sampled_from(["0.13.2", "0.17.0"]),
        "megatron_core": st.just("megatron.core"),
        "layer_replication": st.none() | st.just([[0, 1], [1, 2]]),
        "revision": st.none() | st.text(max_size=6),
        "eva_config": rarely(st.sampled_from([0, "x", [], False])),  # PEFT: null or an object
        "use_bdlora": rarely(st.just(True)),
    }
    raw = {"peft_type": "LORA"}
    for name, strategy in fields.items():
        value = draw(st.integers(0, 3).flatmap(lambda i: st.just(MISSING) if i == 0 else strategy))  # older PEFT versions
        if value is not MISSING:
            raw[name] = value
    for key, value in draw(st.dictionaries(st.from_regex(r"future_[a-z]{1,6}", fullmatch=True), json_value, max_size=3)).items():
        raw[key] = value  # fields of a newer PEFT
    return dict(draw(st.permutations(list(raw.items()))))  # any key order in the file


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=adapter_configs(), extra_modules=st.lists(st.lists(st.sampled_from(NAME_PARTS), min_size=1, max_size=5).map(".".join), max_size=4))
def test_parse_and_pattern_matching_agree_with_peft(raw, extra_modules):
    try:
        theirs = peft_config(raw)
    except (TypeError, ValueError) as error:  # PEFT refuses the config: so must flexlora
        event("PEFT refuses the config")
        assert one_line_error(lambda: AdapterConfig.from_dict(raw, "cfg.json")).startswith("cfg.json: "), error
        return
    ours = AdapterConfig.from_dict(copy.deepcopy(raw), "cfg.json")

    # typed fields, value and type (an int alpha stays an int: the JSON text depends on it)
    assert ours.peft_type == theirs.peft_type == "LORA"
    for name in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "base_model_name_or_path"):
        assert getattr(ours, name) == getattr(theirs, name) and type(getattr(ours, name)) is type(getattr(theirs, name)), name
    for name in ("rank_pattern", "alpha_pattern"):  # null becomes {} (PEFT cannot load a null pattern)
        assert getattr(ours, name) == (getattr(theirs, name) or {}), name
        assert list(getattr(ours, name)) == list(getattr(theirs, name) or {}), f"{name}: key order is meaning"
    assert ours.target_modules == theirs.target_modules
    for name in ("modules_to_save", "layers_to_transform", "layers_pattern", "target_parameters"):
        value = getattr(ours, name)
        assert (list(value) if isinstance(value, tuple) else value) == getattr(theirs, name), name
    # every other field, as PEFT's to_dict gives it; unknown keys kept besides
    unknown = {key for key in raw if key.startswith("future_")}
    ours_dict, theirs_dict = ours.to_dict(), json.loads(peft_text(theirs))
    nulls = [p for p in ("rank_pattern", "alpha_pattern") if theirs_dict[p] is None]
    theirs_dict.update({p: {} for p in nulls})
    assert {k: v for k, v in ours_dict.items() if k not in unknown} == theirs_dict
    assert {k: ours_dict[k] for k in unknown} == {k: raw[k] for k in unknown}
    # the same text, byte for byte, wherever PEFT's sort_keys cannot change a pattern's meaning
    text = ours.to_json()
    assert text == ours.replace().to_json() and json.loads(text) == ours_dict
    patterns_sorted = all(list(ours.get(p)) == sorted(ours.get(p)) for p in ("rank_pattern", "alpha_pattern"))
    if not unknown and not nulls and patterns_sorted:
        assert text == peft_text(theirs)
    # a written config reads back to the same config
    assert AdapterConfig.from_dict(parse_json(text.encode(), "again"), "again").to_dict() == ours_dict

    # per-module rank, alpha and scaling exactly as PEFT's LoraModel gives them
    for module in MODULES + extra_modules:
        r, alpha = peft_rank_alpha(theirs, module)
        if (r, alpha) != (theirs.r, theirs.lora_alpha):
            event("a pattern decides a module's rank or alpha")
        assert ours.rank_alpha(module) == (r, alpha), module
        assert ours.scaling(module) == (alpha / math.sqrt(r) if theirs.use_rslora else alpha / r), module


def test_pattern_matching_edge_cases_agree_with_peft():
    """Hand-picked cases the property test may not reach, each a way to get PEFT's matching wrong."""
    cases = [
        ({"proj": 2}, "model.layers.0.self_attn.q_proj", 8),  # no dot before "proj": no match (re.search would)
        ({"q_proj": 2}, "model.layers.0.self_attn.xq_proj", 8),  # dot boundary
        ({"q_proj": 2}, "model.layers.0.self_attn.q_proj_extra", 8),  # anchored at the end
        ({"layers.0": 2}, "model.layers.0.self_attn.q_proj", 8),  # a prefix is not a match
        ({"self_attn.q_proj": 2, "q_proj": 3}, "model.layers.0.self_attn.q_proj", 2),  # first key wins
        ({"q_proj": 3, "self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj", 3),  # ... in file order
        ({"model.layers.0.self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj", 2),  # whole name
        ({"a|q_proj": 2}, "model.layers.0.self_attn.q_proj", 2),  # PEFT wraps the key in a group
        ({"a*": 5}, "a*", 5),  # no regex match: PEFT falls back to the module name as the key
        ({r"q\1": 2}, "a.qa.", 2),  # the key is group 2 of PEFT's regex: \1 is PEFT's prefix group ("a.")
    ]
    for pattern, module, expected in cases:
        raw = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": pattern, "alpha_pattern": pattern}
        theirs = peft_config(raw)
        assert peft_rank_alpha(theirs, module)[0] == expected, (pattern, module)
        assert AdapterConfig.from_dict(raw, "x").rank_alpha(module) == (expected, float(expected)), (pattern, module)


def test_a_pattern_key_that_is_no_regex_is_refused_where_peft_would_crash():
    from peft.utils.other import get_pattern_key

    with pytest.raises(Exception):  # re.error, when PEFT matches modules against it
        get_pattern_key(["(q_proj"], "model.layers.0.self_attn.v_proj")
    message = one_line_error(lambda: AdapterConfig.from_dict({"peft_type": "LORA", "rank_pattern": {"(q_proj": 4}}, "c.json"))
    assert message.startswith("c.json: rank_pattern key '(q_proj' is not a valid regular expression"), message


# --- round trip through PEFT with a real model and weights ------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_written_config_gives_peft_the_same_ranks_alphas_and_scalings(tmp_path, use_rslora):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    from flexlora_cli.adapters.load import load_adapter

    raw = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": use_rslora, "base_model_name_or_path": "tiny-llama",
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        # overlapping keys, not sorted: the first match wins, so writing them sorted would change ranks
        "rank_pattern": {"self_attn.q_proj": 2, "layers.1.self_attn.q_proj": 6, "down_proj": 3},
        "alpha_pattern": {"v_proj": 5, "model.layers.0.self_attn.v_proj": 7.5},
        "future_peft_field": {"nested": [1, 2, {"b": True}], "a": None},
    }
    ours = AdapterConfig.from_dict(raw, "raw")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(ours.to_json(), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the unknown key, and ignores it
        model = get_peft_model(tiny_llama(), LoraConfig.from_pretrained(str(folder)))
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = torch.randn(param.shape, generator=generator)
        state = {key: value.contiguous() for key, value in get_peft_model_state_dict(model).items()}
        save_file(state, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        loaded = PeftModel.from_pretrained(tiny_llama(), str(folder))

    peft_modules = {}
    for name, module in loaded.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            peft_modules[name] = (module.r["default"], module.lora_alpha["default"], module.scaling["default"])
    assert len(peft_modules) == 6
    for name, (r, alpha, scaling) in peft_modules.items():
        assert ours.rank_alpha(name) == (r, alpha) and ours.scaling(name) == scaling, name
        assert module_rank(state, name) == r  # the weights PEFT built have these ranks too
    adapter = load_adapter(folder)  # flexlora's reader, module by module
    assert {n: (m.rank, m.alpha, m.scaling) for n, m in adapter.modules.items()} == peft_modules
    assert peft_modules["model.layers.1.self_attn.q_proj"][0] == 2 and peft_modules["model.layers.0.self_attn.v_proj"][1] == 5
    # sorting the patterns (PEFT's save_pretrained, and flexlora before) would have changed them
    resorted = {**raw, "rank_pattern": dict(sorted(raw["rank_pattern"].items())), "alpha_pattern": dict(sorted(raw["alpha_pattern"].items()))}
    assert any(AdapterConfig.from_dict(resorted, "s").rank_alpha(n) != ours.rank_alpha(n) for n in peft_modules)
    # unknown keys survive the write, and the next read
    written = json.loads((folder / CONFIG_NAME).read_text())
    assert written["future_peft_field"] == raw["future_peft_field"]
    assert read_config(folder).to_json() == ours.to_json()


def module_rank(state: dict[str, torch.Tensor], name: str) -> int:
    return state[f"base_model.model.{name}.lora_A.weight"].shape[0]


@pytest.mark.parametrize(
    "options",
    [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 4}, alpha_pattern={"v_proj": 3.0}),
        dict(r=64, lora_alpha=16, use_rslora=True, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj", exclude_modules=["v_proj", "q_proj"]),
        dict(r=4, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers", task_type="CAUSAL_LM"),
    ],
)
def test_peft_written_configs_are_written_back_byte_identical(tmp_path, options):
    from peft import LoraConfig

    LoraConfig(**options).save_pretrained(str(tmp_path))
    ours = read_config(tmp_path)
    assert ours.to_json() == peft_text(LoraConfig.from_pretrained(str(tmp_path)))


def test_client_adapters_are_written_back_byte_identical(tmp_path):
    from peft import LoraConfig

    folder = write_client(tmp_path / "c", 8, rank_pattern={"layers.1.self_attn.q_proj": 4}, alpha_pattern={"v_proj": 3.0})
    assert read_config(folder).to_json() == peft_text(LoraConfig.from_pretrained(str(folder)))


def test_replace_copy_and_equality():
    config = AdapterConfig.from_dict({"peft_type": "LORA", "r": 8, "target_modules": ["v", "q"], "future_x": [1]}, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 4
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config
    changed = config.replace(r=4, lora_alpha=4, rank_pattern={"q": 2}, target_modules={"q"}, modules_to_save=["lm_head"], lora_dropout=0.1)
    assert (changed.r, changed.rank_alpha("a.q"), changed.target_modules, changed.modules_to_save) == (4, (2, 4.0), frozenset({"q"}), ("lm_head",))
    assert changed.get("lora_dropout") == 0.1 and changed.extras == {"future_x": [1], "lora_dropout": 0.1}
    assert config.r == 8 and config.get("lora_dropout") == 0.0  # the original is unchanged; PEFT's default
    with pytest.raises(ValueError, match="below 2"):
        config.replace(r=2**31)
    # the same content in another order writes the same bytes
    other = AdapterConfig.from_dict({"future_x": [1], "target_modules": ["q", "v", "q"], "r": 8, "peft_type": "LORA"}, "y")
    assert other.to_json() == config.to_json()


# --- bad config files (issue 11): one line, naming the file, never a hang or a crash ---------------------


def pure_python(code: str, timeout: float = 60) -> str:
    """Run `code` in a fresh interpreter with flexlora's config modules, torch, PEFT and transformers
    unimportable (the package's __init__ is skipped), under a timeout; return its stdout."""
    prelude = f"""
        import sys, types
        for name in ("torch", "peft", "transformers"):
            sys.modules[name] = None  # importing any of them now fails
        import flexlora_cli
        package = types.ModuleType("flexlora_cli.adapters")
        package.__path__ = [{str(SRC / "flexlora_cli" / "adapters")!r}]
        sys.modules["flexlora_cli.adapters"] = package
        from flexlora_cli.adapters.config import AdapterConfig, read_config
        from flexlora_cli.errors import AdapterError
    """
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(code)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading did not finish within {timeout} s (blocked, or reading without bound)")
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_error_in_subprocess(folder: Path) -> str:
    return pure_python(f"""
        try:
            read_config(__import__("pathlib").Path({str(folder)!r}))
        except AdapterError as error:
            print(error)
        else:
            print("accepted")
    """).rstrip("\n")


def valid_raw() -> dict:
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


def test_config_modules_import_without_torch_or_peft():
    out = pure_python("""
        config = AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": 2}}, "x")
        print(config.rank_alpha("model.layers.0.self_attn.q_proj"), len(config.to_json()) > 100)
    """)
    assert out == "(2, 8.0) True\n"


def test_fifo_config_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / CONFIG_NAME)  # no writer ever opens it: a plain open() would wait forever
    message = read_error_in_subprocess(tmp_path)
    assert message == f"{tmp_path / CONFIG_NAME}: is a named pipe (FIFO), not a regular file"


def test_config_linked_to_dev_zero_is_refused_without_reading_it(tmp_path):
    os.symlink("/dev/zero", tmp_path / CONFIG_NAME)  # endless zeros: reading it unbounded never ends
    message = read_error_in_subprocess(tmp_path)
    assert message == f"{tmp_path / CONFIG_NAME}: is a character device, not a regular file"


def test_huge_config_is_refused_before_reading(tmp_path):
    path = tmp_path / CONFIG_NAME
    with open(path, "wb") as handle:
        handle.write(json.dumps(valid_raw()).encode())
        handle.truncate(100 * 2**20)  # 100 MB (sparse)
    tracemalloc.start()
    try:
        message = one_line_error(lambda: read_config(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == f"{path}: is 100.0 MiB; expected a small JSON file (at most 16.0 MiB)"
    assert peak < 2**20, f"read {peak} bytes of a file it refuses"


def test_deeply_nested_config_is_refused(tmp_path):
    path = tmp_path / CONFIG_NAME
    for depth in (100_000, 200):  # past the interpreter's recursion limit, and within it
        path.write_text('{"peft_type": "LORA", "x": ' + "[" * depth + "]" * depth + "}")
        message = one_line_error(lambda: read_config(tmp_path))
        assert message == f"{path}: JSON nested more than 64 levels deep", message
    nested = {"peft_type": "LORA", "future": {"a": [{"b": [1]}]}}  # what real configs look like passes
    path.write_text(json.dumps(nested))
    assert read_config(tmp_path).extras == {"future": {"a": [{"b": [1]}]}}


def test_numbers_beyond_any_rank_or_scaling_are_refused(tmp_path):
    path = tmp_path / CONFIG_NAME

    def message_for(text: str) -> str:
        path.write_text(text)
        return one_line_error(lambda: read_config(tmp_path)).removeprefix(f"{path}: ")

    def with_field(name: str, literal: str) -> str:
        return json.dumps({**valid_raw(), name: "@"}).replace('"@"', literal)

    assert message_for(with_field("r", "9" * 5000)) == "invalid JSON: a number with more than 4300 digits (ValueError)"
    assert message_for(with_field("r", "9" * 4000)) == "r must be a positive integer below 2**31 (a LoRA rank), got a 4000-digit number"
    assert message_for(with_field("r", str(2**31))) == "r must be a positive integer below 2**31 (a LoRA rank), got 2147483648"
    assert message_for(with_field("rank_pattern", '{"q_proj": 4294967296}')).startswith("rank_pattern['q_proj'] must be a positive integer below 2**31")
    assert message_for(with_field("lora_alpha", "1e308")) == (
        "lora_alpha = 1e+308 with r = 8 gives scaling 1.25e+307 (alpha/r); a LoRA scaling must lie between 1e-12 and 1e+12"
    )
    assert message_for(with_field("lora_alpha", "1" + "0" * 400)).startswith("lora_alpha = a 401-digit number with r = 8 gives scaling inf")
    assert message_for(with_field("alpha_pattern", '{"q_proj": 1e300}')).startswith("alpha_pattern['q_proj'] = 1e+300 with r = 8 gives scaling 1.25e+299")
    assert message_for(with_field("lora_alpha", "1e-320")).startswith("lora_alpha = 1e-320 with r = 8 gives scaling 1.2")  # subnormal, vanishes in float32
    assert message_for(with_field("lora_alpha", "1e400")) == "lora_alpha must be a positive number, got inf"
    assert message_for(with_field("lora_alpha", "NaN")) == "lora_alpha must be a positive number, got nan"
    # the bounds themselves hold real adapters: PEFT's largest ranks with rsLoRA, tiny and large alphas
    for r, alpha, rslora in ((2**31 - 1, 16, True), (2**31 - 1, 1, False), (1, 4096.0, False)):
        path.write_text(json.dumps({**valid_raw(), "r": r, "lora_alpha": alpha, "use_rslora": rslora}))
        assert read_config(tmp_path).r == r


def test_other_unreadable_configs_name_the_file(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.mkdir()
    assert one_line_error(lambda: read_config(tmp_path)) == f"{path}: is a folder, not a JSON file"
    path.rmdir()
    assert one_line_error(lambda: read_config(tmp_path)) == f"{tmp_path}: missing {CONFIG_NAME}; is this a PEFT adapter folder?"
    for data, expected in (
        (b"\xff\xfe{}", "cannot read: not UTF-8 text"),
        (b'{"peft_type": "LORA",', "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 22 (char 21)"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"peft_type": "IA3"}', "peft_type is 'IA3'; only LORA adapters can be merged"),
        (b'{"peft_type": "LORA", "task_type": "X"}', "not a valid LoRA config: task_type must be one of"),
        (b'{"peft_type": "LORA", "target_modules": "q.*", "layers_to_transform": [0]}', "not a valid LoRA config: layers_to_transform"),
        (b'{"peft_type": "LORA", "layers_to_transform": true}', "layers_to_transform must be an integer or a list of integers, got True"),
        (b'{"peft_type": "LORA", "r": 0}', "r must be a positive integer, got 0"),
        (b'{"peft_type": "LORA", "r": "' + b"x" * 200 + b'"}', "r must be a positive integer, got 'xxxxxxxx"),
    ):
        path.write_bytes(data)
        message = one_line_error(lambda: read_config(tmp_path))
        assert message.startswith(f"{path}: {expected}"), message


def test_read_json_bounds_are_parameters(tmp_path):
    path = tmp_path / "small.json"
    path.write_text('{"a": [[1]]}')
    assert read_json(path) == {"a": [[1]]}
    assert "at most 4 bytes" in one_line_error(lambda: read_json(path, max_bytes=4))
    assert one_line_error(lambda: read_json(path, max_depth=2)) == f"{path}: JSON nested more than 2 levels deep"


# --- the command path imports neither PEFT nor transformers (issue 13: start fast) ------------------------

IMPORT_WATCH = """
import sys, traceback
class Watch:  # records who imports peft or transformers (it does not block them)
    seen = {}
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ("peft", "transformers") and top not in self.seen:
            frames = [f"{f.filename.rpartition('/src/')[2]}:{f.lineno}" for f in traceback.extract_stack() if "flexlora_cli" in f.filename]
            self.seen[top] = " <- ".join(reversed(frames))
        return None
sys.meta_path.insert(0, Watch())
"""


def run_watched(code: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WATCH + textwrap.dedent(code) + "\nimport json; print(json.dumps(Watch.seen))"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def client_folder(tmp_path_factory) -> Path:
    return write_client(tmp_path_factory.mktemp("client") / "alice", 4, rank_pattern={"q_proj": 2})


def test_load_adapter_imports_neither_peft_nor_transformers(client_folder):
    seen = run_watched(f"""
        from flexlora_cli.adapters.load import load_adapter
        adapter = load_adapter({str(client_folder)!r})
        assert adapter.modules["model.layers.0.self_attn.q_proj"].rank == 2
    """)
    assert seen == {}, f"imported through: {seen}"


def test_cli_inspect_imports_neither_peft_nor_transformers(client_folder):
    seen = run_watched(f"""
        from flexlora_cli.cli.app import main
        sys.argv = ["flexlora", "inspect", {str(client_folder)!r}, "--json"]
        try:
            main()
        except SystemExit as exit:
            assert not exit.code, exit.code
    """)
    assert seen == {}, f"imported through: {seen}"
