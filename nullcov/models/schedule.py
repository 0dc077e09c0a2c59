"""Timestep schedules: which UNet calls are collected, and what each one is called.

A sampler name is a real diffusers scheduler class plus options (diffusers' own A1111 mapping),
built with ``from_config`` on the model's scheduler config. ``null`` (uniform; also spelt
``uniform`` or the string ``"null"``, see :func:`canonical_strategy`) and ``early_timestep``
are explicit timestep lists driven by first-order DPM-Solver++ (equivalent to DDIM), which
accepts custom ``timesteps``.

Flow-matching models (SD3, FLUX: ``FlowMatchEulerDiscreteScheduler``) are keyed by σ: their
scheduler gives float timesteps ``1000·σ`` after a static ``shift`` (SD3) or a dynamic one computed
from the image sequence length (FLUX's ``calculate_shift``, so the grid depends on the resolution).
Their one sampler is the model's own flow-matching Euler (:data:`FLOW_SAMPLERS`: ``Euler``, the name
A1111/Forge give it); the DDPM samplers and the timestep lists are refused for them by name. The
schedule records the exact σ and timesteps, the resolution, the image sequence length and the shift.

Importing this module is cheap (no torch/diffusers); :func:`build_schedule` imports diffusers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
from pathlib import Path

from nullcov.docs import see
from nullcov.files import NULL_WORDS, read_json, write_json
from nullcov.provenance import package_versions

# sampler name -> (diffusers scheduler class, options passed to from_config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "DPM++ 3M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {"original_inference_steps": 50}),
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
}
# Drives the explicit lists of `null` and `early_timestep`: first-order DPM-Solver++ is DDIM.
TIMESTEP_LIST_SCHEDULER: tuple[str, dict] = (
    "DPMSolverMultistepScheduler",
    {"solver_order": 1, "algorithm_type": "dpmsolver++"},
)
TIMESTEP_LIST_STRATEGIES = (None, "early_timestep")
STRATEGIES: tuple = (*TIMESTEP_LIST_STRATEGIES, *SAMPLERS)
# Spellings of the uniform strategy (canonical form: None). "null" is what `--config
# sampler_strategy=null` passes; the other null words come from nullcov.files.NULL_WORDS.
UNIFORM_NAMES = ("uniform",)

#: The flow-matching schedulers (SD3, FLUX) and the samplers that apply to them: the model's own Euler.
FLOW_MATCHING_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
FLOW_SAMPLERS: dict[str, tuple[str, dict]] = {"Euler": ("FlowMatchEulerDiscreteScheduler", {})}

# Bump when the schedule JSON layout or the mapping above changes: invalidates parse-time caches.
SCHEDULE_FORMAT = 1

# No braces: Snakemake reads `{...}` inside a wildcard constraint as a wildcard.
NAME_PATTERN = r"(?:timestep_\d\d\d\d|alpha_\d\d+_\d\d\d\d|sigma_\d\d+_\d\d\d\d)"

log = logging.getLogger(__name__)


class ScheduleError(ValueError):
    """An invalid strategy, step count or scheduler config."""


def canonical_strategy(strategy):
    """The strategy as the functions below compare it: None for every spelling of uniform.

    ``None``, ``"uniform"`` and the null words (``"null"``, ...) all mean the uniform strategy;
    any other value is returned unchanged (and :func:`check_strategy` judges it).
    """
    if isinstance(strategy, str) and (strategy.strip() in UNIFORM_NAMES or strategy.strip() in NULL_WORDS):
        return None
    return strategy


def check_strategy(strategy) -> None:
    if canonical_strategy(strategy) not in STRATEGIES:
        valid = ", ".join("null (or 'uniform')" if s is None else repr(s) for s in STRATEGIES)
        raise ScheduleError(f"sampler_strategy {strategy!r} is not known; valid values: {valid}"
                            f"{see('error-validating-config-file')}")


def timestep_list(strategy, num_steps: int, num_train_timesteps: int) -> list[int]:
    """The explicit timestep list of ``null`` (uniform) or ``early_timestep`` (the noisiest)."""
    import numpy as np

    strategy = canonical_strategy(strategy)
    if num_steps <= 0:
        raise ScheduleError(f"num_denoising_steps must be a positive integer, got {num_steps}"
                            f"{see('error-validating-config-file')}")
    last = num_train_timesteps - 1
    if num_steps >= num_train_timesteps:
        return list(range(last, -1, -1))
    if strategy is None:
        return [int(t) for t in np.linspace(last, 0, num_steps).astype(np.int64)]
    if strategy == "early_timestep":
        return list(range(last, last - num_steps, -1))
    raise ScheduleError(f"{strategy!r} is a sampler, not a timestep-list strategy")


def step_name(strategy, index: int, timestep: float) -> str:
    """``timestep_{t:04d}`` for the uniform strategy, else ``alpha_{index:02d}_{round(t):04d}``."""
    if canonical_strategy(strategy) is None:
        return f"timestep_{int(round(timestep)):04d}"
    return f"alpha_{index:02d}_{int(round(timestep)):04d}"


def scheduler_choice(strategy) -> tuple[str, dict]:
    """The diffusers scheduler class name and ``from_config`` options used for a strategy."""
    check_strategy(strategy)
    strategy = canonical_strategy(strategy)
    if strategy in TIMESTEP_LIST_STRATEGIES:
        return TIMESTEP_LIST_SCHEDULER
    return SAMPLERS[strategy]


def set_timesteps_arguments(strategy, num_steps: int, num_train_timesteps: int) -> dict:
    """Keyword arguments for both ``scheduler.set_timesteps`` and the pipeline call."""
    strategy = canonical_strategy(strategy)
    if strategy in TIMESTEP_LIST_STRATEGIES:
        return {"timesteps": timestep_list(strategy, num_steps, num_train_timesteps)}
    if num_steps <= 0:
        raise ScheduleError(f"num_denoising_steps must be a positive integer, got {num_steps}"
                            f"{see('error-validating-config-file')}")
    return {"num_inference_steps": num_steps}


def make_scheduler(scheduler_config: dict, strategy):
    """The configured diffusers scheduler for ``strategy`` (``set_timesteps`` not yet called)."""
    import diffusers

    if is_flow_matching(scheduler_config):
        check_flow_strategy(strategy)
        class_name, options = FLOW_SAMPLERS[canonical_strategy(strategy)]
    else:
        class_name, options = scheduler_choice(strategy)
    return getattr(diffusers, class_name).from_config(scheduler_config, **options)


def check_step_limit(scheduler, strategy, num_steps: int) -> None:
    """Refuse more steps than a distilled sampler's schedule holds (LCM: ``original_inference_steps``).

    LCM picks its timesteps from a grid of ``original_inference_steps`` points, so it cannot
    take more steps than that; diffusers would fail inside ``set_timesteps`` with a traceback.
    """
    limit = getattr(scheduler.config, "original_inference_steps", None)
    if canonical_strategy(strategy) in TIMESTEP_LIST_STRATEGIES or limit is None or num_steps <= int(limit):
        return
    raise ScheduleError(
        f"sampler_strategy {strategy!r} allows at most {int(limit)} num_denoising_steps (its scheduler's "
        f"original_inference_steps is {int(limit)}), got num_denoising_steps {num_steps}: set "
        f"num_denoising_steps to {int(limit)} or fewer, or pick another sampler_strategy"
        f"{see('sampler-refuses-the-number-of-steps')}"
    )


def is_flow_matching(scheduler_config) -> bool:
    """Whether the model's scheduler is a flow-matching one (SD3, FLUX)."""
    return dict(scheduler_config).get("_class_name") in FLOW_MATCHING_SCHEDULERS


def check_flow_strategy(strategy) -> None:
    """Refuse, by name, a strategy that does not apply to a flow-matching model."""
    if canonical_strategy(strategy) in FLOW_SAMPLERS:
        return
    name = "null (uniform)" if canonical_strategy(strategy) is None else repr(strategy)
    raise ScheduleError(
        f"sampler_strategy {name} does not apply to a flow-matching model (FlowMatchEulerDiscreteScheduler: SD3, "
        f"FLUX); flow-matching models take: {', '.join(map(repr, FLOW_SAMPLERS))} (the model's own flow-matching "
        f"Euler sampler){see('sampler-does-not-apply-to-flow-matching')}"
    )


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """FLUX's dynamic shift ``mu`` for ``image_seq_len`` image tokens: diffusers' ``calculate_shift``
    (``pipelines/flux/pipeline_flux.py``), the same arithmetic in the same order."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flow_set_timesteps(scheduler_config: dict, pipeline: str, num_steps: int, image_seq_len: int) -> dict:
    """The ``set_timesteps`` arguments the pipeline passes its flow-matching scheduler: FLUX its own σ grid
    ``linspace(1, 1/N, N)`` and ``mu`` (:func:`calculate_shift`, always computed); SD3 the step count,
    and ``mu`` only with ``use_dynamic_shifting``."""
    import numpy as np

    mu = calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                         scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                         scheduler_config.get("max_shift", 1.15))
    if pipeline == "FluxPipeline":
        if scheduler_config.get("use_flow_sigmas"):
            return {"num_inference_steps": num_steps, "mu": mu}
        return {"sigmas": [float(s) for s in np.linspace(1.0, 1 / num_steps, num_steps)], "mu": mu}
    if pipeline == "StableDiffusion3Pipeline":
        return {"num_inference_steps": num_steps} | ({"mu": mu} if scheduler_config.get("use_dynamic_shifting") else {})
    raise ScheduleError(f"no flow-matching schedule for pipeline {pipeline!r}")


def build_flow_schedule(scheduler_config: dict, strategy, num_steps: int, flow: dict) -> dict:
    """:func:`build_schedule` of a flow-matching model: ``flow`` = ``{"pipeline", "resolution",
    "image_seq_len"}`` (:func:`nullcov.models.model.image_sequence_length`). Each step records its
    ``sigma`` (the scheduler's, float32) and ``timestep`` (``1000·σ``, what SD3's transformer receives;
    FLUX's receives ``timestep / 1000``), named ``sigma_{index:02d}_{round(1000σ):04d}``."""
    import diffusers

    check_flow_strategy(strategy)
    if num_steps <= 0:
        raise ScheduleError(f"num_denoising_steps must be a positive integer, got {num_steps}"
                            f"{see('error-validating-config-file')}")
    class_name, options = FLOW_SAMPLERS[canonical_strategy(strategy)]
    scheduler = getattr(diffusers, class_name).from_config(scheduler_config, **options)
    arguments = flow_set_timesteps(dict(scheduler.config), flow["pipeline"], num_steps, flow["image_seq_len"])
    scheduler.set_timesteps(**arguments)
    timesteps = [float(t) for t in scheduler.timesteps.double().tolist()]
    sigmas = [float(s) for s in scheduler.sigmas.double().tolist()[: len(timesteps)]]
    steps = [{"index": index, "name": f"sigma_{index:02d}_{int(round(1000 * sigma)):04d}", "timestep": timestep,
              "sigma": sigma} for index, (timestep, sigma) in enumerate(zip(timesteps, sigmas, strict=True))]
    names = [step["name"] for step in steps]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ScheduleError(f"strategy {strategy!r} gives repeated step names {duplicated}"
                            f"{see('sampler-refuses-the-number-of-steps')}")
    config = dict(scheduler.config)
    return {
        "format": SCHEDULE_FORMAT,
        "strategy": canonical_strategy(strategy),
        "num_denoising_steps": num_steps,
        "scheduler": {"class": class_name, "options": options, "config": config},
        "set_timesteps": arguments,
        "pipeline_arguments": {"num_inference_steps": num_steps},
        "num_train_timesteps": int(config["num_train_timesteps"]),
        "flow_matching": {"pipeline": flow["pipeline"], "resolution": flow["resolution"],
                          "image_seq_len": flow["image_seq_len"], "shift": float(config["shift"]),
                          "use_dynamic_shifting": bool(config.get("use_dynamic_shifting")),
                          "mu": arguments.get("mu")},
        "steps": steps,
    }


def pipeline_arguments(schedule: dict) -> dict:
    """The step arguments of the pipeline call that runs ``schedule``: a flow-matching pipeline computes
    its σ grid and shift itself from the step count; a UNet pipeline takes the ``set_timesteps`` ones."""
    return schedule["pipeline_arguments"] if "flow_matching" in schedule else schedule["set_timesteps"]


def build_schedule(scheduler_config: dict, strategy, num_steps: int, flow: dict | None = None) -> dict:
    """Run the real scheduler and describe every UNet call of the trajectory.

    Returns a JSON-able dict: the scheduler class, options, full config, the ``set_timesteps``
    arguments, and per collected step ``index``, ``name``, exact ``timestep`` (float),
    ``alphas_cumprod`` (interpolated at the timestep) and ``sigma`` = sqrt((1 - a) / a).
    A flow-matching scheduler (SD3, FLUX) needs ``flow`` (:func:`build_flow_schedule`).
    """
    import numpy as np

    if is_flow_matching(scheduler_config):
        if flow is None:
            raise ScheduleError("a flow-matching schedule depends on the resolution: build_schedule needs flow="
                                "{pipeline, resolution, image_seq_len} (nullcov.models.sampling.flow_of(pipe, "
                                f"resolution)){see('sampler-does-not-apply-to-flow-matching')}")
        return build_flow_schedule(scheduler_config, strategy, num_steps, flow)
    check_strategy(strategy)
    strategy = canonical_strategy(strategy)
    class_name, options = scheduler_choice(strategy)
    scheduler = make_scheduler(scheduler_config, strategy)
    num_train = int(scheduler.config.num_train_timesteps)
    arguments = set_timesteps_arguments(strategy, num_steps, num_train)
    check_step_limit(scheduler, strategy, num_steps)
    try:
        scheduler.set_timesteps(**arguments)
    except ValueError as err:  # any other limit of a diffusers scheduler: name the keys at fault
        raise ScheduleError(
            f"sampler_strategy {strategy!r} with num_denoising_steps {num_steps} is refused by {class_name}: {err}"
            f"{see('sampler-refuses-the-number-of-steps')}"
        ) from err
    timesteps = [float(t) for t in scheduler.timesteps.double().tolist()]
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    steps = []
    for index, timestep in enumerate(timesteps):
        alpha = float(np.interp(timestep, np.arange(num_train), alphas_cumprod))
        steps.append(
            {
                "index": index,
                "name": step_name(strategy, index, timestep),
                "timestep": timestep,
                "alphas_cumprod": alpha,
                "sigma": math.sqrt((1.0 - alpha) / alpha),
            }
        )
    names = [step["name"] for step in steps]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ScheduleError(f"strategy {strategy!r} gives repeated step names {duplicated}"
                            f"{see('sampler-refuses-the-number-of-steps')}")
    return {
        "format": SCHEDULE_FORMAT,
        "strategy": strategy,
        "num_denoising_steps": num_steps,
        "scheduler": {"class": class_name, "options": options, "config": dict(scheduler.config)},
        "set_timesteps": arguments,
        "num_train_timesteps": num_train,
        "steps": steps,
    }


def _cache_key(scheduler_config: dict, strategy, num_steps: int, flow: dict | None = None) -> str:
    try:
        diffusers_version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        diffusers_version = "not installed"
    payload = json.dumps(
        [SCHEDULE_FORMAT, diffusers_version, scheduler_config, strategy, num_steps]
        + ([flow] if flow is not None else []),
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cached_schedule(scheduler_config: dict, strategy, num_steps: int, cache_dir: str | Path,
                    flow: dict | None = None) -> dict:
    """:func:`build_schedule`, memoised as JSON under ``cache_dir``.

    The Snakefile needs every step name at parse time, and cluster jobs re-parse it; importing
    diffusers costs seconds, reading this cache milliseconds. The key covers the scheduler
    config, strategy, step count, diffusers version and :data:`SCHEDULE_FORMAT`.
    """
    if is_flow_matching(scheduler_config):
        check_flow_strategy(strategy)
    else:
        check_strategy(strategy)
    strategy = canonical_strategy(strategy)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"schedule-{_cache_key(scheduler_config, strategy, num_steps, flow)}.json"
    if path.exists():
        return read_json(path)
    write_json(path, build_schedule(scheduler_config, strategy, num_steps, flow), indent=1, sort_keys=True)
    return read_json(path)  # the same value a cache hit returns


def write_schedule(path, schedule: dict, layers: list[str], model_spec: str) -> dict:
    """``results/schedule.json``: the sampler's steps (:func:`nullcov.models.schedule.build_schedule`)
    plus the cross-attention layers to collect (:func:`nullcov.models.model.select_layers`).

    The workflow computes both when it parses the Snakefile (the layers from the model's UNet
    config on the meta device), so a bad ``cross_attention_layers`` or sampler fails before any
    job runs; the ``schedule`` rule only writes them down, inside the Snakemake process.
    """
    schedule = dict(schedule) | {"layers": list(layers),
                                 "provenance": {"model": model_spec, "packages": package_versions()}}
    write_json(path, schedule, indent=1, sort_keys=True)
    log.info("%s: %d steps of %s (%s); %d cross-attention layers", path, len(schedule["steps"]),
             schedule["strategy"], schedule["scheduler"]["class"], len(layers))
    return schedule


def read_schedule(path) -> dict:
    """``results/schedule.json`` as :func:`write_schedule` wrote it. A missing file raises
    ``FileNotFoundError``, one that is not a JSON object with a list of ``steps`` :class:`ScheduleError`;
    both name the file and the command that writes it again."""
    path = Path(path)
    fix = f"the workflow's schedule rule writes it: snakemake --cores all --force {path}"
    try:
        schedule = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; {fix}") from None
    except OSError as err:
        raise ScheduleError(f"{path} cannot be read ({err.strerror or err}); {fix}") from None
    except ValueError as err:
        raise ScheduleError(f"{err}; {fix}") from None
    if not isinstance(schedule, dict) or not isinstance(schedule.get("steps"), list):
        raise ScheduleError(f"{path} is not a nullcov schedule (no list of steps); {fix}")
    return schedule
