"""The configuration tree: schema, round trips, presets and every validation error."""

import json
import math

import jax
import jax.numpy as jnp
import pytest
import yaml

import jaxbar
from jaxbar import ConfigError, CrossbarConfig, IRSolverConfig, ParasiticsConfig
from jaxbar.config import SOLVER_KEYS
from jaxbar.nn.network_config import NetworkConfig

SCHEMA_DEFAULTS = {
    "array": {"rows": None, "cols": None},
    "weights": {"bits": 0, "clip_percentile": 100.0},
    "mapping": {"scheme": "differential", "slices": 1, "subtract": "analog",
                "offset_subtraction": "digital"},
    "device": {"on_off_ratio": None, "cell_bits": None,
               "programming_error": {"model": "none", "sigma": 0.0},
               "read_noise": {"model": "none", "sigma": 0.0}, "clip": "zero"},
    "inputs": {"bits": 0, "range": [-1.0, 1.0], "bit_serial": False, "slice_bits": 1},
    "adc": {"bits": 0, "range": None, "per_input_slice": False},
}


def _contains(actual, documented):
    """The documented keys have the documented values (sections may add newer keys)."""
    if isinstance(documented, dict):
        return all(k in actual and _contains(actual[k], v) for k, v in documented.items())
    return actual == documented


def test_defaults_match_documented_schema():
    d = CrossbarConfig().to_dict()
    for section, fields in SCHEMA_DEFAULTS.items():
        for k, v in fields.items():
            assert _contains(d[section][k], v), (section, k)
    p = d["parasitics"]
    assert (p["topology"], p["r_row"], p["r_col"], p["interleaved"]) == ("none", 0.0, 0.0, False)
    s = d["ir_solver"]
    assert (s["tol"], s["max_iters"]) == (None, 1000)  # tol: jaxbar.core.ir.default_tol


def test_schema_dict_round_trip():
    assert CrossbarConfig.from_dict(SCHEMA_DEFAULTS) == CrossbarConfig()
    assert CrossbarConfig.from_dict({}) == CrossbarConfig()


def full_config():
    return CrossbarConfig.from_dict({
        "array": {"rows": 144, "cols": 64},
        "weights": {"bits": 8, "clip_percentile": 99.5},
        "mapping": {"scheme": "offset", "slices": 2, "offset_subtraction": "unit_column"},
        "device": {"on_off_ratio": 100, "cell_bits": 6,
                   "programming_error": {"model": "proportional", "sigma": 0.05},
                   "read_noise": {"model": "independent", "sigma": 0.01}, "clip": "range"},
        "inputs": {"bits": 8, "range": [0, 2.5], "bit_serial": True, "slice_bits": 2},
        "adc": {"bits": 6, "range": [[0, 10], [-1, 30.5]], "per_input_slice": True},
        "parasitics": {"topology": "input_source", "r_row": 1e-5, "r_col": 2e-5},
    })


def test_json_yaml_round_trips(tmp_path):
    cfg = full_config()
    assert CrossbarConfig.from_json(cfg.to_json()) == cfg
    assert CrossbarConfig.from_yaml(cfg.to_yaml()) == cfg
    for name in ("c.json", "c.yaml"):
        cfg.save(tmp_path / name)
        assert CrossbarConfig.load(str(tmp_path / name)) == cfg
    assert json.loads(cfg.to_json())["adc"]["range"] == [[0, 10], [-1, 30.5]]


def test_hashable_and_static_under_jit():
    cfg, same = full_config(), full_config()
    assert hash(cfg) == hash(same) and cfg == same
    f = jax.jit(lambda x, c: x * c.inputs.x_max, static_argnums=1)
    assert float(f(jnp.ones(()), cfg)) == 2.5
    assert f._cache_size() == 1
    f(jnp.ones(()), same)
    assert f._cache_size() == 1  # an equal config does not retrace


def test_replace_dotted_and_sections():
    cfg = CrossbarConfig.paper_baseline()
    c2 = cfg.replace(**{"adc.bits": 6, "device.programming_error.sigma": 0.1,
                        "device.programming_error.model": "independent"})
    assert c2.adc.bits == 6 and c2.device.programming_error.sigma == 0.1
    assert cfg.adc.bits == 8  # original untouched
    c3 = cfg.replace(mapping=jaxbar.MappingConfig(scheme="offset"))
    assert c3.mapping.scheme == "offset"
    with pytest.raises(ConfigError, match="adc.bitz"):
        cfg.replace(**{"adc.bitz": 3})
    with pytest.raises(ConfigError, match=r"adc\.bits"):
        cfg.replace(**{"adc.bits": -1})


def test_presets():
    base = CrossbarConfig.load("paper_baseline")
    assert base.mapping.scheme == "differential" and base.mapping.slices == 1
    assert (base.weights.bits, base.inputs.bits, base.adc.bits) == (8, 8, 8)
    assert (base.array.rows, base.array.cols) == (1152, 256)
    assert base.device.on_off_ratio == 100 and math.isclose(base.device.g_min, 0.01)
    assert CrossbarConfig.load("ideal") == CrossbarConfig()
    with pytest.raises(ConfigError, match="neither a preset"):
        CrossbarConfig.load("no_such_preset")


def test_ideal_converter_spellings():
    for v in (None, "ideal", 0):
        assert CrossbarConfig.from_dict({"adc": {"bits": v}}).adc.bits == 0


@pytest.mark.parametrize("patch, field", [
    ({"adc": {"bits": -1}}, "adc.bits"),
    ({"weights": {"bits": -2}}, "weights.bits"),
    ({"weights": {"bits": 1}}, "weights.bits"),
    ({"inputs": {"bits": -1}}, "inputs.bits"),
    ({"device": {"on_off_ratio": 1.0}}, "device.on_off_ratio"),
    ({"device": {"on_off_ratio": 0.5}}, "device.on_off_ratio"),
    ({"device": {"on_off_ratio": float("nan")}}, "device.on_off_ratio"),
    ({"weights": {"bits": 8}, "mapping": {"slices": 8}}, "mapping.slices"),
    ({"weights": {"bits": 8}, "mapping": {"slices": 9, "scheme": "offset"}}, "mapping.slices"),
    ({"weights": {"bits": 0}, "mapping": {"slices": 2}}, "mapping.slices"),
    ({"mapping": {"slices": 0}}, "mapping.slices"),
    ({"inputs": {"range": [-1, 2]}}, "inputs.range"),
    ({"inputs": {"range": [1, 2]}}, "inputs.range"),
    ({"inputs": {"range": [0, 0]}}, "inputs.range"),
    ({"inputs": {"range": [0, float("nan")]}}, "inputs.range"),
    ({"inputs": {"bit_serial": True}}, "inputs.bits"),
    ({"inputs": {"bits": 4, "bit_serial": True, "slice_bits": 4, "range": [-1, 1]}},
     "inputs.slice_bits"),
    ({"adc": {"bits": 8, "range": [2, 1]}}, "adc.range"),
    ({"adc": {"bits": 8, "range": [1, 1]}}, "adc.range"),
    ({"adc": {"bits": 8, "range": [0, float("nan")]}}, "adc.range"),
    ({"adc": {"bits": 8, "range": [[0, 1], [3, 2]]}, "weights": {"bits": 8},
      "mapping": {"slices": 2}}, r"adc.range\[1\]"),
    ({"adc": {"bits": 8, "range": [[0, 1], [0, 2], [0, 4]]}, "weights": {"bits": 8},
      "mapping": {"slices": 2}}, "adc.range"),
    ({"adc": {"bits": 8, "range": "biggest"}}, "adc.range"),
    ({"adc": {"bits": 8}}, "adc.range"),
    ({"adc": {"bits": 8, "range": "granular"}}, "adc.range"),
    ({"device": {"programming_error": {"model": "independent", "sigma": -0.1}}},
     "device.programming_error.sigma"),
    ({"device": {"read_noise": {"model": "independent", "sigma": float("nan")}}},
     "device.read_noise.sigma"),
    ({"device": {"programming_error": {"model": "gaussian", "sigma": 0.1}}},
     "device.programming_error.model"),
    ({"device": {"programming_error": {"model": "custom", "sigma": 0.1}}},
     "device.programming_error.fn"),
    ({"device": {"clip": "none"}}, "device.clip"),
    ({"device": {"cell_bits": 0}}, "device.cell_bits"),
    ({"mapping": {"scheme": "balanced"}}, "mapping.scheme"),
    ({"mapping": {"subtract": "both"}}, "mapping.subtract"),
    ({"mapping": {"offset_subtraction": "analog"}}, "mapping.offset_subtraction"),
    ({"array": {"rows": 0}}, "array.rows"),
    ({"array": {"cols": -4}}, "array.cols"),
    ({"weights": {"clip_percentile": 101}}, "weights.clip_percentile"),
    ({"weights": {"clip_percentile": float("nan")}}, "weights.clip_percentile"),
    ({"parasitics": {"topology": "mesh"}}, "parasitics.topology"),
    ({"parasitics": {"r_row": -1e-5}}, "parasitics.r_row"),
    ({"parasitics": {"r_col": float("nan")}}, "parasitics.r_col"),
    ({"parasitics": {"max_iters": 0}}, "parasitics.max_iters"),
    ({"parasitics": {"tol": 0}}, "parasitics.tol"),
    ({"parasitics": {"tol": "tight"}}, "parasitics.tol"),
    ({"parasitics": {"cpu_kernel": "yes"}}, "parasitics.cpu_kernel"),
    ({"parasitics": {"topology": "input_source", "interleaved": True},
      "mapping": {"subtract": "digital"}}, "parasitics.interleaved"),
    ({"parasitics": {"topology": "gated_source"}}, "parasitics.topology"),
])
def test_validation_errors_name_the_field(patch, field):
    with pytest.raises(ConfigError, match=field):
        CrossbarConfig.from_dict(patch)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown config key 'adcs'"):
        CrossbarConfig.from_dict({"adcs": {}})
    with pytest.raises(ConfigError, match="adc.levels"):
        CrossbarConfig.from_dict({"adc": {"levels": 3}})
    with pytest.raises(ConfigError, match="device.read_noise.mu"):
        CrossbarConfig.from_dict({"device": {"read_noise": {"mu": 1}}})


def test_corrupt_text_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid JSON"):
        CrossbarConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="invalid YAML"):
        CrossbarConfig.from_yaml("a: [1, 2")


def test_slice_bits_rule():
    def b(bits, slices, scheme):
        d = {"weights": {"bits": bits}, "mapping": {"slices": slices, "scheme": scheme}}
        return CrossbarConfig.from_dict(d).slice_bits
    assert b(8, 2, "differential") == 4 and b(8, 4, "offset") == 2
    assert b(8, 3, "differential") == 3  # ceil(7/3)
    assert b(8, 3, "offset") == 3  # ceil(8/3)
    assert b(7, 2, "offset") == 4 and b(7, 2, "differential") == 3


def test_custom_function_not_serializable():
    def sigma(g):
        return 0.01 + 0.05 * g
    cfg = CrossbarConfig().replace(**{"device.programming_error":
                                      {"model": "custom", "sigma": 0.0, "fn": sigma}})
    assert cfg.device.programming_error.fn is sigma
    with pytest.raises(ConfigError, match="cannot be serialized"):
        cfg.to_json()


# ---- solver settings: their own section, also read under their parasitics. keys ----------

SOLVER_DEFAULTS = {"tol": None, "max_iters": 1000, "on_nonconvergence": "error",
                   "batch_chunk": None, "precompute": True, "cpu_kernel": True}


def test_solver_settings_are_a_section_of_their_own_with_unchanged_defaults():
    d = CrossbarConfig().to_dict()
    assert d["ir_solver"] == SOLVER_DEFAULTS
    assert set(d["parasitics"]) == {"topology", "r_row", "r_col", "interleaved", "r_driver",
                                    "r_integrator"}
    assert set(SOLVER_KEYS) == set(SOLVER_DEFAULTS)


@pytest.mark.parametrize("old, new", [
    ({"tol": 1e-4, "on_nonconvergence": "warn"}, {"tol": 1e-4, "on_nonconvergence": "warn"}),
    ({"max_iters": 7, "batch_chunk": 3, "precompute": False, "cpu_kernel": False},
     {"max_iters": 7, "batch_chunk": 3, "precompute": False, "cpu_kernel": False}),
])
def test_old_solver_keys_are_read(old, new):
    want = CrossbarConfig(parasitics=ParasiticsConfig(topology="input_source", r_row=1e-5),
                          ir_solver=IRSolverConfig(**new))
    physics = {"topology": "input_source", "r_row": 1e-5}
    assert CrossbarConfig.from_dict({"parasitics": {**physics, **old}}) == want
    assert CrossbarConfig.from_dict({"parasitics": physics, "ir_solver": new}) == want
    # The same setting in both places with the same value is no conflict.
    assert CrossbarConfig.from_dict({"parasitics": {**physics, **old}, "ir_solver": new}) == want
    text = yaml.safe_dump({"parasitics": {**physics, **old}})
    assert CrossbarConfig.from_yaml(text) == want
    dotted = {f"parasitics.{k}": v for k, v in {**physics, **old}.items()}
    assert CrossbarConfig().replace(**dotted) == want
    assert CrossbarConfig().replace(parasitics={**physics, **old}) == want
    assert CrossbarConfig().replace(**{f"ir_solver.{k}": v for k, v in new.items()},
                                    parasitics=physics) == want
    # Network configs: `--set`-style changes and per-layer overrides.
    net = NetworkConfig().replace(**dotted)
    assert net.crossbar == want
    layered = NetworkConfig.from_dict({"crossbar": {"parasitics": physics},
                                       "layers": {"conv*": {"parasitics": old}}})
    assert layered.crossbar_for("conv1") == want
    assert layered.crossbar_for("dense") == want.replace(ir_solver=IRSolverConfig())


def test_solver_key_given_twice_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"parasitics\.tol = 0\.0001 and ir_solver\.tol = "
                                          r"0\.001"):
        CrossbarConfig.from_dict({"parasitics": {"tol": 1e-4}, "ir_solver": {"tol": 1e-3}})
    with pytest.raises(ConfigError, match=r"parasitics\.max_iters = 5 and ir_solver\.max_iters"):
        CrossbarConfig().replace(**{"parasitics.max_iters": 5, "ir_solver.max_iters": 6})
    with pytest.raises(ConfigError, match=r"parasitics\.cpu_kernel .* ir_solver\.cpu_kernel"):
        NetworkConfig.from_dict({"layers": {"*": {"parasitics": {"cpu_kernel": False},
                                                  "ir_solver": {"cpu_kernel": True}}}})


@pytest.mark.parametrize("patch, field", [
    ({"ir_solver": {"max_iters": 0}}, "ir_solver.max_iters"),
    ({"ir_solver": {"tol": 1.5}}, "ir_solver.tol"),
    ({"ir_solver": {"on_nonconvergence": "shout"}}, "ir_solver.on_nonconvergence"),
    ({"ir_solver": {"batch_chunk": 0}}, "ir_solver.batch_chunk"),
    ({"ir_solver": {"precompute": "no"}}, "ir_solver.precompute"),
    ({"ir_solver": {"r_row": 1e-5}}, "unknown config key 'ir_solver.r_row'"),
])
def test_solver_validation_errors_name_the_field(patch, field):
    with pytest.raises(ConfigError, match=field):
        CrossbarConfig.from_dict(patch)
