# Config validation, derived constants, input functions and wildcard constraints.
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the nullcov package ships with the workflow

from nullcov import model as nc_model
from nullcov import prompts as nc_prompts
from nullcov import schedule as nc_schedule
from nullcov.export import parse_exports
from nullcov.provenance import feature_config


if isinstance(config.get("exports"), str):  # --config exports=... arrives as a string
    try:
        config["exports"] = parse_exports(config["exports"])
    except ValueError as err:
        raise WorkflowError(f"invalid configuration: {err}")
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

DUPLICATES = nc_prompts.duplicate_counts(PROMPTS)
if DUPLICATES:
    logger.warning(
        f"{config['prompts']}: {sum(DUPLICATES.values()) - len(DUPLICATES)} repeated prompt line(s) "
        f"({len(DUPLICATES)} distinct prompts), e.g. {next(iter(DUPLICATES))!r} x{next(iter(DUPLICATES.values()))}; "
        f"duplicate_prompts: {config['duplicate_prompts']} "
        + ("(each occurrence is collected with its own seed)" if config["duplicate_prompts"] == "keep" else "(dropped)")
    )
    PROMPTS = nc_prompts.apply_duplicate_policy(PROMPTS, config["duplicate_prompts"])
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
    ] + report_outputs() + export_outputs()


EXPORT_OUTPUTS = {  # export name -> its output (rules/export.smk)
    "nullbooth": "results/export/nullbooth",
    "safetensors": "results/export/nullcov_projections.safetensors",
}


def export_outputs():
    """The configured exports and, with finetune_proof, the fine-tune proof's table and figure."""
    outputs = [EXPORT_OUTPUTS[name] for name in config["exports"]]
    if config["finetune_proof"]:
        outputs += ["results/report/finetune/finetune.tsv", "results/report/finetune/finetune.png"]
    return outputs


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


# -- Report and validation (rules/report.smk, rules/validation.smk) -----------------------------
from nullcov import report as nc_report
from nullcov import validation as nc_validation

try:
    # Validation prompt j is seeded seed + validation_seed_offset + j (checked disjoint from PROMPTS).
    # A relative path missing in the working directory is looked up in the workflow's folder.
    VALIDATION_FILE = (
        nc_validation.resolve_prompt_file(config["validation_prompts"], workflow.basedir)
        if config["validation_prompts"] is not None
        else None
    )
    VALIDATION_PROMPTS = (
        nc_validation.read_validation_prompts(VALIDATION_FILE, PROMPTS, config["validation_seed_offset"])
        if VALIDATION_FILE is not None
        else []
    )
    REPORT_STEPS = nc_report.select_steps(len(STEP_NAMES), config["report_steps"])  # indices into STEP_NAMES
    ATTENTION_PROMPTS = nc_report.select_prompts(len(PROMPTS), config["attention_prompts"])
except (nc_prompts.PromptFileError, nc_validation.ValidationConfigError, ValueError) as err:
    raise WorkflowError(f"invalid configuration: {err}")

FINETUNE_HELD_OUT = 4  # validation prompts whose outputs the fine-tune proof compares
if config["finetune_proof"] and not VALIDATION_PROMPTS:
    raise WorkflowError(
        "invalid configuration: finetune_proof needs held-out prompts: set validation_prompts (a prompt file)"
    )
LEAKAGE_STEPS_PER_JOB = 25  # steps per leakage job (CPU: one eigh per layer/linear and step)
LEAKAGE_PARTS = nc_validation.step_parts(SHARD_FILE_NAMES, LEAKAGE_STEPS_PER_JOB) if VALIDATION_PROMPTS else []
STEP_TIMESTEPS = {step["name"]: step["timestep"] for step in SCHEDULE["steps"]}
REPORT_FIGURES = {  # figure kind -> path (rule report_figures)
    **{
        f"spectra_{linear}": f"results/report/spectra/{linear}.png"
        for feature, linear in (("q", "to_q"), ("out", "to_out"))
        if config["collect_features"][feature]
    },
    **({"spectra_text": "results/report/spectra/text.png"} if COLLECT_TEXT else {}),
    **({"null_dim": "results/report/null_dim.png"} if COLLECT_STEPS else {}),
}
ATTENTION_FIGURES = {  # (prompt index, step name) -> path (rule attention_maps)
    (index, STEP_NAMES[step]): f"results/report/attention/prompt_{index:04d}_{STEP_NAMES[step]}.png"
    for index in ATTENTION_PROMPTS
    for step in REPORT_STEPS
}


def report_outputs():
    """Every figure and table of the report (all of them are outputs of rules in `all`)."""
    outputs = list(REPORT_FIGURES.values()) + ["results/report/summary.html"]
    if ATTENTION_FIGURES:
        outputs += ["results/report/attention/attention_maps.h5", *ATTENTION_FIGURES.values()]
    if VALIDATION_PROMPTS:
        outputs += [
            "results/validation/leakage.tsv",
            "results/report/validation/leakage_tradeoff.png",
            "results/report/validation/leakage_heatmap.png",
        ]
    return outputs


def attention_labels(index, name):
    """Report labels of one attention figure (braces would read as wildcards)."""
    prompt = PROMPTS[index] if len(PROMPTS[index]) <= 60 else PROMPTS[index][:59] + "…"
    return {
        "prompt": f"{index}: {prompt}".replace("{", "(").replace("}", ")"),
        "step": f"{name} (t={STEP_TIMESTEPS[name]:.0f})",
    }


def leakage_part_files(stage):
    """Input function: the {stage} files (covariance, projections) of one leakage job's steps."""
    return lambda wildcards: [f"results/{stage}/{name}.h5" for name in LEAKAGE_PARTS[int(wildcards.part)]]


def leakage_tables(wildcards):
    return [f"results/validation/leakage/part_{part:03d}.tsv" for part in range(len(LEAKAGE_PARTS))]


def summary_inputs(wildcards):
    """Everything the run summary reports on: it runs after every other job of the run."""
    inputs = ["results/schedule.json", *shard_folders(wildcards)]
    inputs += [f"results/{stage}/{name}.h5" for stage in ("covariance", "projections") for name in SHARD_FILE_NAMES]
    if VALIDATION_PROMPTS:
        inputs += ["results/validation/features", *leakage_tables(wildcards)]
    if ATTENTION_FIGURES:
        inputs.append("results/report/attention/attention_maps.h5")
    return inputs


def summary_benchmarks(wildcards):
    """Benchmark files per stage (absent ones are reported as such)."""
    stages = {
        "features": [f"benchmarks/features/shard_{shard}.tsv" for shard in SHARD_IDS],
        "covariance": [f"benchmarks/covariance/{name}.tsv" for name in SHARD_FILE_NAMES],
        "projection": [f"benchmarks/projections/{name}.tsv" for name in SHARD_FILE_NAMES],
    }
    if VALIDATION_PROMPTS:
        stages["validation inputs"] = ["benchmarks/validation_inputs/validation.tsv"]
        stages["leakage"] = [f"benchmarks/leakage/part_{part:03d}.tsv" for part in range(len(LEAKAGE_PARTS))]
    if ATTENTION_FIGURES:
        stages["attention maps"] = ["benchmarks/attention_maps/attention_maps.tsv"]
    return stages


def summary_folders(wildcards):
    folders = {
        "shard scratch (results/features)": "results/features",
        "merged moments": "results/covariance",
        "projections": "results/projections",
    }
    if VALIDATION_PROMPTS:
        folders["validation"] = "results/validation"
    return folders
