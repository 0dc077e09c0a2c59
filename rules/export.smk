# Exports for other trainers (config key `exports`): NullBooth's covariance_matrices layout and
# one safetensors file of every projection (nullcov/export.py documents both formats).


rule export_nullbooth:
    """The configured statistic per layer, step and feature as float32 .npy, in NullBooth's layout."""
    input:
        schedule="results/schedule.json",
        steps=expand("results/covariance/{name}.h5", name=STEP_NAMES if COLLECT_STEPS else []),
        text=["results/covariance/text.h5"] if COLLECT_TEXT else [],
    output:
        directory("results/export/nullbooth"),
    log:
        "logs/export/nullbooth.log",
    conda:
        "../envs/nullcov.yaml"
    params:
        statistic=config["statistic"],
        step_names=STEP_NAMES,
    script:
        "../scripts/export_nullbooth.py"


rule export_safetensors:
    """Every projection, eigenvalues and null dims of the run, with its provenance, in one file."""
    input:
        schedule="results/schedule.json",
        projections=expand("results/projections/{name}.h5", name=SHARD_FILE_NAMES),
    output:
        "results/export/nullcov_projections.safetensors",
    log:
        "logs/export/safetensors.log",
    conda:
        "../envs/nullcov.yaml"
    params:
        names=SHARD_FILE_NAMES,
    script:
        "../scripts/export_safetensors.py"
