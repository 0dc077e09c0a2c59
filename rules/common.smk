# Config validation, derived constants, input functions and wildcard constraints.
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the nullcov package ships with the workflow

import yaml

from nullcov.workflow import config as nc_config
from nullcov import docs as nc_docs
from nullcov.models import gpu_lease as nc_gpu_lease
from nullcov import joblog as nc_joblog
from nullcov import layout as nc_layout
from nullcov.models import family as nc_family
from nullcov.models import model as nc_model
from nullcov.models import mmdit_dims as nc_mmdit_dims
from nullcov.collection import memory as nc_memory
from nullcov.workflow import plan as nc_plan
from nullcov import prompts as nc_prompts
from nullcov.proof import plan as nc_proof_plan
from nullcov.models import schedule as nc_schedule
from nullcov.training.export import parse_exports
from nullcov.provenance import feature_config, model_files

# The results folder (nullcov.layout): every path under results/ below is built from it.
RESULTS = nc_layout.Results(nc_layout.ROOT)

# `--config key=null` passes the string "null": it means None for every key that admits null.
with open(f"{workflow.basedir}/config/schema.yaml") as schema_file:
    nc_config.normalise_nulls(config, yaml.safe_load(schema_file))
if isinstance(config.get("exports"), str):  # --config exports=... arrives as a string
    try:
        config["exports"] = parse_exports(config["exports"])
    except ValueError as err:
        raise WorkflowError(f"invalid configuration: {err}")
validate(config, "../config/schema.yaml", set_default=True)
# One spelling of the uniform strategy (None) from here on: provenance compares it.
config["sampler_strategy"] = nc_schedule.canonical_strategy(config["sampler_strategy"])

if not any(config["collect_features"].values()):
    raise WorkflowError(
        "config key 'collect_features': q, k, v and out are all false; nothing to collect"
        + nc_docs.see("all-features-are-off")
    )

try:
    PROMPTS = nc_prompts.read_prompts(config["prompts"])
    MODEL_DIR = nc_model.workflow_path(nc_model.resolve_model_dir(config["model"]))
    # SD3/FLUX (nullcov.models.family): blocks and streams instead of attn2 linears, sigma-keyed steps.
    TRANSFORMER = nc_plan.is_transformer(config["model"], MODEL_DIR)
    SCHEDULER_CONFIG = nc_model.scheduler_config(config["model"])
    SCHEDULE = nc_schedule.cached_schedule(
        SCHEDULER_CONFIG,
        config["sampler_strategy"],
        config["num_denoising_steps"],
        cache_dir="resources/cache/schedules",
        flow=(nc_plan.flow_plan(config["model"], MODEL_DIR, config["resolution"]) if TRANSFORMER else None),
    )
except (nc_prompts.PromptFileError, nc_model.ModelError, nc_schedule.ScheduleError) as err:
    raise WorkflowError(f"invalid configuration: {err}")

# At most one GPU job per visible GPU unless --resources gpu=N (local runs; logged).
nc_gpu_lease.limit_gpu_jobs(workflow, logger.info)

DUPLICATES = nc_prompts.duplicate_counts(PROMPTS)
if DUPLICATES:
    logger.warning(
        f"{config['prompts']}: {sum(DUPLICATES.values()) - len(DUPLICATES)} repeated prompt line(s) "
        f"({len(DUPLICATES)} distinct prompts), e.g. {next(iter(DUPLICATES))!r} x{next(iter(DUPLICATES.values()))}; "
        f"duplicate_prompts: {config['duplicate_prompts']} "
        + ("(each occurrence is collected with its own seed)" if config["duplicate_prompts"] == "keep" else "(dropped)")
        + nc_docs.see("repeated-prompt-lines")
    )
    PROMPTS = nc_prompts.apply_duplicate_policy(PROMPTS, config["duplicate_prompts"])
STEP_NAMES = [step["name"] for step in SCHEDULE["steps"]]
# prompts_per_shard: auto sizes shards by work per job (nullcov.prompts.auto_prompts_per_shard).
PROMPTS_PER_SHARD = (
    nc_prompts.auto_prompts_per_shard(len(STEP_NAMES))
    if config["prompts_per_shard"] == "auto"
    else config["prompts_per_shard"]
)
SHARDS = nc_prompts.split_into_shards(PROMPTS, PROMPTS_PER_SHARD)
SHARD_IDS = [f"{index:04d}" for index in range(len(SHARDS))]
# Merges: with more shards than shards_per_merge_group, partial sums per group of consecutive
# shards (rule merge_group, all steps per job), then the per-step sum over the groups.
MERGE_GROUPS = [
    SHARD_IDS[start : start + config["shards_per_merge_group"]]
    for start in range(0, len(SHARD_IDS), config["shards_per_merge_group"])
]
MERGE_KIND = "partial" if len(MERGE_GROUPS) > 1 else "features"
PROMPT_SHA256 = nc_prompts.prompt_set_sha256(PROMPTS)
# Per-step linears (q/out) and text linears (k/v) by their collect_features names (nullcov.models.family).
# A transformer's selection is its streams: the blocks' per step, the text path's (context, pooled) in text.h5.
SELECTION = config["streams"] if TRANSFORMER else config["collect_features"]
if TRANSFORMER:
    COLLECT_STEPS = bool(nc_family.step_streams(config["streams"]))
    COLLECT_TEXT = bool(nc_family.text_path_keys(config["streams"]))
else:
    COLLECT_STEPS = bool(nc_family.CROSS_ATTENTION.step_linears(config["collect_features"]))
    COLLECT_TEXT = nc_family.CROSS_ATTENTION.collects_text(config["collect_features"])
# The feature jobs' config: the keys that change the statistics (a transformer's streams too).
FEATURE_CONFIG = feature_config(config) | (
    {key: config[key] for key in ("streams", "true_cfg_scale")} if TRANSFORMER else {}
)
# Files each feature job writes: one per scheduled step (q/out inputs) and text.h5 (k/v inputs).
STEP_FILE_NAMES = STEP_NAMES if COLLECT_STEPS else []
SHARD_FILE_NAMES = STEP_FILE_NAMES + ([nc_layout.TEXT_NAME] if COLLECT_TEXT else [])
# Built-in tiny models: folder name under resources/models -> family (rule tiny_model builds them).
BUILTIN_FAMILIES = {Path(folder).name: family for family, folder in nc_model.BUILTIN_MODELS.values()}

# Model dims from the UNet config (a meta-device UNet, cached: no weights read) -> every job's memory.
try:
    if TRANSFORMER:
        nc_plan.check_transformer_config(config, nc_plan.is_flux(config["model"], MODEL_DIR))
        UNET_DIMS = nc_plan.transformer_dims(config["model"], MODEL_DIR)
    else:
        nc_plan.check_unet_config(config)
        UNET_CONFIG = nc_plan.unet_config(config["model"], MODEL_DIR)
        nc_config.check_unconditional_branch(config, UNET_CONFIG)
        nc_config.check_finetune_proof(config, UNET_CONFIG)
        UNET_DIMS = nc_plan.model_dims(UNET_CONFIG, cache_dir="resources/cache/dims")
    LAYERS = nc_model.select_layers(list(UNET_DIMS["layers"]), config["cross_attention_layers"])
except (ValueError, nc_model.ModelError) as err:
    raise WorkflowError(f"invalid configuration: {err}")
STEP_DIMS = nc_plan.step_dims(UNET_DIMS, LAYERS, SELECTION)
TEXT_DIMS = nc_plan.text_dims(UNET_DIMS, LAYERS, SELECTION)
WEIGHTS_BYTES = nc_memory.weights_bytes(MODEL_DIR, UNET_DIMS)
FEATURE_MEM_MB = nc_plan.feature_job_mem_mb(
    nc_memory.statistics_bytes(STEP_DIMS),
    len(STEP_NAMES) if COLLECT_STEPS else 0,
    WEIGHTS_BYTES,
    config["feature_job_max_mem_mb"],
)


wildcard_constraints:
    shard=r"\d{4}",
    group=r"\d{4}",
    name=nc_schedule.NAME_PATTERN,
    builtin="|".join(BUILTIN_FAMILIES),


def covariance_files(names):
    """Merged moments files of `names` (step names and/or the text file's name)."""
    return [str(RESULTS.covariance(name)) for name in names]


def projection_files(names):
    """Projection files of `names` (step names and/or the text file's name)."""
    return [str(RESULTS.projection(name)) for name in names]


def final_outputs():
    """The deliverables: merged moments (interpolating trainers need them) and projections."""
    return (
        [str(RESULTS.schedule)]
        + covariance_files(SHARD_FILE_NAMES)
        + projection_files(SHARD_FILE_NAMES)
        + report_outputs()
        + export_outputs()
    )


# A model folder's files (configs, tokenizer, weights) are inputs of the feature jobs: changed
# weights rerun them (and change the content fingerprint recorded in every shard).
MODEL_FILES = (
    [str(MODEL_DIR)] if config["model"] in nc_model.BUILTIN_MODELS else [str(path) for path in model_files(MODEL_DIR)]
)


EXPORT_OUTPUTS = {  # export name -> its output (rules/export.smk)
    "nullbooth": str(RESULTS.export("nullbooth")),
    "safetensors": str(RESULTS.export("nullcov_projections.safetensors")),
}
FINETUNE_OUTPUTS = {  # the fine-tune proof's outputs besides its weights (rules/finetune.smk)
    name: str(RESULTS.finetune(file))
    for name, file in (
        ("table", "variants.tsv"),
        ("curves", "curves.tsv"),
        ("matched", "matched.tsv"),
        ("figure", "frontier.png"),
        ("grid", "grid.png"),
        ("grid_images", "grid.npz"),
        ("null_energy", "null_energy.tsv"),
    )
}


def export_outputs():
    """The configured exports and, with finetune_proof, the fine-tune proof's table and figure."""
    outputs = [EXPORT_OUTPUTS[name] for name in config["exports"]]
    if config["finetune_proof"]:
        outputs += [FINETUNE_OUTPUTS["table"], FINETUNE_OUTPUTS["matched"], FINETUNE_OUTPUTS["grid"]]
    return outputs


#: CPU threads of each GPU job (features, validation_inputs, attention_maps, finetune_proof): the
#: job sets torch's threads to it; a profile's set-threads overrides it.
GPU_JOB_THREADS = 2


def model_input(wildcards):
    """The built model folder (builtin models), else every file of the model folder."""
    return MODEL_FILES


def shard_prompts(wildcards):
    return SHARDS[int(wildcards.shard)]


def shard_first_index(wildcards):
    return int(wildcards.shard) * PROMPTS_PER_SHARD


SHARD_FOLDERS = [str(RESULTS.shard(shard)) for shard in SHARD_IDS]
GROUP_FOLDERS = [str(RESULTS.group(group)) for group in range(len(MERGE_GROUPS))]


def shard_folders(wildcards):
    """Every shard's feature folder."""
    return SHARD_FOLDERS


def group_shard_folders(wildcards):
    """The shard folders of one merge group."""
    return [str(RESULTS.shard(shard)) for shard in MERGE_GROUPS[int(wildcards.group)]]


def merge_inputs(wildcards):
    """What a per-step merge reads {folder}/{name}.h5 from: the shards, or the groups' partial sums."""
    return GROUP_FOLDERS if MERGE_KIND == "partial" else SHARD_FOLDERS


def scratch_output(path):
    """Shard and partial-sum folders: kept (keep_shards: true), or deleted once merged (temp)."""
    return directory(path) if config["keep_shards"] else temp(directory(path))


def feature_job_mem_mb(wildcards, attempt):
    """GPU jobs running the feature job (features, validation_inputs): its need from the model
    dims x steps, capped by feature_job_max_mem_mb (the job chunks its steps to fit), x attempt."""
    return attempt * FEATURE_MEM_MB


def model_job_mem_mb(wildcards, attempt):
    """GPU jobs that hold the model but no step statistics (attention_maps), x attempt."""
    return attempt * nc_plan.feature_job_mem_mb(0, 0, WEIGHTS_BYTES, config["feature_job_max_mem_mb"])


def finetune_mem_mb(wildcards, attempt):
    """The fine-tune proof: a feature job's need plus copies of the model's weights
    (nullcov.workflow.plan.finetune_mem_mb), x attempt."""
    return attempt * nc_plan.finetune_mem_mb(FEATURE_MEM_MB, WEIGHTS_BYTES)


def merge_mem_mb(wildcards, attempt):
    """Merge jobs (covariance, merge_group): a few steps' statistics (constant in the number of
    shards), x attempt. merge_group holds every kind of file, one at a time."""
    return attempt * nc_plan.merge_mem_mb(held_statistics_bytes(wildcards))


def held_dims(wildcards):
    """The dims of the file a covariance or projection job reads: the text file's, or one step's."""
    return TEXT_DIMS if wildcards.get("name") is None else STEP_DIMS


def held_statistics_bytes(wildcards):
    """float64 bytes of the largest statistics a merge job holds at once."""
    if "group" in wildcards.keys():
        return max(nc_memory.statistics_bytes(STEP_DIMS), nc_memory.statistics_bytes(TEXT_DIMS))
    return nc_memory.statistics_bytes(held_dims(wildcards))


def projection_mem_mb(wildcards, attempt):
    """projection jobs: every P of one step file and one statistic's eigendecomposition, x attempt."""
    dims = held_dims(wildcards)
    return attempt * nc_plan.projection_mem_mb(nc_memory.statistics_bytes(dims), nc_plan.largest_statistic_bytes(dims))


def feature_job_minutes(wildcards, attempt):
    """SLURM runtime of a shard's feature job (nullcov.workflow.plan.feature_job_minutes), doubled on each
    retry (text-only: one "step" per prompt)."""
    work = len(shard_prompts(wildcards)) * (len(STEP_NAMES) if COLLECT_STEPS else 1)
    return nc_plan.feature_job_minutes(work, attempt)


def validation_inputs_minutes(wildcards, attempt):
    """SLURM runtime of the validation prompts' feature job (nullcov.workflow.plan.feature_job_minutes)."""
    return nc_plan.feature_job_minutes(len(VALIDATION_PROMPTS) * len(STEP_NAMES), attempt)


# -- Report and validation (rules/report.smk, rules/validation.smk) -----------------------------
from nullcov.report import validation as nc_validation

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
    REPORT_STEPS = nc_config.select_steps(len(STEP_NAMES), config["report_steps"])  # indices into STEP_NAMES
    ATTENTION_PROMPTS = nc_config.select_prompts(len(PROMPTS), config["attention_prompts"])
except (nc_prompts.PromptFileError, nc_validation.ValidationConfigError, ValueError) as err:
    raise WorkflowError(f"invalid configuration: {err}")

# The fine-tune proof, planned once (nullcov.proof.plan.ProofPlan; rules/finetune.smk): its settings,
# the projection settings it compares with the files that serve each (the run's own, or those of the
# rules proof_features, proof_covariance and proof_projection), the run's own setting and the variants.
FINETUNE_PLAN = nc_proof_plan.plan_proof(config, RESULTS, SHARD_FILE_NAMES, MODEL_DIR)
# The proof's statistics of another CFG-branch setting: one shard of every prompt (first index 0: the run's seeds).
PROOF_SHARD = "0000"
PROOF_THRESHOLDS = FINETUNE_PLAN.threshold_values()  # label -> (nullspace_threshold, threshold_percent)
PROOF_WILDCARDS = {  # constraints of the proof's statistics rules: the values the plan compares
    "branches": "|".join(nc_proof_plan.UNCONDITIONAL_BRANCH),
    "statistic": "|".join(sorted({setting.statistic for setting in FINETUNE_PLAN.compared})),
    "threshold": "|".join(re.escape(label) for label in PROOF_THRESHOLDS),
}


def proof_features_config(wildcards):
    """The feature config of the proof's statistics: the run's, with the CFG branches of the setting."""
    return feature_config(config) | {"unconditional_branch": nc_proof_plan.UNCONDITIONAL_BRANCH[wildcards.branches]}


def proof_features_minutes(wildcards, attempt):
    """SLURM runtime of the proof's feature job: every prompt x step (nullcov.workflow.plan.feature_job_minutes)."""
    return nc_plan.feature_job_minutes(len(PROMPTS) * len(STEP_NAMES), attempt)


def proof_projection_input(wildcards):
    """The merged moments a proof projection is made of: those of its compared setting (the run's or the proof's)."""
    setting = FINETUNE_PLAN.setting((wildcards.branches, wildcards.statistic, wildcards.threshold))
    return setting.file("covariance", wildcards.get("name", nc_layout.TEXT_NAME))


def proof_threshold(wildcards, index):
    """nullspace_threshold (0) or threshold_percent (1) of a proof projection's threshold label."""
    return PROOF_THRESHOLDS[wildcards.threshold][index]


LEAKAGE_PARTS = nc_validation.step_parts(SHARD_FILE_NAMES, nc_plan.LEAKAGE_STEPS_PER_JOB) if VALIDATION_PROMPTS else []
STEP_TIMESTEPS = {step["name"]: step["timestep"] for step in SCHEDULE["steps"]}
REPORT_FIGURES = {  # figure kind -> path (rule report_figures)
    **{
        f"spectra_{linear}": str(RESULTS.report("spectra", f"{linear}.png"))
        for linear in nc_family.CROSS_ATTENTION.step_linears(config["collect_features"])
    },
    **({"spectra_text": str(RESULTS.report("spectra", "text.png"))} if COLLECT_TEXT else {}),
    **({"null_dim": str(RESULTS.report("null_dim.png"))} if COLLECT_STEPS else {}),
}
# A model folder that records how it was trained (builtin:shapes) gets its training curve in the report.
TRAINING_RECORD = MODEL_DIR / "training.json"
TRAINING_CURVE_FIGURE = str(RESULTS.report("model", "training_curve.png"))  # rule training_curve
TRAINING_CURVE = TRAINING_CURVE_FIGURE if TRAINING_RECORD.is_file() else None
ATTENTION_DATA = str(RESULTS.report("attention", "attention_maps.h5"))  # rule attention_maps
ATTENTION_FIGURES = {  # (prompt index, step name) -> path (rule attention_maps)
    (index, STEP_NAMES[step]): str(RESULTS.report("attention", f"prompt_{index:04d}_{STEP_NAMES[step]}.png"))
    for index in ATTENTION_PROMPTS
    for step in REPORT_STEPS
}
SUMMARY_OUTPUTS = {"html": str(RESULTS.report("summary.html")), "tsv": str(RESULTS.report("summary.tsv"))}
VALIDATION_OUTPUTS = {  # rule validation_report
    "table": str(RESULTS.validation("leakage.tsv")),
    "tradeoff": str(RESULTS.report("validation", "leakage_tradeoff.png")),
    "heatmap": str(RESULTS.report("validation", "leakage_heatmap.png")),
}
#: Characters of a prompt shown in an attention figure's report label.
ATTENTION_LABEL_CHARS = 60


def report_outputs():
    """Every figure and table of the report (all of them are outputs of rules in `all`); none for an
    SD3/FLUX model yet (its figures read UNet keys)."""
    if TRANSFORMER:
        return []
    outputs = list(REPORT_FIGURES.values()) + [SUMMARY_OUTPUTS["html"]]
    if TRAINING_CURVE:
        outputs.append(TRAINING_CURVE)
    if ATTENTION_FIGURES:
        outputs += [ATTENTION_DATA, *ATTENTION_FIGURES.values()]
    if VALIDATION_PROMPTS:
        outputs += list(VALIDATION_OUTPUTS.values())
    return outputs


def attention_labels(index, name):
    """Report labels of one attention figure (braces would read as wildcards)."""
    prompt = PROMPTS[index]
    if len(prompt) > ATTENTION_LABEL_CHARS:
        prompt = prompt[: ATTENTION_LABEL_CHARS - 1] + "…"
    return {
        "prompt": f"{index}: {prompt}".replace("{", "(").replace("}", ")"),
        "step": f"{name} (t={STEP_TIMESTEPS[name]:.0f})",
    }


def leakage_names(wildcards):
    """The step names (and text) of one leakage job."""
    return LEAKAGE_PARTS[int(wildcards.part)]


def leakage_covariance(wildcards):
    """Input function: the merged moments of one leakage job's steps."""
    return covariance_files(leakage_names(wildcards))


def leakage_projections(wildcards):
    """Input function: the projections of one leakage job's steps."""
    return projection_files(leakage_names(wildcards))


LEAKAGE_TABLE = str(RESULTS.validation("leakage", "part_{part}.tsv"))  # rule leakage


def leakage_tables(wildcards):
    return [LEAKAGE_TABLE.format(part=f"{part:03d}") for part in range(len(LEAKAGE_PARTS))]


def summary_inputs(wildcards):
    """Everything the run summary reports on: it runs after every other job of the run."""
    inputs = [str(RESULTS.schedule), *shard_folders(wildcards)]
    inputs += covariance_files(SHARD_FILE_NAMES) + projection_files(SHARD_FILE_NAMES)
    if VALIDATION_PROMPTS:
        inputs += [str(RESULTS.validation_features), *leakage_tables(wildcards)]
    if ATTENTION_FIGURES:
        inputs.append(ATTENTION_DATA)
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
        f"shard scratch ({RESULTS.features_folder})": str(RESULTS.features_folder),
        "merged moments": str(RESULTS.covariance_folder),
        "projections": str(RESULTS.projections_folder),
    }
    if VALIDATION_PROMPTS:
        folders["validation"] = str(RESULTS.validation())
    return folders


# -- The run plan (rules/plan.smk) ----------------------------------------------------------------
def run_plan():
    """Jobs per rule, bytes on disk, memory per job type and GPU-hours (nullcov.workflow.plan.run_plan)."""
    merge_groups = len(GROUP_FOLDERS) if MERGE_KIND == "partial" else 0
    jobs = {
        "tiny_model": int(config["model"] in nc_model.BUILTIN_MODELS),
        "schedule": 1,
        "features (GPU)": len(SHARD_IDS),
        "validation_inputs (GPU)": int(bool(VALIDATION_PROMPTS)),
        "attention_maps (GPU)": int(bool(ATTENTION_FIGURES)),
        "merge_group": merge_groups,
        "covariance": len(STEP_NAMES) * COLLECT_STEPS + COLLECT_TEXT,
        "projection": len(STEP_NAMES) * COLLECT_STEPS + COLLECT_TEXT,
        "leakage": len(LEAKAGE_PARTS),
        "report, summary": len(report_outputs()) and 2 + int(bool(VALIDATION_PROMPTS)),
    }
    return nc_plan.run_plan(
        model=config["model"],
        dims=UNET_DIMS,
        layers=LAYERS,
        collect_features=SELECTION,
        num_steps=len(STEP_NAMES),
        collection=config["collection"],
        shards=[len(shard) for shard in SHARDS],
        validation_prompts=len(VALIDATION_PROMPTS),
        weights=WEIGHTS_BYTES,
        feature_mem_mb=FEATURE_MEM_MB,
        throughput=config["gpu_prompt_timesteps_per_second"],
        eigh_seconds_at_3072=config["projection_cpu_seconds_at_3072"],
        jobs_per_rule=jobs,
        merge_groups=merge_groups,
        # a transformer's bytes per stream choice, from its config alone (nullcov.models.mmdit_dims)
        stream_widths=(
            nc_mmdit_dims.stream_widths(nc_plan.transformer_config(config["model"], MODEL_DIR)[1])
            if TRANSFORMER
            else None
        ),
    )
