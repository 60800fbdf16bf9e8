"""The executable cache: a hit runs the same program, every change misses, bad files are ignored.

Tiny jitted functions, compiled in this process; one test runs the train loop of the tiny
config twice to see its programs come back from the cache.
"""

import dataclasses
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from ddpm_jax.experiment import ExperimentConfig, programs
from ddpm_jax.runtime import cache_files, executables, program_keys
from ddpm_jax.runtime.startup import StartupTimer, TimedFirst

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _f(x, w):
    return jnp.tanh(x @ w).T + jnp.sum(x, axis=0)


def _args(n=8):
    x = jnp.arange(n * n, dtype=jnp.float32).reshape(n, n) / (n * n)
    return x, jnp.eye(n, dtype=jnp.float32) * 0.5


def _cached(directory, key=None, env=None, name="f"):
    cache = executables.ExecutableCache(str(directory), env=env)
    fn = executables.CachedJit(jax.jit(_f), name, {"k": 1} if key is None else key, cache)
    return fn, cache


def _source(fn):
    (source,) = fn.sources.values()
    return source


def _only_entry(directory):
    (name,) = [n for n in os.listdir(directory) if n.endswith(executables.SUFFIX)]
    return os.path.join(directory, name)


def test_a_saved_executable_is_loaded_and_computes_the_same(tmp_path):
    args = _args()
    first, cache = _cached(tmp_path)
    expected = np.asarray(first(*args))
    cache.wait()
    assert _source(first) == "compiled"
    second, _ = _cached(tmp_path)
    np.testing.assert_array_equal(np.asarray(second(*args)), expected)
    assert _source(second) == "cache"
    # Later calls reuse the loaded executable; a prefetched entry is the same hit.
    np.testing.assert_array_equal(np.asarray(second(*args)), expected)
    third, cache3 = _cached(tmp_path)
    cache3.prefetch("f", {"k": 1})
    np.testing.assert_array_equal(np.asarray(third(*args)), expected)
    assert _source(third) == "cache"
    assert third.timer.programs["f"]["source"] == "cache"


@pytest.mark.parametrize("change", ["key", "shape", "dtype", "jax_version", "jaxlib_version",
                                    "device_kind", "xla_flags", "source", "name"])  # fmt: skip
def test_any_change_of_the_program_misses(tmp_path, change):
    args = _args()
    fn, cache = _cached(tmp_path)
    fn(*args)
    cache.wait()
    env = executables.ExecutableCache(str(tmp_path)).env
    key, name = {"k": 1}, "f"
    if change == "key":  # e.g. a config field of the program
        key = {"k": 2}
    elif change == "shape":
        args = _args(16)
    elif change == "dtype":
        args = tuple(a.astype(jnp.bfloat16) for a in args)
    elif change == "jax_version":
        env = {**env, "versions": {**env["versions"], "jax": "0.0.1"}}
    elif change == "jaxlib_version":
        env = {**env, "versions": {**env["versions"], "jaxlib": "0.0.1"}}
    elif change == "device_kind":
        env = {**env, "devices": [[i, "TPU v9", p] for i, _, p in env["devices"]]}
    elif change == "xla_flags":
        env = {**env, "xla_flags": env["xla_flags"] + " --xla_cpu_use_onednn=true"}
    elif change == "source":
        env = {**env, "source": "0" * 64}
    else:
        name = "g"
    other, _ = _cached(tmp_path, key=key, env=env, name=name)
    out = other(*args)
    assert _source(other) == "compiled"
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(_f)(*args)), rtol=1e-6)


def test_the_environment_names_versions_devices_flags_and_source():
    env = program_keys.environment()
    assert set(env["versions"]) >= {"jax", "jaxlib", "flax", "optax", "numpy"}
    assert env["versions"]["jax"] == jax.__version__
    assert env["backend"] == jax.default_backend()
    assert len(env["devices"]) == jax.device_count()
    assert env["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert re.fullmatch(r"[0-9a-f]{64}", env["source"])
    assert "jax_enable_x64" in env["jax_options"]
    assert "jax_compilation_cache_dir" not in env["jax_options"]
    json.dumps(env)  # the key is JSON.


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "other_entry"])
def test_a_damaged_or_foreign_file_is_ignored_then_rewritten(tmp_path, damage, caplog):
    args = _args()
    fn, cache = _cached(tmp_path)
    expected = np.asarray(fn(*args))
    cache.wait()
    path = _only_entry(tmp_path)
    data = open(path, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
    elif damage == "garbage":
        data = os.urandom(len(data))
    elif damage == "empty":
        data = b""
    else:  # a whole, valid entry of another program, under this program's file name.
        other_fn, other_cache = _cached(tmp_path / "other", key={"k": 3})
        other_fn(*args)
        other_cache.wait()
        data = open(_only_entry(tmp_path / "other"), "rb").read()
    open(path, "wb").write(data)
    again, cache2 = _cached(tmp_path)
    with caplog.at_level(logging.WARNING):
        out = again(*args)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert _source(again) == "compiled"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "ignoring" in warning and "\n" not in warning  # one line
    cache2.wait()  # the good executable replaced the bad file.
    third, _ = _cached(tmp_path)
    np.testing.assert_array_equal(np.asarray(third(*args)), expected)
    assert _source(third) == "cache"


def test_an_executable_loaded_from_jax_s_cache_is_compiled_afresh_before_it_is_saved(tmp_path):
    """jaxlib 0.10 serializes an executable that its persistent cache loaded without some of
    its kernels; only fresh compilations may be saved."""
    args = _args(24)
    jax.jit(_f).trace(*args).lower().compile()  # in JAX's persistent cache (conftest's).
    with executables.PersistentCacheHits() as hits:
        jax.jit(_f).trace(*args).lower().compile()
    if not hits.hit:
        pytest.skip("JAX's persistent compilation cache is off or did not keep the program.")
    fn, cache = _cached(tmp_path)
    expected = np.asarray(fn(*args))
    assert fn.timer.programs["f"]["persistent_cache_hit"] is True
    cache.wait()
    again, _ = _cached(tmp_path)
    np.testing.assert_array_equal(np.asarray(again(*args)), expected)
    assert _source(again) == "cache"


def test_without_a_cache_nothing_is_written_and_the_function_is_unchanged(tmp_path):
    jitted = jax.jit(_f)
    assert executables.cached_jit(jitted, "f", {}, None) is jitted
    timed = executables.cached_jit(jitted, "f", {}, None, StartupTimer())
    np.testing.assert_array_equal(np.asarray(timed(*_args())), np.asarray(jitted(*_args())))
    assert set(timed.timer.phases) == {"trace", "lower", "compile", "run"}
    assert executables.resolve(None) is None
    with pytest.raises(ValueError, match="executable_cache"):
        executables.resolve("sometimes")


def test_the_cache_follows_jax_s_compilation_cache(monkeypatch, tmp_path):
    from ddpm_jax.runtime import compilation_cache

    monkeypatch.setattr(compilation_cache, "current_dir", lambda: None)
    assert executables.ExecutableCache.default() is None
    monkeypatch.setattr(compilation_cache, "current_dir", lambda: "gs://bucket/cache")
    assert executables.ExecutableCache.default() is None
    monkeypatch.setattr(compilation_cache, "current_dir", lambda: str(tmp_path))
    cache = executables.ExecutableCache.default()
    assert cache.directory == os.path.join(str(tmp_path), executables.SUBDIR)
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # multi-process: off.
    assert executables.ExecutableCache.default() is None


def test_pruning_keeps_the_most_recently_used_entries(tmp_path):
    cache = executables.ExecutableCache(str(tmp_path), env={"e": 1})
    for i, size in enumerate((300, 300, 300)):
        path = tmp_path / f"p{i}{executables.SUFFIX}"
        path.write_bytes(b"x" * size)
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "stale.tmp").write_bytes(b"x")
    os.utime(tmp_path / "stale.tmp", (1, 1))
    cache.prune(max_bytes=650)
    assert sorted(os.listdir(tmp_path)) == [f"p1{executables.SUFFIX}", f"p2{executables.SUFFIX}"]


def test_cached_shapes_equal_eval_shape_and_ignore_bad_files(tmp_path):
    cache = executables.ExecutableCache(str(tmp_path))

    def init(key):
        return {"w": jax.random.normal(key, (3, 5)), "n": jnp.zeros((), jnp.int32)}

    key = jax.random.PRNGKey(0)
    expected = jax.eval_shape(init, key)
    shapes = executables.cached_eval_shape(cache, "shapes", {"k": 1})
    assert shapes(init, key) == expected  # traced, then written
    assert shapes(lambda k: 1 / 0, key) == expected  # read back: nothing traced
    path = _only_entry(tmp_path)
    open(path, "wb").write(b"broken")
    assert shapes(init, key) == expected  # ignored, traced again
    other = executables.cached_eval_shape(cache, "shapes", {"k": 2})
    assert other(lambda k: {"w": jnp.zeros(2)}, key) == {"w": jax.ShapeDtypeStruct((2,), "f")}
    assert executables.cached_eval_shape(None, "shapes", {}) is jax.eval_shape


def test_the_config_key_leaves_out_only_what_the_host_loop_reads():
    cfg = ExperimentConfig.from_config(tiny.get_config())
    base = programs.config_key(cfg)
    json.dumps(base)
    for field in ("num_train_steps", "log_every_steps", "checkpoint_every_steps"):
        changed = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **{
            field: getattr(cfg.training, field) + 1}))  # fmt: skip
        assert programs.config_key(changed) == base, field
    for group, field, value in (("training", "seed", 7), ("optim", "learning_rate", 0.5),
                                ("training", "batch_size", 16), ("sampling", "num_steps", 3),
                                ("diffusion", "num_timesteps", 50)):  # fmt: skip
        view = dataclasses.replace(getattr(cfg, group), **{field: value})
        assert programs.config_key(dataclasses.replace(cfg, **{group: view})) != base, field


def test_no_traced_module_reads_a_host_only_field():
    """The host-only fields are left out of the keys: a module that builds compiled programs
    must not read them (else a changed value would run a stale program)."""
    traced = ["train/step.py", "train/state.py", "train/timestep_proposal.py",
              "experiment/build.py", "experiment/chain_program.py", "losses.py",
              "sampling.py", "diffusion.py", "schedules.py", "timesteps.py", "solvers.py",
              "likelihood/bound.py", "posthoc_ema.py"]  # fmt: skip
    traced += [f"models/{n}" for n in os.listdir(os.path.join(REPO, "ddpm_jax", "models"))
               if n.endswith(".py")]  # fmt: skip
    for rel in traced:
        text = open(os.path.join(REPO, "ddpm_jax", rel)).read()
        for field in programs.HOST_ONLY_FIELDS:
            group, name = field.split(".")
            # (a flag named in an error message is not a read)
            assert not re.search(rf"(?<!--config\.{group})\.{name}\b", text), f"{rel}: {field}"


def test_the_startup_timer_adds_phases_snapshots_events_and_writes_json(tmp_path):
    path = str(tmp_path / "t.json")
    timer = StartupTimer(path)
    with timer.phase("restore"):
        with timer.phase("restore"):  # nested: counted once
            pass
    timer.call("trace", sum, [1, 2])
    timer.call("trace", sum, [3])
    timer.event("first_row")
    with timer.phase("run"):
        pass
    timer.event("first_row")  # the first time only
    timer.program("f", source="cache", run_s=0.5)
    timer.program("f", run_s=0.25)
    batches = TimedFirst(iter([1, 2]), timer, "data")
    assert list(batches) == [1, 2]
    timer.write()
    data = json.load(open(path))
    assert set(data["phases"]) == {"restore", "trace", "run", "data"}
    assert set(data["snapshots"]["first_row"]) == {"restore", "trace"}
    assert data["programs"]["f"] == {"source": "cache", "run_s": 0.75}
    assert all(v["wall_s"] >= 0 and v["cpu_s"] >= 0 for v in data["phases"].values())
    StartupTimer(None).write()  # no path: nothing written, no error.


def test_training_resumes_with_its_programs_from_the_cache(tmp_path):
    """The train loop's programs are saved by the first run and loaded by the resumed one."""
    from ddpm_jax.train import loop

    config = tiny.get_config()
    config.training.sample_every_steps = 0
    config.training.log_every_steps = 1
    cache = executables.ExecutableCache(str(tmp_path / "cache"))
    config.training.num_train_steps = 1
    loop.train(config, str(tmp_path / "w"), executable_cache=cache)
    cache.wait()
    timer = StartupTimer(str(tmp_path / "startup.json"))
    config.training.num_train_steps = 2
    cache = executables.ExecutableCache(str(tmp_path / "cache"))
    state = loop.train(config, str(tmp_path / "w"), timer=timer, executable_cache=cache)
    assert int(state.step) == 2
    assert {k: v["source"] for k, v in timer.programs.items()} == {
        "train_step": "cache", "bpd_estimate": "cache"}  # fmt: skip
    assert "trace" not in timer.phases and "first_row" in timer.events
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and np.isfinite(rows[-1]["loss"])


def test_an_untrusted_directory_is_neither_read_nor_written(tmp_path, caplog):
    args = _args()
    fn, cache = _cached(tmp_path / "c")
    expected = np.asarray(fn(*args))
    cache.wait()
    os.chmod(tmp_path / "c", 0o777)  # others may write: its files may not be what was saved.
    with caplog.at_level(logging.WARNING):
        again, cache2 = _cached(tmp_path / "c")
        np.testing.assert_array_equal(np.asarray(again(*args)), expected)
    assert _source(again) == "compiled" and cache2.untrusted
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "not using" in warning
    assert executables.cached_eval_shape(cache2, "s", {}) is jax.eval_shape
    os.chmod(tmp_path / "c", 0o700)
    assert executables.ExecutableCache(str(tmp_path / "c")).untrusted is None
    assert oct(os.stat(tmp_path / "c").st_mode & 0o777) == "0o700"  # as the cache made it.


def test_the_cache_s_own_layer_unpickles_no_function():
    import pickle

    leaves, treedef = jax.tree.flatten({"a": jnp.zeros(2), "b": (1, 2)})
    data = pickle.dumps((treedef, [(tuple(np.shape(x)), np.dtype("float32")) for x in leaves]))
    assert cache_files.restricted_loads(data) == pickle.loads(data)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        cache_files.restricted_loads(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        cache_files.restricted_loads(pickle.dumps(jax.jit))  # a function of an allowed package


def test_shared_atomic_write_leaves_other_writers_temporaries(tmp_path):
    from ddpm_jax import files

    path = tmp_path / "entry.jaxexec"
    other = tmp_path / "entry.jaxexec.tmp"  # another writer's (unshared) temporary file
    other.write_bytes(b"theirs")
    files.atomic_write(path, b"mine", shared=True)
    assert path.read_bytes() == b"mine" and other.read_bytes() == b"theirs"
    with pytest.raises(RuntimeError), files.atomic_path(path, shared=True) as tmp:
        open(tmp, "wb").close()
        raise RuntimeError
    assert path.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.jaxexec", "entry.jaxexec.tmp"]
