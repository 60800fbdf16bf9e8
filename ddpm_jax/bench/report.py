"""Runs the benchmark parts, derives ratios, and writes the table and the JSON record."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Any

import jax
import ml_collections

from ddpm_jax import files
from ddpm_jax.bench import jax_bench
from ddpm_jax.bench.common import MODEL_PARTS, BenchSettings, finite_or_none, peak_tflops_for

REFERENCES = ("torch",)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(config_name: str, settings: BenchSettings, dtype: str) -> dict[str, Any]:
    """Where and with what the figures were measured."""
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": config_name,
        "batch_size": settings.batch_size,
        "dtype": dtype,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "settings": {
            "steps": settings.steps,
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "sample_steps": settings.sample_steps,
            "parts": list(settings.parts),
        },
    }


def run(
    config: ml_collections.ConfigDict,
    settings: BenchSettings,
    *,
    reference: str | None = None,
    config_name: str = "",
) -> dict[str, Any]:
    """Measures ddpm_jax (and the `reference` implementation, if given) with `settings`.

    Args:
      config: an experiment config; its `model.dtype` is the compute dtype of both.
      settings: batch, steps, repeats, parts.
      reference: None or "torch" (needs the `bench` extra: torch and diffusers).
      config_name: recorded in the output (e.g. the config file's path).

    Returns:
      {"meta": environment, "peak": {...}, "jax": figures, "reference": figures or None,
       "ratios": ddpm_jax / reference throughput (> 1: ddpm_jax is faster) or None}.
    """
    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"reference must be None or one of {REFERENCES}, got {reference!r}.")
    meta = environment(config_name, settings, str(config.model.dtype))
    peak, peak_source = peak_tflops_for(meta["device_kind"], settings.peak_tflops)
    model_parts = any(p in settings.parts for p in MODEL_PARTS)
    results: dict[str, Any] = {
        "meta": meta,
        "peak": {"tflops_per_device": peak, "source": peak_source},
        "jax": jax_bench.measure(config, settings, peak) if model_parts else None,
        "reference": None,
        "ratios": None,
    }
    if "sampler_accuracy" in settings.parts:
        from ddpm_jax.bench import sampler_accuracy

        results["sampler_accuracy"] = sampler_accuracy.measure(
            config, settings.batch_size, settings.repeats
        )
    if "formulations" in settings.parts:
        from ddpm_jax.bench import formulations

        results["formulations"] = formulations.measure(config, settings)
    if "input" in settings.parts:
        from ddpm_jax.bench import input_bench

        results["input"] = input_bench.measure(settings)
    if reference == "torch" and model_parts:
        from ddpm_jax.bench import torch_ref

        device = "cuda" if meta["platform"] == "gpu" else "cpu"
        flops = {p: results["jax"].get(p, {}).get("flops_per_image") for p in ("train", "forward")}
        ref_peak = peak if device == "cuda" else None
        results["reference"] = torch_ref.measure(config, settings, device, ref_peak, flops)
        results["ratios"] = ratios(results["jax"], results["reference"])
    meta["load_average_end"] = list(os.getloadavg())
    return results


def ratios(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, float | None]:
    """ddpm_jax / reference throughput per part (> 1 means ddpm_jax is faster)."""
    out = {}
    for part, key in (
        ("train", "images_per_s"),
        ("forward", "images_per_s"),
        ("sampling", "per_step_images_per_s"),
    ):
        if part in ours and part in ref:
            out[f"{part}_{key}"] = finite_or_none(ours[part][key] / ref[part][key])
    return out


def write_json(results: dict[str, Any], path: str) -> None:
    """Writes `results` as indented JSON to `path` (atomically), in the order of `results`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_json(path, results, sort_keys=False)


# --------------------------------------------------------------------------- the table


def _fmt(x: Any, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int) and not unit:
        return f"{x:,}"
    return f"{float(x) * scale:.{digits}g}{unit}"


def _duration(seconds: float) -> str:
    return f"{seconds:.4g} s" if seconds >= 1 else f"{seconds * 1e3:.4g} ms"


def _step(timing: dict[str, Any] | None) -> str:
    if not timing:
        return "n/a"
    if timing["min_s"] >= 1:
        lo, hi = f"{timing['min_s']:.4g}", f"{timing['max_s']:.4g}"
    else:
        lo, hi = f"{timing['min_s'] * 1e3:.4g}", f"{timing['max_s'] * 1e3:.4g}"
    return f"{_duration(timing['median_s'])} [{lo}-{hi}]"


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def format_table(results: dict[str, Any]) -> str:
    """Plain-text tables of `results` (from `run`): ddpm_jax, the reference, their ratio."""
    parts = []
    if results["jax"] is not None:
        parts.append(_model_table(results))
    if "sampler_accuracy" in results:
        from ddpm_jax.bench import sampler_accuracy

        parts.append(sampler_accuracy.format_table(results["sampler_accuracy"]))
    if "formulations" in results:
        from ddpm_jax.bench import formulations

        parts.append(formulations.format_table(results["formulations"]))
    if "input" in results:
        from ddpm_jax.bench import input_bench

        parts.append(input_bench.format_table(results["input"]))
    return "\n".join(parts)


def _model_table(results: dict[str, Any]) -> str:
    meta, ours, ref = results["meta"], results["jax"], results["reference"]
    rat = results["ratios"] or {}
    lines = [
        f"ddpm_jax benchmark, {meta['date']}: {meta['config']}, batch {meta['batch_size']}, "
        f"{meta['dtype']}, {meta['device_count']} x {meta['device_kind']} ({meta['platform']})",
        f"jax {meta['jax']} / jaxlib {meta['jaxlib']}; XLA_FLAGS={meta['XLA_FLAGS']!r}; "
        f"load average at start {meta['load_average_start'][0]:.2f}",
        f"peak for MFU: {_fmt(results['peak']['tflops_per_device'], ' TFLOP/s')} per device "
        f"({results['peak']['source']}); times: median [min-max] over "
        f"{meta['settings']['repeats']} repeats",
    ]
    rows: list[tuple[str, str, str, str]] = [("", "ddpm_jax", "reference", "jax/ref")]
    if ref is not None:
        rows.append(("implementation", "jax.jit (XLA)", ref["framework"], ""))
    rows.append(("parameters", _fmt(ours["params"]), _fmt(_get(ref, "params")), ""))

    def add(label: str, ours_v: str, ref_v: str = "", ratio: Any = None) -> None:
        ratio_v = _fmt(ratio, "x") if ratio is not None else ""
        rows.append((label, ours_v, ref_v if ref is not None else "", ratio_v))

    for part in ("train", "forward"):
        p, q = ours.get(part), _get(ref, part)
        if p is None:
            continue
        add(f"{part}: step time", _step(p["step_s"]), _step(_get(q, "step_s")))
        add(f"{part}: CPU time per step", _duration(p["step_s"]["cpu_median_s"]),
            _duration(q["step_s"]["cpu_median_s"]) if q else "n/a")  # fmt: skip
        if part == "train":
            add("train: steps/s", _fmt(p["steps_per_s"]), _fmt(_get(q, "steps_per_s")))
        add(f"{part}: images/s", _fmt(p["images_per_s"]), _fmt(_get(q, "images_per_s")),
            rat.get(f"{part}_images_per_s"))  # fmt: skip
        add(f"{part}: lower + compile", f"{p['lower_s']:.3g} s + {p['compile_s']:.3g} s", "-")
        add(f"{part}: GFLOPs/image (XLA)", _fmt(p["flops_per_image"], scale=1e-9), "same")
        add(f"{part}: achieved GFLOP/s", _fmt(p["achieved_tflops_per_s"], scale=1e3),
            _fmt(_get(q, "achieved_tflops_per_s"), scale=1e3))  # fmt: skip
        add(f"{part}: MFU", _fmt(p["mfu"], "%", 100), _fmt(_get(q, "mfu"), "%", 100))
    s, q = ours.get("sampling"), _get(ref, "sampling")
    if s is not None:
        k = s["chain_steps"]
        add(f"sampling: {k}-step chain", _step(s["chain_s"]), _step(_get(q, "chain_s")))
        add("sampling: per reverse step", _duration(s["per_step_s"]),
            _duration(q["per_step_s"]) if q else "n/a")  # fmt: skip
        add("sampling: step / forward", _fmt(s["per_step_over_forward"], "x"),
            _fmt(_get(q, "per_step_over_forward"), "x"))  # fmt: skip
        add("sampling: images/s per step", _fmt(s["per_step_images_per_s"]),
            _fmt(_get(q, "per_step_images_per_s")),
            rat.get("sampling_per_step_images_per_s"))  # fmt: skip
        n = s["full_chain_steps"]
        add(f"sampling: {n}-step chain (proj.)", _fmt(s["full_chain_s_projected"], " s"),
            _fmt(_get(q, "full_chain_s_projected"), " s"))  # fmt: skip
        add(f"sampling: images/s, {n} steps", _fmt(s["full_chain_images_per_s_projected"]),
            _fmt(_get(q, "full_chain_images_per_s_projected")))  # fmt: skip
        for length, c in s["compile_by_chain_steps"].items():
            add(f"sampler compile, {length} steps",
                f"{c['lower_s']:.3g} s + {c['compile_s']:.3g} s", "-")  # fmt: skip
    mem = _get(ours, "train", "xla_memory_per_device")
    if mem:
        add("train: XLA buffers/device", _fmt(mem["total_bytes"], " GiB", 2**-30), "-")
    add("peak memory", _fmt(ours["memory"]["bytes"], " GiB", 2**-30),
        _fmt(_get(ref, "memory", "bytes"), " GiB", 2**-30))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.append(f"peak memory: ddpm_jax {ours['memory']['kind']}"
                 + (f"; reference {ref['memory']['kind']}" if ref else ""))  # fmt: skip
    return "\n".join(lines)
