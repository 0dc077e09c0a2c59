# nullcov: per-timestep null-space projections for the cross-attention layers of Stable Diffusion.
# schedule -> features (per prompt shard) -> covariance (per timestep) -> projection (per timestep)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/schedule.smk"
include: "rules/features.smk"
include: "rules/covariance.smk"
include: "rules/projection.smk"
include: "rules/validation.smk"
include: "rules/report.smk"
include: "rules/plan.smk"
include: "rules/export.smk"
include: "rules/finetune.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
