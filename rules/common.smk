# Config validation, derived constants, input functions and wildcard constraints.
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the nullcov package ships with the workflow

from nullcov import model as nc_model
from nullcov import prompts as nc_prompts
from nullcov import schedule as nc_schedule
from nullcov.provenance import feature_config


validate(config, "../config/schema.yaml", set_default=True)

if not any(config["collect_features"].values()):
    raise WorkflowError("config key 'collect_features': q, k, v and out are all false; nothing to collect")

try:
    PROMPTS = nc_prompts.read_prompts(config["prompts"])
    MODEL_DIR = nc_model.resolve_model_dir(config["model"])
    SCHEDULER_CONFIG = nc_model.scheduler_config(config["model"])
    SCHEDULE = nc_schedule.cached_schedule(
        SCHEDULER_CONFIG,
        config["sampler_strategy"],
        config["num_denoising_steps"],
        cache_dir="resources/cache/schedules",
    )
except (nc_prompts.PromptFileError, nc_model.ModelError, nc_schedule.ScheduleError) as err:
    raise WorkflowError(f"invalid configuration: {err}")

SHARDS = nc_prompts.split_into_shards(PROMPTS, config["prompts_per_shard"])
SHARD_IDS = [f"{index:04d}" for index in range(len(SHARDS))]
STEP_NAMES = [step["name"] for step in SCHEDULE["steps"]]
COLLECT_STEPS = config["collect_features"]["q"] or config["collect_features"]["out"]
COLLECT_TEXT = config["collect_features"]["k"] or config["collect_features"]["v"]
# Files each feature job writes: one per scheduled step (q/out inputs) and text.h5 (k/v inputs).
SHARD_FILE_NAMES = (STEP_NAMES if COLLECT_STEPS else []) + (["text"] if COLLECT_TEXT else [])


wildcard_constraints:
    shard=r"\d{4}",
    name=nc_schedule.NAME_PATTERN,


def final_outputs():
    """The deliverables: merged moments (interpolating trainers need them) and projections."""
    return ["results/schedule.json"] + [
        f"results/{stage}/{name}.h5" for stage in ("covariance", "projections") for name in SHARD_FILE_NAMES
    ]


def model_input(wildcards):
    """The built model folder when the model is built by this workflow; else nothing to track."""
    return [nc_model.BUILTIN_TINY_DIR] if config["model"] == nc_model.BUILTIN_TINY else []


def shard_prompts(wildcards):
    return SHARDS[int(wildcards.shard)]


def shard_first_index(wildcards):
    return int(wildcards.shard) * config["prompts_per_shard"]


def shard_folders(wildcards):
    """Every shard's feature folder (the merge reads {folder}/{name}.h5 from each)."""
    return [f"results/features/shard_{shard}" for shard in SHARD_IDS]


def feature_job_minutes(wildcards, attempt):
    """SLURM runtime: generous for ~10 prompt-timesteps/s, doubled on each retry."""
    work = len(shard_prompts(wildcards)) * len(STEP_NAMES)
    return attempt * (15 + work // 300)
