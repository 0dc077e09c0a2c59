rule covariance:
    """Sum of every shard's moments for one timestep (exact float64 sums)."""
    input:
        shard_files,
    output:
        "results/covariance/{name}.h5",
    params:
        prompt_sha256=nc_prompts.prompt_set_sha256(PROMPTS),
    log:
        "logs/covariance/{name}.log",
    conda:
        "../envs/nullcov.yaml"
    script:
        "../scripts/covariance.py"


use rule covariance as covariance_text with:
    output:
        "results/covariance/text.h5",
    log:
        "logs/covariance/text.log",
