"""config.compilation_cache: compiled functions land in the chosen folder (the
ftlib cache's per-host folder for 'auto', unless the user gave JAX one), and ''
turns the cache off. The CLI test in test_trainer.py checks that a training run
leaves its train step there."""

import jax
import jax.numpy as jnp
import pytest

from ftlib import compile_cache


@pytest.fixture
def restore_jax_cache():
    # JAX stores only compiles slower than this (1 s by default); these are tiny.
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    compile_cache.enable("")  # the rest of the suite compiles as it did before
    jax.config.update("jax_compilation_cache_max_size", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


def scaled_sin(x):
    return jnp.sin(x) * 3


def _compile_something(n):
    jax.jit(scaled_sin).lower(jax.ShapeDtypeStruct((n,), jnp.float32)).compile()


def _entries(folder):
    return sorted(p.name for p in folder.glob("jit_scaled_sin-*-cache"))


def test_folders_and_off(tmp_path, restore_jax_cache, monkeypatch):
    monkeypatch.setenv("FTLIB_CACHE", str(tmp_path / "ftlib"))
    mine = compile_cache.enable(str(tmp_path / "mine"))
    _compile_something(3)
    assert len(_entries(mine)) == 1
    # 'auto' after ftlib chose a folder: ftlib's per-host folder, not the last one.
    auto = compile_cache.enable("auto")
    assert auto == tmp_path / "ftlib" / "xla" / compile_cache.host_key()
    _compile_something(4)
    assert len(_entries(auto)) == 1
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES
    # A folder the user gave JAX is kept by 'auto'.
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    assert compile_cache.enable("auto") == tmp_path / "users"
    assert compile_cache.enable("") is None
    _compile_something(5)
    assert len(_entries(mine)) == 1 and len(_entries(auto)) == 1
