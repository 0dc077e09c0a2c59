# Exports for other trainers (config key `exports`): NullBooth's covariance_matrices layout and
# one safetensors file of every projection (nullcov/training/export.py documents both formats).


rule export_nullbooth:
    """The configured statistic per layer, step and feature as float32 .npy, in NullBooth's layout."""
    input:
        schedule=RESULTS.schedule,
        steps=covariance_files(STEP_FILE_NAMES),
        text=covariance_files([nc_layout.TEXT_NAME] if COLLECT_TEXT else []),
    output:
        directory(EXPORT_OUTPUTS["nullbooth"]),
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
        schedule=RESULTS.schedule,
        projections=projection_files(SHARD_FILE_NAMES),
    output:
        EXPORT_OUTPUTS["safetensors"],
    log:
        "logs/export/safetensors.log",
    conda:
        "../envs/nullcov.yaml"
    params:
        names=SHARD_FILE_NAMES,
    script:
        "../scripts/export_safetensors.py"
