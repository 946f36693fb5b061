"""Giraffe RoPE types: the bases against the paper's formulas, registration in transformers (no warning,
save/load), ``apply_patches(model, rope=...)`` equal to building from the config and exactly undone, bad input,
and composition with LM-Infinite."""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import modeling_rope_utils as mru

import longkit
from longkit import ConfigError, HostVersionError, LMInfiniteConfig, RopeConfig
from longkit.hf_patches import get_patches
from longkit.hf_patches.rope import (
    compute_giraffe_power_parameters,
    compute_giraffe_truncated_parameters,
    power_basis,
    register,
    standard_inv_freq,
    truncated_basis,
)
from longkit.hf_patches.rope import hf as rope_hf
from tests.utils import TINY, tiny_model

ROOT = Path(__file__).resolve().parents[2]
MODEL_TYPES = ["llama", "qwen2", "qwen3", "mistral"]
GIRAFFE = {
    "giraffe_power": {"power": 0.7},
    "giraffe_truncated": {"a": 0.01, "b": 0.12, "rho": 0.004},
}


# --------------------------------------------------------------------------- the formulas
def _paper_power(d: int, base: float, k: float, factor: float = 1.0) -> list[float]:
    """θ_i' = θ_i (1 - 2i/d)^k, θ_i = base^(-2i/d) / factor, written per element in float64."""
    return [base ** (-2 * i / d) / factor * (1 - 2 * i / d) ** k for i in range(d // 2)]


def _paper_truncated(d: int, base: float, a: float, b: float, rho: float) -> list[float]:
    out = []
    for i in range(d // 2):
        t = base ** (-2 * i / d)
        out.append(t if t >= b else (rho if t > a else 0.0))
    return out


@pytest.mark.parametrize("d", [8, 16, 64, 128])
@pytest.mark.parametrize("k", [0.25, 0.5, 1.0, 2.0])
def test_power_basis_matches_the_paper(d, k):
    base = float(torch.empty(()).uniform_(1e3, 1e6))
    got = power_basis(standard_inv_freq(d, base), k).double()
    torch.testing.assert_close(got, torch.tensor(_paper_power(d, base, k), dtype=torch.float64), rtol=1e-5,
                               atol=0.0)
    assert got[0] == standard_inv_freq(d, base)[0]  # the fastest frequency is unchanged
    ratio = got / standard_inv_freq(d, base).double()
    assert torch.all(ratio[1:] < ratio[:-1])  # slower frequencies shrink more


@pytest.mark.parametrize("d", [16, 64, 128])
def test_truncated_basis_matches_the_paper(d):
    base = 10000.0
    f = standard_inv_freq(d, base)
    # thresholds strictly between frequencies (float32 vs float64 cannot disagree about a comparison)
    # 1 <= lo < hi <= d/2 - 2, so f[lo - 1] and f[hi + 1] both exist
    lo = int(torch.randint(1, d // 2 - 2, ()))
    hi = int(torch.randint(lo + 1, d // 2 - 1, ()))
    a, b = math.sqrt(f[hi] * f[hi + 1]), math.sqrt(f[lo - 1] * f[lo])
    rho = a / 2
    got = truncated_basis(f, a, b, rho)
    torch.testing.assert_close(got.double(), torch.tensor(_paper_truncated(d, base, a, b, rho), dtype=torch.float64),
                               rtol=1e-6, atol=0.0)
    assert torch.equal(got[:lo], f[:lo]) and torch.all(got[lo:hi + 1] == torch.tensor(rho, dtype=torch.float32))
    assert torch.all(got[hi + 1:] == 0)


def test_truncated_basis_boundaries():
    f = torch.tensor([1.0, 0.5, 0.25, 0.125])
    # f == b is kept, f == a stops rotating (θ ≥ b kept; a < θ < b -> ρ; θ ≤ a -> 0)
    assert truncated_basis(f, 0.125, 0.5, 0.0625).tolist() == [1.0, 0.5, 0.0625, 0.0]


def _cfg(rope_parameters: dict | None = None, model_type: str = "llama", **overrides):
    from tests.utils import _CONFIGS

    name, _, extra = _CONFIGS[model_type]
    kw = {**TINY, **extra, **overrides}
    if rope_parameters is not None:
        kw["rope_parameters"] = {"rope_theta": 10000.0, **rope_parameters}
    return getattr(transformers, name)(**kw)


def test_identity_settings_equal_the_default_basis():
    register()
    cfg = _cfg()
    default, _ = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    power, s1 = compute_giraffe_power_parameters(_cfg({"rope_type": "giraffe_power", "power": 0.0}))
    trunc, s2 = compute_giraffe_truncated_parameters(_cfg({"rope_type": "giraffe_truncated", "a": 0, "b": 0,
                                                          "rho": 0}))
    assert torch.equal(power, default) and torch.equal(trunc, default) and s1 == s2 == 1.0


def test_factor_is_linear_scaling_first():
    register()
    params = {"rope_type": "giraffe_power", "power": 0.5, "factor": 4.0}
    inv, _ = compute_giraffe_power_parameters(_cfg(params))
    torch.testing.assert_close(inv.double(), torch.tensor(_paper_power(16, 10000.0, 0.5, 4.0), dtype=torch.float64),
                               rtol=1e-6, atol=0.0)


def test_partial_rotary_factor_uses_the_rotary_dim():
    register()
    inv, _ = compute_giraffe_power_parameters(
        _cfg({"rope_type": "giraffe_power", "power": 1.0, "partial_rotary_factor": 0.5}))
    torch.testing.assert_close(inv.double(), torch.tensor(_paper_power(8, 10000.0, 1.0), dtype=torch.float64),
                               rtol=1e-6, atol=0.0)


# --------------------------------------------------------------------------- transformers integration
@contextlib.contextmanager
def _transformers_warnings():
    """Collect transformers' warnings (the test session runs at verbosity 'error')."""
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler, root = _Keep(), logging.getLogger("transformers")
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        transformers.logging.set_verbosity(before)


def test_warning_capture_sees_an_unregistered_type():
    """The no-warning check below can fail: an unknown rope_type is reported through the same channel."""
    with _transformers_warnings() as warned:
        _cfg({"rope_type": "longkit_not_a_type"})
    assert any("longkit_not_a_type" in w for w in warned)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("rope_type", list(GIRAFFE))
def test_model_built_from_config_gets_the_basis_without_warning(model_type, rope_type):
    longkit.register_rope_types()
    with _transformers_warnings() as warned:
        model = tiny_model(model_type, rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0,
                                                        **GIRAFFE[rope_type]})
    assert not [w for w in warned if "rope" in w.lower()], warned
    d = model.config.head_dim if getattr(model.config, "head_dim", None) else TINY["hidden_size"] // 4
    p = GIRAFFE[rope_type]
    want = (_paper_power(d, 10000.0, p["power"]) if rope_type == "giraffe_power"
            else _paper_truncated(d, 10000.0, p["a"], p["b"], p["rho"]))
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0.0)
    assert torch.equal(rotary.original_inv_freq, rotary.inv_freq) and rotary.attention_scaling == 1.0


def _ids(n: int = 2, t: int = 40) -> torch.Tensor:
    return torch.randint(1, TINY["vocab_size"], (n, t))


def _same_weights(model_type: str, rope: RopeConfig):
    """An unpatched model and one built from ``rope``'s config, with the same weights."""
    longkit.register_rope_types()
    plain = tiny_model(model_type)
    params = {"rope_theta": plain.config.rope_parameters["rope_theta"],
              **rope.rope_parameters(plain.config.max_position_embeddings)}
    built = tiny_model(model_type, rope_parameters=params)
    built.load_state_dict(plain.state_dict())
    return plain, built


ROPES = [
    RopeConfig("giraffe_power"),
    RopeConfig("giraffe_power", power=1.5, factor=2.0),
    RopeConfig("giraffe_truncated"),
    RopeConfig("giraffe_truncated", a=0.02, b=0.2, rho=0.01),
    RopeConfig("linear", factor=4.0),
    RopeConfig("yarn", factor=4.0),
]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("rope", ROPES, ids=lambda r: f"{r.rope_type}")
def test_apply_patches_equals_building_from_the_config_and_undoes_exactly(model_type, rope):
    plain, built = _same_weights(model_type, rope)
    ids = _ids()
    rotary = plain.model.rotary_emb
    before = {k: v.clone() for k, v in (("inv", rotary.inv_freq), ("orig", rotary.original_inv_freq))}
    params_before, scaling_before = dict(plain.config.rope_parameters), rotary.attention_scaling
    with torch.no_grad():
        base, want = plain(ids).logits, built(ids).logits
        longkit.apply_patches(plain, rope=rope)
        got = plain(ids).logits
    assert get_patches(plain).undo["rope"]["touched"] == 1
    assert plain.config.rope_parameters == built.config.rope_parameters
    assert torch.equal(rotary.inv_freq, built.model.rotary_emb.inv_freq)
    assert rotary.attention_scaling == built.model.rotary_emb.attention_scaling
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    longkit.remove_patches(plain)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, base)
    assert plain.config.rope_parameters == params_before and rotary.attention_scaling == scaling_before
    assert torch.equal(rotary.inv_freq, before["inv"]) and torch.equal(rotary.original_inv_freq, before["orig"])
    assert rotary.rope_type == "default"


def test_apply_patches_is_idempotent_and_replaces_a_different_rope():
    first, second = RopeConfig("giraffe_power", power=0.3), RopeConfig("giraffe_truncated")
    plain, built = _same_weights("llama", second)
    ids = _ids()
    with torch.no_grad():
        base = plain(ids).logits
        longkit.apply_patches(plain, rope=first)
        longkit.apply_patches(plain, rope=first)
        assert len(get_patches(plain).undo) == 1
        longkit.apply_patches(plain, rope=second)
        torch.testing.assert_close(plain(ids).logits, built(ids).logits, rtol=0, atol=0)
        longkit.remove_patches(plain)
        assert torch.equal(plain(ids).logits, base)
    assert plain.config.rope_parameters["rope_type"] == "default"


def test_apply_patches_accepts_true_and_a_dict():
    model = tiny_model()
    longkit.apply_patches(model, rope=True)
    assert model.config.rope_parameters["rope_type"] == "giraffe_power"
    assert model.config.rope_parameters["power"] == 0.5
    longkit.apply_patches(model, rope={"rope_type": "giraffe_truncated", "a": 0.0, "b": 0.5, "rho": 0.0})
    assert model.config.rope_parameters["b"] == 0.5
    longkit.remove_patches(model)
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}


@pytest.mark.parametrize("rope_type", list(GIRAFFE))
def test_save_pretrained_from_pretrained_round_trip(tmp_path, rope_type):
    model = tiny_model()
    longkit.apply_patches(model, rope=RopeConfig(rope_type))
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    with _transformers_warnings() as warned:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert not [w for w in warned if "rope" in w.lower()], warned
    assert loaded.config.rope_parameters == model.config.rope_parameters
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)


def test_a_fresh_process_loads_a_saved_giraffe_model_after_register_rope_types(tmp_path):
    model = tiny_model()
    longkit.apply_patches(model, rope=RopeConfig("giraffe_truncated"))
    model.save_pretrained(tmp_path)
    code = ("import sys, transformers, longkit\n"
            "try:\n"
            "    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "    print('loaded-unregistered')\n"
            "except Exception as e:\n"
            "    print('refused-unregistered', type(e).__name__)\n"
            "longkit.register_rope_types()\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "print('loaded', m.model.rotary_emb.rope_type, int((m.model.rotary_emb.inv_freq == 0).sum()))\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "refused-unregistered" in res.stdout  # transformers alone does not know the type
    zeros = int((model.model.rotary_emb.inv_freq == 0).sum())
    assert f"loaded giraffe_truncated {zeros}" in res.stdout and zeros > 0


# --------------------------------------------------------------------------- registration
def test_register_is_idempotent_and_adds_validators():
    register()
    register()
    for rope_type in ("giraffe_power", "giraffe_truncated"):
        assert mru.ROPE_INIT_FUNCTIONS[rope_type] is rope_hf.INIT_FUNCTIONS[rope_type]
        assert hasattr(mru.RotaryEmbeddingConfigMixin, f"_validate_{rope_type}_rope_parameters")
    assert rope_hf.is_registered()


def test_register_refuses_to_replace_someone_elses_type(monkeypatch):
    monkeypatch.setitem(mru.ROPE_INIT_FUNCTIONS, "giraffe_power", lambda config, **kw: (None, 1.0))
    with pytest.raises(HostVersionError, match="already registered"):
        register()


def test_register_fails_loudly_without_the_hooks(monkeypatch):
    monkeypatch.delattr(mru, "ROPE_INIT_FUNCTIONS")
    with pytest.raises(HostVersionError, match="ROPE_INIT_FUNCTIONS"):
        register()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"rope_type": "giraffe"}, "RopeConfig.rope_type must be one of"),
    ({"rope_type": "giraffe_power", "power": -0.5}, "RopeConfig.power must be a number >= 0.0"),
    ({"rope_type": "giraffe_power", "power": "0.5"}, "convert the string first"),
    ({"rope_type": "giraffe_power", "power": True}, "a bool is not a number"),
    ({"rope_type": "giraffe_power", "a": 0.1}, "RopeConfig.a is not an option of rope_type='giraffe_power'"),
    ({"rope_type": "giraffe_truncated", "power": 1.0}, "RopeConfig.power is not an option"),
    ({"rope_type": "giraffe_truncated", "a": 0.5, "b": 0.1}, "needs a <= b"),
    ({"rope_type": "giraffe_truncated", "rho": -1.0}, "RopeConfig.rho must be a number >= 0.0"),
    ({"rope_type": "giraffe_truncated", "b": float("nan")}, "NaN and infinities"),
    ({"rope_type": "giraffe_power", "factor": 0.5}, "RopeConfig.factor must be a number >= 1.0"),
    ({"rope_type": "linear"}, "needs a factor"),
    ({"rope_type": "yarn", "factor": 2.0, "power": 1.0}, "RopeConfig.power is not an option"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}, "must be an int >= 1"),
])
def test_bad_rope_config_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RopeConfig(**kwargs)


def test_an_explicit_a_above_the_default_b_is_refused_at_apply_time():
    cfg = RopeConfig("giraffe_truncated", a=1.0)  # b defaults to 2π/48 ≈ 0.13 on the model
    model = tiny_model()
    with pytest.raises(ConfigError, match="needs a <= b"):
        longkit.apply_patches(model, rope=cfg)
    assert model.config.rope_parameters["rope_type"] == "default" and get_patches(model) is None


@pytest.mark.parametrize("params, message", [
    ({"rope_type": "giraffe_power", "power": -1}, "power must be a number >= 0.0"),
    ({"rope_type": "giraffe_power"}, r"needs the key\(s\) \['power'\]"),
    ({"rope_type": "giraffe_truncated", "a": 0.1, "b": 0.2}, r"needs the key\(s\) \['rho'\]"),
    ({"rope_type": "giraffe_truncated", "a": 0.3, "b": 0.2, "rho": 0.0}, "needs a <= b"),
])
def test_bad_rope_parameters_in_a_config_raise_config_error(params, message):
    register()
    with pytest.raises(Exception, match=message) as info:  # transformers wraps its validators' errors
        _cfg(params)
    err = info.value
    while not isinstance(err, ConfigError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, ConfigError) or "ConfigError" in str(info.value)


def test_init_function_checks_parameters_set_after_construction():
    register()
    cfg = _cfg({"rope_type": "giraffe_power", "power": 1.0})
    cfg.rope_parameters = {"rope_type": "giraffe_power", "rope_theta": 1e4, "power": float("inf")}
    with pytest.raises(ConfigError, match="NaN and infinities"):
        compute_giraffe_power_parameters(cfg)


def test_rope_refuses_unsupported_models():
    model = tiny_model()
    model.config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(longkit.UnsupportedModelError, match="flat config.rope_parameters"):
        longkit.apply_patches(model, rope=True)


# --------------------------------------------------------------------------- with LM-Infinite
@pytest.mark.parametrize("rope_type", list(GIRAFFE))
@pytest.mark.parametrize("order", ["rope_first", "lm_infinite_first"])
def test_lm_infinite_accepts_giraffe_types(rope_type, order):
    rope = RopeConfig(rope_type)
    plain, built = _same_weights("llama", rope)
    ids = _ids(t=30)  # shorter than n_local: Λ attention equals full attention
    lminf = LMInfiniteConfig(n_global=2, n_local=32)
    with torch.no_grad():
        base, want = plain(ids).logits, built(ids).logits
        features = {"rope": rope, "lm_infinite": lminf}
        if order == "lm_infinite_first":
            features = {"lm_infinite": lminf, "rope": rope}
        longkit.apply_patches(plain, **features)
        torch.testing.assert_close(plain(ids).logits, want, rtol=1e-5, atol=1e-5)
        longkit.apply_patches(built, lm_infinite=lminf)  # a model built with the giraffe config
        torch.testing.assert_close(built(ids).logits, want, rtol=1e-5, atol=1e-5)
        longkit.remove_patches(plain)
        assert torch.equal(plain(ids).logits, base)


# --------------------------------------------------------------------------- the recipe
def test_recipe_runs_at_toy_size():
    res = subprocess.run([sys.executable, "recipes/long_context_rope.py", "--rope-type", "giraffe_truncated",
                          "--steps", "2", "--seq-len", "96", "--train-len", "48"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "perplexity before" in res.stdout and "perplexity after" in res.stdout


def test_recipe_help():
    res = subprocess.run([sys.executable, "recipes/long_context_rope.py", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "--rope-type" in res.stdout and "giraffe_power" in res.stdout
