"""config.compilation_cache: a training run leaves its compiled steps in the
cache folder (so the next process loads them), per host CPU, and '' turns it off."""

import jax
import pytest
from tiny_runs import run_tiny

from ftlib import compile_cache


@pytest.fixture
def restore_jax_cache():
    yield
    compile_cache.enable("")  # the rest of the suite compiles without it, as before
    jax.config.update("jax_compilation_cache_max_size", -1)


def test_run_writes_its_compiled_steps_to_the_cache(tmp_path, restore_jax_cache, monkeypatch):
    monkeypatch.setenv("FTLIB_CACHE", str(tmp_path / "cache"))
    folder = compile_cache.enable("auto")
    assert folder == tmp_path / "cache" / "xla" / compile_cache.host_key()
    assert compile_cache.enable("") is None
    run_tiny(tmp_path / "run", max_steps=2)  # configs/tiny.py: compilation_cache 'auto'
    names = [p.name for p in folder.iterdir()]
    assert any(n.startswith("jit_train_step-") for n in names), names
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES
