"""The legacy tool's method (``../shared/legacy-tool.md``), the baseline of ``make bench``
(tools/benchmark.py) and ``make bench-small-run`` (tools/bench_small_run.py). A developer tool,
not part of the installed package.

Phase 1: per prompt per timestep a Gaussian latent noised with ``add_noise``, one UNet call at
batch 1 with hooks keeping the raw inputs of ``to_q``/``to_k``/``to_v``/``to_out`` of every
cross-attention layer, ``np.savez_compressed`` of them. Phase 2: the files streamed back, per
timestep and per layer/feature, into the centred covariances (written once per timestep).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from benchmark_case import measured

LEGACY_FILE_BYTES = 92e6  # the legacy tool's measured .npz per prompt per timestep (SD-1.5, 512x512)
LEGACY_SECONDS = (5.5, 8.0)  # its measured seconds per prompt per timestep on one GPU


def _timestep(step: dict) -> int:
    return int(round(step["timestep"]))


class _RawInputs:
    """Phase 1 on ``pipe``: forward pre-hooks keep the raw input of ``to_q``/``to_k``/``to_v``/``to_out``
    of every cross-attention layer (``layerNN_<feature>``) while :meth:`dump` calls the UNet."""

    def __init__(self, pipe, config: dict):
        from diffusers import DDPMScheduler

        from nullcov.models.model import image_resolution

        self.pipe, self.seed = pipe, config["seed"]
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        side = image_resolution(pipe, config["resolution"]) // pipe.vae_scale_factor
        self.latent_shape = (1, pipe.unet.config.in_channels, side, side)
        self.noiser = DDPMScheduler.from_config(pipe.scheduler.config)
        self.captured: dict = {}
        self.handles: list = []

    def hook(self) -> None:
        from nullcov.models.model import cross_attention_modules

        def keep(key):
            def hook(module, args):
                self.captured[key] = args[0]

            return hook

        for index, (_name, module) in enumerate(cross_attention_modules(self.pipe.unet)):
            for feature, target in (("q", module.to_q), ("k", module.to_k), ("v", module.to_v),
                                    ("out", module.to_out[0])):
                self.handles.append(target.register_forward_pre_hook(keep(f"layer{index:02d}_{feature}")))

    def unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def dump(self, prompts: list[str], steps: list[dict], folder: Path) -> list[str]:
        """One ``.npz`` per prompt per timestep under ``folder/tNNNN/``; the array names in each."""
        arrays = {}
        for step in steps:
            timestep = _timestep(step)
            (folder / f"t{timestep:04d}").mkdir(exist_ok=True)
            for index, prompt in enumerate(prompts):
                arrays = self.unet_inputs(prompt, index, timestep)
                np.savez_compressed(folder / f"t{timestep:04d}" / f"prompt_{index:05d}", **arrays)
        return sorted(arrays)

    def unet_inputs(self, prompt: str, index: int, timestep: int) -> dict:
        """The raw inputs of one UNet call at batch 1 on a noised Gaussian latent, as float32 arrays."""
        import torch

        from nullcov.models.sampling import prompt_generators

        pipe, device, dtype = self.pipe, self.device, self.dtype
        embedding, _ = pipe.encode_prompt([prompt], device, 1, do_classifier_free_guidance=False)
        generator = prompt_generators(self.seed, index, 1)[0]
        clean = torch.randn(self.latent_shape, generator=generator).to(device, dtype)
        noise = torch.randn(self.latent_shape, generator=generator).to(device, dtype)
        noisy = self.noiser.add_noise(clean, noise, torch.tensor([timestep]))
        self.captured.clear()
        pipe.unet(noisy, torch.tensor([timestep], device=device), encoder_hidden_states=embedding, return_dict=False)
        return {key: value[0].float().cpu().numpy() for key, value in self.captured.items()}


def _stream_sums(folder: Path, steps: list[dict], keys: list[str]) -> dict:
    """Phase 2, reading: per timestep, per layer/feature, every prompt's file streamed back into
    ``(Σ xxᵀ, Σ x, count)`` in float64."""
    sums = {}
    for step in steps:
        timestep = _timestep(step)
        files = sorted((folder / f"t{timestep:04d}").glob("prompt_*.npz"))
        for key in keys:
            total = count = outer = None
            for path in files:
                with np.load(path) as data:
                    rows = data[key].astype(np.float64).reshape(-1, data[key].shape[-1])
                outer = rows.T @ rows if outer is None else outer + rows.T @ rows
                total = rows.sum(0) if total is None else total + rows.sum(0)
                count = rows.shape[0] if count is None else count + rows.shape[0]
            sums[(timestep, key)] = (outer, total, count)
    return sums


def _write_covariances(sums: dict, out: Path) -> None:
    """Phase 2, once per timestep: the centred covariances and their counts, one file each."""
    with np.errstate(divide="ignore", invalid="ignore"):
        for (timestep, key), (outer, total, count) in sums.items():
            mean = total / count
            covariance = (outer - count * np.outer(mean, mean)) / (count - 1)
            np.save(out / f"t{timestep:04d}_{key}.npy", covariance)
            (out / f"t{timestep:04d}_{key}.json").write_text(json.dumps({"timestep": timestep, "count": int(count)}))


def run_legacy(pipe, prompts: list[str], schedule: dict, config: dict, folder: Path,
               amortise_prompts: int = 1000) -> dict:
    """The legacy tool's method on ``prompts`` x ``schedule['steps']`` (see the module docstring)."""
    import torch

    from nullcov.report.run_summary import folder_bytes

    raw = _RawInputs(pipe, config)
    raw.hook()
    folder.mkdir(parents=True, exist_ok=True)
    steps = schedule["steps"]
    phase1, phase2_read, phase2_final = {}, {}, {}
    try:
        with measured(str(raw.device), phase1), torch.inference_mode():
            keys = raw.dump(prompts, steps, folder)
    finally:
        raw.unhook()
    scratch = folder_bytes(folder)
    out = folder / "covariance"
    out.mkdir()
    with measured("cpu", phase2_read):
        sums = _stream_sums(folder, steps, keys)
    with measured("cpu", phase2_final):
        _write_covariances(sums, out)
    shutil.rmtree(folder, ignore_errors=True)
    prompt_timesteps = len(prompts) * len(steps)
    per_pt = (phase1["wall_s"] + phase2_read["wall_s"]) / prompt_timesteps
    per_pt += phase2_final["wall_s"] / len(steps) / amortise_prompts  # the covariances, once per timestep
    return {
        "prompts": len(prompts),
        "timesteps": len(steps),
        "prompt_timesteps": prompt_timesteps,
        "phase1": phase1,
        "phase2_read": phase2_read,
        "phase2_finalise": phase2_final,
        "seconds_per_prompt_timestep": per_pt,
        "prompt_timesteps_per_s": 1.0 / per_pt,
        "scratch_bytes": scratch,
        "scratch_bytes_per_prompt_timestep": scratch / prompt_timesteps,
        "arrays_per_file": len(keys),
        "peak_rss_bytes": max(phase1["peak_rss_bytes"], phase2_read["peak_rss_bytes"]),
        "peak_gpu_bytes": phase1["peak_gpu_bytes"],
    }
